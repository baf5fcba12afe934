"""Figure 2's CNN panel, reduced (fewer training points and channels): CG influence against actual retraining."""

import json

import pytest

from influencekit.experiments.koh_liang_fig2_cnn import CNNConfig, reproduce

pytestmark = pytest.mark.skip(
    reason="not yet validated (issue 13): no reduced configuration is both at a verified minimum and retrainable "
    "within CI time. With the 1x1 convolution's tanh restored (without it R is invariant under O(10), so H is singular "
    "at every non-trivial critical point) and full-batch Adam (lr 1e-2, 1,000 steps) before L-BFGS, n = 150, 2 channels "
    "on low-noise synthetic data reaches one in ~75 s (wd 7e-3: ||grad R|| 1e-13, eigenvalues [1.0e-3, 61.8], test "
    "accuracy 0.78), but lambda_min ~ 1e-3 is far below the O(1/n) change of H on removing an influential point, so every "
    "'true' refit needs its own Hessians (10-13 s each) and 10 refits did not finish in 400 s; on this fixture's data wd "
    "1e-2 is the trivial model (benchmarks/RESULTS.md, Issue 13, reduced CI test)"
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
