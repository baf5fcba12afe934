"""Influence scores: sign, scale and the README's worked example, against closed forms and actual retraining."""

import torch
from torch import nn

from influencekit import CGSolver, DirectSolver, HessianOperator, InfluenceFunction, TorchObjective


def ridge_problem(n=200, d=3, weight_decay=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:d, None] + 0.3 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def ridge_fit(x, y, weight_decay):
    n, d = x.shape
    return torch.linalg.solve(x.T @ x / n + weight_decay * torch.eye(d, dtype=x.dtype), x.T @ y / n)


def objective_at(w, x, y, weight_decay):
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.T)
    return TorchObjective(model, "squared_error", (x, y), weight_decay=weight_decay)


def test_readme_worked_example_one_feature_ridge():
    x, y = ridge_problem(d=1)
    lam, n = 0.1, len(y)
    w = ridge_fit(x, y, lam)
    objective = objective_at(w, x, y, lam)
    x_test, y_test = torch.tensor([[1.5]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)
    scores = InfluenceFunction(objective, DirectSolver(HessianOperator(objective))).scores((x_test, y_test))
    h = float((x**2).mean()) + lam
    g_test = float((x_test * w - y_test) * x_test)
    g_train = ((x * w - y) * x + lam * w).reshape(-1)
    expected = -g_test * g_train / h
    torch.testing.assert_close(scores.influence_on_loss[0], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scores.predicted_loss_change[0], -expected / n, rtol=1e-12, atol=1e-16)


def test_predicted_change_matches_actual_leave_one_out_retraining():
    x, y = ridge_problem()
    lam, n = 0.1, len(y)
    w = ridge_fit(x, y, lam)
    objective = objective_at(w, x, y, lam)
    x_test, y_test = torch.tensor([[0.5, 1.0, -1.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    for solver in (DirectSolver(HessianOperator(objective)), CGSolver(HessianOperator(objective), rtol=1e-12)):
        predicted = InfluenceFunction(objective, solver).scores((x_test, y_test)).predicted_loss_change[0]
        base = 0.5 * float((x_test @ w - y_test) ** 2)
        actual = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            keep = torch.arange(n) != i
            w_i = ridge_fit(x[keep], y[keep], lam)
            actual[i] = 0.5 * float((x_test @ w_i - y_test) ** 2) - base
        # first-order agreement: same sign on the large effects, error O(1/n^2) vs effects O(1/n)
        big = actual.abs() > actual.abs().quantile(0.5)
        assert torch.all(torch.sign(predicted[big]) == torch.sign(actual[big]))
        assert float((predicted - actual).norm() / actual.norm()) < 0.05
        assert float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1]) > 0.99


def test_top_k_helpful_and_harmful_follow_the_sign_convention():
    x, y = ridge_problem()
    w = ridge_fit(x, y, 0.1)
    objective = objective_at(w, x, y, 0.1)
    scores = InfluenceFunction(objective, DirectSolver(HessianOperator(objective))).scores((x[:2] + 0.1, y[:2]))
    top = scores.top_k(5)
    infl = scores.influence_on_loss
    assert torch.all(top.helpful_influence[:, 0] == infl.min(dim=1).values)
    assert torch.all(top.harmful_influence[:, 0] == infl.max(dim=1).values)
    # removing a helpful point is predicted to raise the test loss
    assert torch.all(scores.predicted_loss_change.gather(1, top.helpful_indices) > 0)
    assert torch.all(scores.most_influential(3)[:, 0] == infl.abs().argmax(dim=1))


def test_influence_on_params_and_self_influence_match_explicit_formulas():
    x, y = ridge_problem()
    lam = 0.1
    w = ridge_fit(x, y, lam)
    objective = objective_at(w, x, y, lam)
    influence = InfluenceFunction(objective, DirectSolver(HessianOperator(objective)))
    h = x.T @ x / len(y) + lam * torch.eye(3, dtype=torch.float64)
    idx = torch.tensor([0, 7, 99])
    g_loss = (x[idx] @ w - y[idx]) * x[idx]
    g_train = g_loss + lam * w.T
    torch.testing.assert_close(influence.influence_on_params(idx), -torch.linalg.solve(h, g_train.T).T, rtol=1e-12, atol=1e-14)
    expected_self = -(g_loss * torch.linalg.solve(h, g_train.T).T).sum(1)
    torch.testing.assert_close(influence.self_influence(idx), expected_self, rtol=1e-12, atol=1e-14)
