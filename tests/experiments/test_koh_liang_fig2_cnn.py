"""Figure 2's CNN panel, reduced (fewer training points and channels): CG influence against actual retraining."""

import json

import pytest

from influencekit.experiments.koh_liang_fig2_cnn import CNNConfig, reproduce

pytestmark = pytest.mark.skip(
    reason="not yet validated (issue 13): no reduced CNN configuration reached a verified local minimum within "
    "CI's ~90 s; 2 channels, n = 100, wd 1e-3 was still at ||grad R|| = 1e-3 with negative curvature after 400 "
    "Gauss-Newton steps (benchmarks/RESULTS.md, Issue 13, second attempt); wd 1e-2 reaches one in 60 s but it is the "
    "trivial model (test accuracy 0.10, constant predictions, Pearson nan; third attempt)"
)


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory, synthetic_mnist_dir):
    out = tmp_path_factory.mktemp("fig2cnn")
    config = CNNConfig(out=out, data_dir=synthetic_mnist_dir, train_size=150, channels=2, num_points=10, workers=0, adam_epochs=30,
                       lbfgs_max_iter=100, budget_steps=10, progress=False)
    return out, reproduce(config)


def test_reduced_cnn_panel_is_at_a_verified_optimum(reduced_run):
    _, results = reduced_run
    assert results["trustworthy"] and results["model"]["at_local_optimum"]
    assert results["model"]["train_grad_norm"] <= 1e-8
    assert results["hessian"]["negative"] == 0 and results["hessian"]["min_eig"] > 0
    assert results["hessian"]["damping_for_positive_definite"] == 0.0
    assert "positive definite" in results["damping"]["why"]


def test_reduced_cnn_panel_predicts_actual_retraining(reduced_run):
    out, results = reduced_run
    assert results["retrain"]["true"]["not_converged"] == 0 and results["retrain"]["true"]["max_grad_norm"] <= 1e-8
    assert results["retrain"]["surrogate"]["max_grad_norm"] <= 1e-8
    # the reference: CG influence against retraining on the true objective
    assert results["solvers"]["cg"]["pearson"] >= 0.9
    # CG with damping lambda is the first-order prediction of the damped surrogate's retraining
    assert results["correlations"]["surrogate"]["pearson"] >= 0.95
    saved = json.loads((out / "results.json").read_text())
    assert saved["solvers"]["cg"]["pearson"] == results["solvers"]["cg"]["pearson"]
    lines = (out / "points.csv").read_text().splitlines()
    assert lines[0] == "train_index,mnist_index,label,predicted_cg,actual,actual_surrogate,actual_budget"
    assert len(lines) == 11
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
