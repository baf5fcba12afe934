"""Perturbation influence against finite differences of loop-autograd gradients and exact re-training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influencekit import DirectSolver, HessianOperator, InfluenceFunction, TorchObjective
from influencekit.scores.perturbation import perturbation_influence, perturbation_influence_from_inverse_hvp

DTYPE = torch.float64
N, WD = 11, 0.1


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N,), generator=gen)
    test = (torch.randn(2, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (2,), generator=gen))
    return model, x, y, test


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_theta CE(model(x), y) for one example, by plain autograd on the module."""
    value = F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])


def test_matches_finite_differences_of_training_gradients():
    model, x, y, (x_test, y_test) = make_problem()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=4)
    damping = 1.0  # the untrained MLP's Hessian is indefinite; damping makes H + damping I positive definite
    indices = torch.tensor([0, 3, 10, 3])
    got = perturbation_influence(objective, DirectSolver(HessianOperator(objective), damping=damping), (x_test, y_test), indices)
    assert got.shape == (2, 4, 4)

    # Independent s_test: explicit autograd Hessian, loop gradients of the test loss.
    theta = objective.parameters_vector()

    def risk(t):
        return objective.losses(t, (x, y)).mean() + 0.5 * WD * t @ t

    hessian = torch.autograd.functional.hessian(risk, theta) + damping * torch.eye(theta.numel(), dtype=DTYPE)
    assert float(torch.linalg.eigvalsh(hessian)[0]) > 0
    test_gradients = torch.stack([loss_gradient(model, x_test[t], y_test[t]) for t in range(2)])
    s_test = torch.linalg.solve(hessian, test_gradients.T).T

    eps = 1e-5
    gen = torch.Generator().manual_seed(7)
    for j, i in enumerate(indices.tolist()):
        u = torch.randn(4, generator=gen, dtype=DTYPE)
        difference = (loss_gradient(model, x[i] + eps * u, y[i]) - loss_gradient(model, x[i] - eps * u, y[i])) / (2 * eps)
        expected = -(s_test @ difference)  # (m_test,)
        torch.testing.assert_close((got[:, j] * u).sum(dim=1), expected, rtol=1e-6, atol=1e-9)


def test_predicts_the_effect_of_perturbing_an_input_and_retraining():
    """Ridge regression re-trained in closed form: d m_test / d delta = (1/n) <I_pert, u> exactly (first order)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 3, generator=gen, dtype=DTYPE), torch.randn(N, 2, generator=gen, dtype=DTYPE)
    x_test, y_test = torch.randn(2, 3, generator=gen, dtype=DTYPE), torch.randn(2, 2, generator=gen, dtype=DTYPE)

    def fit(inputs):
        """argmin (1/n) sum 0.5 ||W x + b - y||^2 + (lambda/2)(||W||^2 + ||b||^2), as (W, b)."""
        augmented = torch.cat([inputs, torch.ones(N, 1, dtype=DTYPE)], dim=1)
        gram = augmented.T @ augmented / N + WD * torch.eye(4, dtype=DTYPE)
        theta = torch.linalg.solve(gram, augmented.T @ y / N).T  # (2, 4)
        return theta[:, :3], theta[:, 3]

    def refit_test_losses(inputs):
        w, b = fit(inputs)
        return 0.5 * ((x_test @ w.T + b - y_test) ** 2).sum(dim=1)

    model = nn.Linear(3, 2).to(DTYPE)
    w, b = fit(x)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    objective = TorchObjective(model, "squared_error", (x, y), weight_decay=WD)
    assert objective.objective_gradient().norm() < 1e-12
    indices = [2, 7]
    got = perturbation_influence(objective, DirectSolver(HessianOperator(objective)), (x_test, y_test), indices)
    eps = 1e-5
    for j, i in enumerate(indices):
        u = torch.randn(3, generator=gen, dtype=DTYPE)
        plus, minus = x.clone(), x.clone()
        plus[i] += eps * u
        minus[i] -= eps * u
        derivative = (refit_test_losses(plus) - refit_test_losses(minus)) / (2 * eps)
        torch.testing.assert_close((got[:, j] * u).sum(dim=1) / N, derivative, rtol=1e-6, atol=1e-10)


def test_batch_layouts_chunking_and_reusing_the_solve_agree():
    model, x, y, test = make_problem()
    indices = torch.arange(N)

    def solver_for(objective):
        return DirectSolver(HessianOperator(objective), damping=1.0)

    tuple_objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=1000)
    reference = perturbation_influence(tuple_objective, solver_for(tuple_objective), test, indices)

    small_chunks = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=3)  # 1 example per chunk
    got = perturbation_influence(small_chunks, solver_for(small_chunks), test, indices)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-13)

    as_dict = TorchObjective(model, "cross_entropy", {"inputs": x, "targets": y}, weight_decay=WD)
    dict_test = {"inputs": test[0], "targets": test[1]}
    got = perturbation_influence(as_dict, solver_for(as_dict), dict_test, indices)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-13)

    def forward(call, batch):
        return call(batch["x"])

    def loss(outputs, batch):
        return F.cross_entropy(outputs, batch["label"], reduction="none")

    custom = TorchObjective(model, loss, {"label": y, "x": x}, weight_decay=WD, forward=forward)
    custom_test = {"label": test[1], "x": test[0]}
    got = perturbation_influence(custom, solver_for(custom), custom_test, indices, input_key="x")
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-13)

    solve = InfluenceFunction(tuple_objective, solver_for(tuple_objective)).inverse_hvp_of_test(test)
    reused = perturbation_influence_from_inverse_hvp(tuple_objective, solve.solution, indices)
    torch.testing.assert_close(reused, reference, rtol=0, atol=0)


def test_bad_input_key_and_shapes_are_refused_naming_the_fix():
    model, x, y, test = make_problem()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD)
    s_test = torch.randn(2, objective.dim, dtype=DTYPE)
    with pytest.raises(TypeError, match="floating-point"):
        perturbation_influence_from_inverse_hvp(objective, s_test, [0], input_key=1)
    with pytest.raises(KeyError, match="input_key"):
        perturbation_influence_from_inverse_hvp(objective, s_test, [0], input_key=2)
    with pytest.raises(ValueError, match=r"shape \(k, 43\)"):
        perturbation_influence_from_inverse_hvp(objective, s_test[:, :5], [0])
    as_dict = TorchObjective(
        model, lambda o, b: F.cross_entropy(o, b["t"], reduction="none"), {"x": x, "t": y}, forward=lambda c, b: c(b["x"])
    )
    with pytest.raises(KeyError, match="'inputs' entry or an input_key"):
        perturbation_influence_from_inverse_hvp(as_dict, s_test, [0])
