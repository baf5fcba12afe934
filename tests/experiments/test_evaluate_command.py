"""The ``influencekit evaluate`` command on a reduced mnist-lr workload, and the batched subset fits behind it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headless_chromium import external_references
from influencekit.cli import main
from influencekit.experiments.evaluate import WORKLOADS, EvaluateConfig, evaluate
from influencekit.experiments.evaluate_network import WORKLOADS as NETWORK_WORKLOADS
from influencekit.objectives.softmax_batch import SoftmaxSubsetTrainer, fit_softmax_regression_subsets
from influencekit.objectives.softmax_regression import fit_softmax_regression

def _toy(n=120, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, :c] + 0.8 * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def test_batched_subset_fits_equal_separate_fits():
    x, y = _toy()
    masks = torch.rand(4, len(y), generator=torch.Generator().manual_seed(1)) < 0.5
    batch = fit_softmax_regression_subsets(x, y, 0.05, masks, 3, tol=1e-11)
    assert float(batch.gradient_norms.max()) <= 1e-11
    for j in range(4):
        single = fit_softmax_regression(x[masks[j]], y[masks[j]], 0.05, 3, tol=1e-11)
        torch.testing.assert_close(batch.weights[j], single.weights, atol=1e-9, rtol=0)


def test_subset_trainer_from_scratch_and_warm_start_agree_on_the_convex_optimum():
    x, y = _toy(seed=2)
    masks = np.random.default_rng(0).random((3, len(y))) < 0.6
    full = fit_softmax_regression(x, y, 0.05, 3).weights
    scratch = SoftmaxSubsetTrainer(x, y, x[:7], y[:7], 0.05, 3)(masks)
    warm = SoftmaxSubsetTrainer(x, y, x[:7], y[:7], 0.05, 3, initial=full)(masks)
    assert scratch.shape == (3, 7)
    np.testing.assert_allclose(scratch, warm, atol=1e-8)
    # a different subset gives different outputs (the masks are used)
    assert np.abs(scratch[0] - scratch[1]).max() > 1e-3


def test_evaluate_command_reduced_mnist_lr(tmp_path, synthetic_mnist_dir):
    out = tmp_path / "eval"
    argv = ["evaluate", "--data-dir", str(synthetic_mnist_dir), "--out", str(out), "--workers", "0",
            "--train-size", "200", "--downsample", "4", "--test-size", "12", "--num-subsets", "10",
            "--val-subsets", "4", "--val-test-size", "6", "--loo-points", "8", "--n-bootstrap", "30",
            "--methods", "exact", "cg", "kfac", "tracin"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["workload"] == "mnist-lr" and results["complete"]
    methods = results["methods"]
    assert set(methods) == {"exact", "cg", "kfac", "tracin"}
    exact = methods["exact"]
    for key in ("lds", "lds_ci", "loo_pearson", "mislabel_auc", "seconds", "peak_mb", "settings"):
        assert key in exact
    assert exact["lds_ci"][0] <= exact["lds"] <= exact["lds_ci"][1]
    assert exact["lds"] > 0.8  # exact influence of a convex model on half-subsets
    assert methods["cg"]["lds"] == pytest.approx(exact["lds"], abs=1e-6)  # CG converged to the exact solve
    assert exact["lds_warm"] == pytest.approx(exact["lds"], abs=1e-6)  # same optimum from either start
    assert exact["loo_pearson"] > 0.99  # exact refits vs exact first-order influence
    assert exact["mislabel_auc"] > 0.6 and methods["cg"]["mislabel_auc"] is None
    assert len(methods["kfac"]["tuning"]) == 3 and methods["kfac"]["settings"]["damping"] in (0.0, 1e-3, 1e-2)
    assert "| exact |" in (out / "results.md").read_text() and (out / "lds.png").stat().st_size > 0
    report = (out / "report.html").read_text(encoding="utf-8")
    best = max(methods, key=lambda name: methods[name]["lds"])
    assert external_references(report) == [] and f"Best LDS: {best}" in report
    assert report.count("Removing this image would") == 2 * 10  # the 10 most helpful and the 10 most harmful
    assert report.count("<img") >= 1  # the LDS plot (7 x 7 downsampled examples are drawn as tables)
    # rerun: the retrained subsets come from the cache
    before = sorted(p.name for p in (out / "cache").rglob("*"))
    assert main(argv[:-4] + ["exact"]) == 0
    assert sorted(p.name for p in (out / "cache").rglob("*")) == before


def test_evaluate_offers_every_workload_it_runs_and_names_them_when_refusing(tmp_path):
    assert set(WORKLOADS) == {"mnist-lr", *NETWORK_WORKLOADS}  # the command's choices are the workloads that run
    with pytest.raises(ValueError, match="unknown workload 'mnist-vit'; choose from mnist-lr, mnist-mlp, mnist-cnn"):
        evaluate(EvaluateConfig(out=tmp_path, workload="mnist-vit"))
