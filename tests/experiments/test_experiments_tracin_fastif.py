"""End-to-end runs of ``influencekit experiment tracin-mnist`` and ``fastif-recall`` at tiny sizes, on the synthetic MNIST-format set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from headless_chromium import external_references
from influencekit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def setup_module() -> None:
    torch.set_num_threads(1)


def test_tracin_mnist_end_to_end(tmp_path: Path, synthetic_mnist_dir: Path):
    out = tmp_path / "tracin"
    argv = ["experiment", "tracin-mnist", "--data-dir", str(synthetic_mnist_dir), "--no-download", "--out", str(out)]
    assert main([*argv, "--train-size", "500", "--epochs", "2", "--k", "5", "--cg-maxiter", "100", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"config", "accuracy", "test_point", "influence", "correlation", "top_k_overlap", "top_k", "timings_seconds", "checkpoints"} <= set(results)
    pairs = {"tracin_last_layer_vs_tracin_full", "tracin_last_layer_vs_influence", "tracin_full_vs_influence"}
    assert set(results["correlation"]) == pairs and set(results["top_k_overlap"]) == pairs
    for values in results["correlation"].values():
        assert -1.0 <= values["pearson"] <= 1.0 and -1.0 <= values["spearman"] <= 1.0
    # the last-layer scores are a part of the full TracIn sum: they correlate clearly
    assert results["correlation"]["tracin_last_layer_vs_tracin_full"]["pearson"] > 0.5
    for overlap in results["top_k_overlap"].values():
        assert 0.0 <= overlap["proponents"] <= 1.0 and 0.0 <= overlap["opponents"] <= 1.0
    top = results["top_k"]["influence"]
    assert len(top["proponents"]) == 5 and top["proponents"][0]["score"] >= top["proponents"][-1]["score"]
    assert results["test_point"]["index"] == 8 and len(results["train_indices"]) == 500
    assert 0.0 <= results["accuracy"]["test"] <= 1.0
    assert (out / "figure.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.html").read_text(encoding="utf-8")  # test image, IF and TracIn top-5s, scatter
    assert external_references(report) == [] and report.count('src="data:image/png;base64,') == 1 + 3 * 10 + 1
    assert [c["epoch"] for c in results["checkpoints"]] == [1, 2]
    for record in results["checkpoints"]:
        with safe_open(str(out / record["path"]), framework="pt") as f:
            assert float(f.metadata()["learning_rate"]) == record["learning_rate"] == 0.1
            assert set(f.keys()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize("knn_index,timed_index", [("flat", "ivf"), ("hnsw", "none")])
def test_fastif_recall_end_to_end(tmp_path: Path, synthetic_mnist_dir: Path, knn_index: str, timed_index: str):
    out = tmp_path / "fastif"
    argv = ["experiment", "fastif-recall", "--data-dir", str(synthetic_mnist_dir), "--no-download", "--out", str(out), "--knn-index", knn_index]
    small = ["--train-size", "1500", "--test-indices", "8,3", "--ks", "100,500", "--speedup-k", "500", "--timing-repeats", "1"]
    timed = ["--timed-index", timed_index, "--ivf-nprobe", "120"]  # 120 of the 155 lists: enough to fill k = 500
    assert main([*argv, *small, *timed, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["knn_index"]["kind"] == knn_index
    approximate = results["speedup_approximate"]
    if timed_index == "none":
        assert approximate is None
    else:
        assert approximate["kind"] == "ivf" and (approximate["nlist"], approximate["nprobe"]) == (155, 120)
        assert 0.5 <= approximate["neighbour_recall"] <= 1.0 and approximate["speedup_including_knn"] > 0
        assert set(approximate["recall_at_m"]) == {"helpful", "harmful", "influential"}
        assert all(0.0 <= r <= 1.0 for r in approximate["recall_at_m"].values())
    if knn_index == "hnsw":  # neighbour recall of the HNSW graph against IndexFlatL2, per k
        recall = results["knn_index"]["neighbour_recall_vs_flat"]
        assert set(recall) == {"100", "500"} and all(0.9 <= r <= 1.0 for r in recall.values())
    assert {"config", "model", "test_indices", "s_test", "knn_index", "recall", "speedup"} <= set(results)
    assert results["test_indices"] == [8, 3] and results["model"]["n_train"] == 1500
    assert results["model"]["gradient_norm"] <= 1e-10
    assert set(results["recall"]) == {"helpful", "harmful", "influential"}
    for kind in results["recall"].values():
        assert set(kind) == {"m=10", "m=100"}
        for row in kind.values():
            assert set(row) == {"k=100", "k=500"}
            assert all(0.0 <= r <= 1.0 for cell in row.values() for r in cell["per_test"])
    speedup = results["speedup"]
    assert speedup["k"] == 500 and speedup["speedup"] > 0 and speedup["fastif_seconds"] > 0
    assert (out / "figure.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.html").read_text(encoding="utf-8")  # test image, top-10s, the recall figure
    assert external_references(report) == [] and report.count('src="data:image/png;base64,') == 1 + 20 + 1
