"""The generic retraining engine against closed forms (ridge regression) and the softmax path."""

import pytest
import torch
from torch import nn

from influencekit.objectives.softmax_regression import fit_softmax_regression
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.validation.leave_one_out import SoftmaxRefitProblem, refit_leave_one_out
from influencekit.validation.retraining import RetrainingProblem, measurements_at, positive_definite_shift, retrain

WD = 0.05


def _ridge(n=40, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def _ridge_solution(x, y, keep, damping=0.0, anchor=None):
    """argmin (1/m) sum_{keep} 0.5 (x w - y)^2 + (WD/2)||w||^2 + (damping/2)||w - anchor||^2, m = |keep|."""
    xs, ys = x[keep], y[keep]
    d = x.shape[1]
    a = xs.T @ xs / len(keep) + (WD + damping) * torch.eye(d, dtype=x.dtype)
    b = xs.T @ ys[:, 0] / len(keep) + (damping * anchor if damping else 0.0)
    return torch.linalg.solve(a, b), a


def _ridge_objective(x, y):
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(_ridge_solution(x, y, torch.arange(len(y)))[0].unsqueeze(0))
    return TorchObjective(model, "squared_error", (x, y), weight_decay=WD)


def _keep(n, removed):
    return torch.tensor([j for j in range(n) if j not in set(removed)])


def test_true_mode_matches_ridge_leave_one_out_closed_form():
    x, y = _ridge()
    objective = _ridge_objective(x, y)
    refits = retrain(objective, [0, 7, 39], mode="true", tol=1e-12)
    for i, r in refits.items():
        expected, _ = _ridge_solution(x, y, _keep(len(y), [i]))
        assert r["converged"] and r["gradient_norm"] <= 1e-12 and 1 <= r["steps"] <= 20  # contraction ~ leverage / n per step
        torch.testing.assert_close(r["theta"], expected, rtol=0, atol=1e-11)
        assert r["removed"] == [i] and r["seconds"] > 0


def test_true_mode_refits_share_one_factor_when_they_contract_fast(monkeypatch):
    # n = 400: H differs from each refit's Hessian by O(1/n), so the shared chord steps converge
    # and no refit needs a Hessian of its own
    x, y = _ridge(n=400)
    objective = _ridge_objective(x, y)
    monkeypatch.setattr(RetrainingProblem, "_removed_hessian_factor", lambda *args: pytest.fail("per-refit Hessian built"))
    refits = retrain(objective, [0, 7, 399], mode="true", tol=1e-12)
    for i, r in refits.items():
        expected, _ = _ridge_solution(x, y, _keep(len(y), [i]))
        assert r["converged"] and 2 <= r["steps"] <= 10
        torch.testing.assert_close(r["theta"], expected, rtol=0, atol=1e-11)


def test_leave_a_group_out_matches_closed_form_on_dask():
    x, y = _ridge()
    objective = _ridge_objective(x, y)
    groups = [[1, 2, 3], [10, 20], [5]]
    refits = retrain(objective, [0, 1, 2], mode="true", groups=groups, tol=1e-12, workers=1, batch_size=2)
    for k, group in enumerate(groups):
        expected, _ = _ridge_solution(x, y, _keep(len(y), group))
        torch.testing.assert_close(refits[k]["theta"], expected, rtol=0, atol=1e-11)
        assert refits[k]["removed"] == group


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_surrogate_mode_is_the_damped_quadratic_minimiser(damping):
    # For a quadratic loss the surrogate equals the loss plus (damping/2)||theta - theta_hat||^2.
    x, y = _ridge()
    objective = _ridge_objective(x, y)
    groups = [[4], [8, 9, 30]]
    refits = retrain(objective, [0, 1], mode="surrogate", groups=groups, damping=damping, tol=1e-13)
    for k, group in enumerate(groups):
        expected, _ = _ridge_solution(x, y, _keep(len(y), group), damping, objective.theta)
        assert refits[k]["gradient_norm"] <= 1e-13
        torch.testing.assert_close(refits[k]["theta"], expected, rtol=0, atol=1e-11)
    if damping:  # damping pulls the refit towards theta_hat
        plain, _ = _ridge_solution(x, y, _keep(len(y), groups[1]))
        assert (refits[1]["theta"] - objective.theta).norm() < (plain - objective.theta).norm()


def test_budget_mode_is_gradient_descent_with_a_fixed_number_of_steps():
    x, y = _ridge()
    objective = _ridge_objective(x, y)
    steps, lr = 7, 0.2
    r = retrain(objective, [3], mode="budget", budget_steps=steps, budget_lr=lr)[3]
    optimum, a = _ridge_solution(x, y, _keep(len(y), [3]))
    contraction = torch.linalg.matrix_power(torch.eye(len(a), dtype=a.dtype) - lr * a, steps)
    expected = optimum + contraction @ (objective.theta - optimum)
    torch.testing.assert_close(r["theta"], expected, rtol=0, atol=1e-12)
    assert r["steps"] == steps
    assert r["gradient_norm"] == pytest.approx(float((a @ (expected - optimum)).norm()), rel=1e-8)


def test_true_mode_matches_the_softmax_regression_path():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=gen)
    fit = fit_softmax_regression(x, y, 0.01, num_classes=3, tol=1e-12)
    model = nn.Linear(6, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(fit.weights)
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.01)
    hessian = objective.hessian()
    removed = [0, 17, 99]
    reference = refit_leave_one_out(SoftmaxRefitProblem(x, y, 0.01, fit.weights, torch.linalg.cholesky(hessian), tol=1e-12), removed)
    ours = retrain(objective, removed, mode="true", hessian=hessian, tol=1e-12)
    for ref in reference:
        torch.testing.assert_close(ours[ref["removed"]]["theta"], ref["weights"].reshape(-1), rtol=0, atol=1e-10)
    # and the measured loss change is what the softmax path's weights give
    test = (x[:5], y[:5])
    change = measurements_at(objective, ours[17]["theta"], test) - measurements_at(objective, objective.theta, test)
    assert change.abs().max() > 1e-6


def test_indefinite_hessian_names_the_damping_needed():
    assert positive_definite_shift(-0.5, 10.0) == pytest.approx(0.5 + 1e-5)
    assert positive_definite_shift(0.2, 10.0) == 0.0
    x, y = _ridge()
    objective = _ridge_objective(x, y)
    fake = -torch.eye(objective.dim, dtype=torch.float64) * 0.25
    with pytest.raises(ValueError, match=r"damping >= 0\.25"):
        RetrainingProblem(objective, fake, mode="surrogate", damping=0.1)


def test_nonconvex_mlp_at_a_verified_optimum_retraining_matches_influence():
    from influencekit.curvature import DenseOperator
    from influencekit.scores.influence import InfluenceFunction
    from influencekit.models.fitting import fit_to_local_optimum
    from influencekit.solvers import CGSolver

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    # weight decay 1e-2: with 1e-3 some of the top points' refits move theta by ~2.5 (another
    # stationary point) and Pearson drops to 0.69, the fragility Basu et al. (2021) describe
    fit = fit_to_local_optimum(model, "cross_entropy", x, y, 1e-2, tol=1e-10, adam_epochs=100, adam_batch=50, adam_lr=1e-2)
    assert fit.at_local_optimum and fit.gradient_norm <= 1e-10 and fit.spectrum.negative == 0
    objective = fit.objective
    test = (x[:3] + 0.1, y[:3])
    scores = InfluenceFunction(objective, CGSolver(DenseOperator(fit.hessian), rtol=1e-12)).scores(test)
    chosen = [int(i) for i in scores.most_influential(15)[0]]
    refits = retrain(objective, chosen, mode="true", hessian=fit.hessian, tol=1e-10)
    assert all(refits[i]["converged"] for i in chosen)
    thetas = torch.stack([refits[i]["theta"] for i in chosen])
    actual = measurements_at(objective, thetas, test)[:, 0] - measurements_at(objective, objective.theta, test)[0]
    predicted = scores.predicted_loss_change[0, chosen]
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] >= 0.97
    assert torch.sign(predicted).eq(torch.sign(actual)).float().mean() >= 0.9
