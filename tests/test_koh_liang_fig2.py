"""Koh & Liang Figure 2 pipeline on a reduced problem, with real retraining; kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headless_chromium import external_references, is_not_blank, open_alone
from influencekit.experiments.koh_liang_fig2 import Fig2Config, reproduce

@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory, synthetic_mnist_dir):
    out = tmp_path_factory.mktemp("fig2")
    config = Fig2Config(out=out, data_dir=synthetic_mnist_dir, train_size=5000, num_points=50, solvers=["exact", "cg"], workers=2, progress=False)
    return out, reproduce(config)


def test_reduced_figure2_predicts_actual_retraining(reduced_run):
    out, results = reduced_run
    assert results["n_train"] == 5000 and results["num_points"] == 50
    assert results["model"]["train_grad_norm"] <= 1e-10
    assert results["retrain"]["max_grad_norm"] <= 1e-10
    assert results["hessian"]["negative"] == 0 and 0 < results["hessian"]["min_eig"] < results["hessian"]["max_eig"]
    assert results["hessian"]["min_eig"] >= 0.01 * (1 - 1e-6)  # H includes the weight decay 0.01 I
    for solver in ("exact", "cg"):
        assert results["solvers"][solver]["pearson"] >= 0.99
        assert results["solvers"][solver]["spearman"] >= 0.95
    assert max(results["solvers"]["cg"]["relative_residual"]) <= 1e-9
    saved = json.loads((out / "results.json").read_text())
    assert saved["solvers"]["exact"]["pearson"] == results["solvers"]["exact"]["pearson"]
    lines = (out / "points.csv").read_text().splitlines()
    assert lines[0].startswith("test_index,train_index,mnist_index,label,predicted_exact,predicted_cg,actual")
    assert len(lines) == 51
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predicted_changes_have_the_right_scale_for_the_top_points(reduced_run):
    out, _ = reduced_run
    rows = [line.split(",") for line in (out / "points.csv").read_text().splitlines()[1:]]
    predicted = [float(r[4]) for r in rows]
    actual = [float(r[6]) for r in rows]
    top = sorted(range(len(rows)), key=lambda i: -abs(actual[i]))[:10]
    for i in top:
        assert abs(predicted[i] - actual[i]) <= 0.2 * abs(actual[i])  # second-order effects shrink as n grows


def test_report_renders_alone_with_the_scatter_plots_and_training_images(reduced_run, tmp_path):
    out, results = reduced_run
    text = (out / "report.html").read_text(encoding="utf-8")
    assert external_references(text) == []
    assert "Retraining without it: the test loss went" in text and f"R = {results['solvers']['exact']['pearson']:.3f}" in text
    probe, screenshot = open_alone(out / "report.html", tmp_path)
    assert all(width > 0 for width in probe["natural_widths"]) and all(probe["decoded"])
    assert sum(alt.startswith("#") for alt in probe["alts"]) == 20 and probe["alts"].count("scatter plots") == 1
    assert is_not_blank(screenshot)


def test_untrained_model_is_refused(tmp_path, synthetic_mnist_dir):
    config = Fig2Config(out=tmp_path, data_dir=synthetic_mnist_dir, train_size=500, num_points=5, solvers=["exact"], workers=0,
                        optimum_tol=1e-30, progress=False)
    with pytest.raises(RuntimeError, match="Newton-CG stopped"):
        reproduce(config)


def test_kill_minus_nine_then_resume_loses_nothing(tmp_path, synthetic_mnist_dir):
    args = ["--data-dir", str(synthetic_mnist_dir), "--train-size", "2000", "--num-points", "60", "--solvers", "exact", "--workers", "1", "--no-progress"]
    cache = tmp_path / "cache"
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "influencekit.cli", "reproduce", "koh-liang-fig2", "--out", str(interrupted), "--cache-dir", str(cache), *args]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    saved: list[Path] = []
    while time.time() < deadline and process.poll() is None:
        saved = list(cache.glob("*/*.safetensors"))
        if len(saved) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*/*.safetensors")}
    assert 2 <= len(finished_before) < 60
    assert not (interrupted / "results.json").exists()

    resumed = reproduce(Fig2Config(out=interrupted, data_dir=synthetic_mnist_dir, train_size=2000, num_points=60, solvers=["exact"],
                                   workers=0, cache_dir=cache, progress=False))
    # every refit finished before the kill was reused, not recomputed
    for name, mtime in finished_before.items():
        assert next(cache.glob(f"*/{name}")).stat().st_mtime_ns == mtime
    fresh = reproduce(Fig2Config(out=tmp_path / "fresh", data_dir=synthetic_mnist_dir, train_size=2000, num_points=60, solvers=["exact"],
                                 workers=0, progress=False))
    assert resumed["solvers"]["exact"]["pearson"] == pytest.approx(fresh["solvers"]["exact"]["pearson"], abs=1e-12)
    resumed_rows = (interrupted / "points.csv").read_text()
    assert resumed_rows == (tmp_path / "fresh" / "points.csv").read_text()
