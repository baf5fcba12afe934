"""iHVP solvers against closed forms and explicit solves (scale-sensitive: relative errors)."""

import math

import pytest
import torch
from torch import nn

from influencekit import (
    CGSolver,
    DenseOperator,
    DirectSolver,
    HessianOperator,
    LiSSASolver,
    LiSSADivergenceError,
    NotPositiveDefiniteError,
    SoftmaxRegressionObjective,
    TorchObjective,
)
from influencekit.curvature import CurvatureOperator, extreme_eigenvalues, spectrum_summary


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_regression(n: int, d: int, condition: float, weight_decay: float, seed: int = 0):
    """Linear least squares with inputs whose covariance has the given condition number."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    x = z @ torch.diag(torch.logspace(0, -0.5 * math.log10(condition), d, dtype=torch.float64)) @ q.T
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    objective = TorchObjective(model, "squared_error", (x, y), weight_decay=weight_decay, chunk_size=64)
    closed_form = x.T @ x / n + weight_decay * torch.eye(d, dtype=torch.float64)
    return objective, closed_form


@pytest.mark.parametrize(
    "condition, weight_decay, damping", [(10.0, 0.0, 0.0), (1e4, 0.0, 1e-3), (1e5, 1e-4, 0.0), (1e4, 1e-2, 1e-3)]
)
def test_direct_and_cg_match_closed_form(condition, weight_decay, damping):
    objective, h = linear_regression(400, 12, condition, weight_decay)
    rhs = torch.randn(5, 12, dtype=torch.float64)
    damped = h + damping * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.solve(damped, rhs.T).T
    assert torch.linalg.cond(damped) > 5 or condition == 10.0
    curvature = HessianOperator(objective)
    direct = DirectSolver(curvature, damping=damping).solve(rhs)
    assert rel_err(direct.solution, expected) <= 1e-10
    cg = CGSolver(curvature, damping=damping, rtol=1e-13, maxiter=500).solve(rhs)
    assert rel_err(cg.solution, expected) <= 1e-8
    assert bool(cg.info["converged"].all())
    assert torch.all(cg.residual_norms <= 1e-12 * rhs.norm(dim=1) * 10)
    assert torch.all(cg.iterations <= 3 * 12)  # p iterations in exact arithmetic; rounding costs a few more


def test_ill_conditioned_case_is_really_ill_conditioned():
    _, h = linear_regression(400, 12, 1e4, 0.0)
    assert float(torch.linalg.cond(h)) >= 1e4


def test_lissa_matches_closed_form_with_suitable_settings():
    objective, h = linear_regression(400, 12, 10.0, 1e-2)
    curvature = HessianOperator(objective)
    rhs = torch.randn(3, 12, dtype=torch.float64)
    expected = torch.linalg.solve(h + 1e-3 * torch.eye(12, dtype=torch.float64), rhs.T).T
    # a scale 4x the largest curvature takes smaller steps, which damps the sampling noise
    solver = LiSSASolver(curvature, scale=6.0, damping=1e-3, depth=500, repeats=16, batch_size=400, seed=1, progress=False)
    result = solver.solve(rhs)
    assert rel_err(result.solution, expected) <= 1e-2
    assert result.info["norm_trace"].shape == (500, 3)
    # the trace converges: the last steps barely move
    trace = result.info["norm_trace"]
    assert float(((trace[-1] - trace[-100]).abs() / trace[-1]).max()) < 3e-2


def test_lissa_with_full_batches_is_the_deterministic_neumann_series():
    objective, h = linear_regression(50, 6, 10.0, 1e-1)
    curvature = HessianOperator(objective)
    rhs = torch.randn(2, 6, dtype=torch.float64)
    scale, depth = 3.0, 40
    solver = LiSSASolver(curvature, scale=scale, depth=depth, repeats=1, batch_size=50, progress=False)
    # sampling with replacement: replicate the indices the solver draws and build the same recursion explicitly
    indices = solver.sample_indices()[0]
    h_explicit = rhs.clone()
    x, y = objective.train.materialize()
    for step in range(depth):
        xb = x[indices[step]]
        hb = xb.T @ xb / xb.shape[0] + 0.1 * torch.eye(6, dtype=torch.float64)
        h_explicit = rhs + h_explicit - h_explicit @ hb / scale
    torch.testing.assert_close(solver.solve(rhs).solution, h_explicit / scale, rtol=1e-12, atol=1e-14)


def test_lissa_too_small_scale_raises_divergence_error_not_nan():
    objective, _ = linear_regression(200, 8, 100.0, 0.0)
    curvature = HessianOperator(objective)
    solver = LiSSASolver(curvature, scale=0.05, depth=2000, repeats=2, batch_size=4, progress=False)
    with pytest.raises(LiSSADivergenceError) as excinfo:
        solver.solve(torch.randn(1, 8, dtype=torch.float64))
    err = excinfo.value
    assert err.step < 200
    assert err.suggested_scale > 0.05
    assert "scale >=" in str(err)
    # the suggested scale works
    LiSSASolver(curvature, scale=err.suggested_scale, depth=50, repeats=2, batch_size=4, progress=False).solve(
        torch.randn(1, 8, dtype=torch.float64)
    )


def test_lissa_repeats_are_reproducible_in_pieces():
    objective, _ = linear_regression(100, 5, 10.0, 1e-2)
    curvature = HessianOperator(objective)
    rhs = torch.randn(2, 5, dtype=torch.float64)
    kwargs = dict(scale=20.0, depth=60, batch_size=3, seed=7, progress=False, measure_residuals=False)
    whole = LiSSASolver(curvature, repeats=4, **kwargs).solve(rhs).solution
    parts = [LiSSASolver(curvature, repeats=2, first_repeat=r, **kwargs).solve(rhs).solution for r in (0, 2)]
    torch.testing.assert_close(whole, (parts[0] + parts[1]) / 2, rtol=1e-13, atol=1e-15)


def test_lissa_many_right_hand_sides_share_each_repeats_mini_batch():
    # k = 3 right-hand sides, T = 2 repeats, softmax regression (its shared-batch GEMM path): each
    # repeat's recursion, rebuilt with the explicit Hessian of each drawn mini-batch, averaged
    gen = torch.Generator().manual_seed(8)
    x, y = torch.rand(40, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    objective = SoftmaxRegressionObjective(weights, x, y, weight_decay=0.05)
    rhs = torch.randn(3, 15, generator=gen, dtype=torch.float64)
    scale, damping, depth = 2.0, 0.1, 30
    solver = LiSSASolver(HessianOperator(objective), scale=scale, damping=damping, depth=depth, repeats=2, batch_size=4,
                         seed=3, progress=False)
    indices = solver.sample_indices()  # (T, J, B)
    expected = torch.zeros_like(rhs)
    for repeat in range(2):
        h = rhs.clone()
        for step in range(depth):
            batch = indices[repeat, step]
            hessian = SoftmaxRegressionObjective(weights, x[batch], y[batch], weight_decay=0.05).hessian()
            h = rhs + (1 - damping / scale) * h - h @ hessian / scale
        expected += h / scale / 2
    result = solver.solve(rhs)
    torch.testing.assert_close(result.solution, expected, rtol=1e-12, atol=1e-14)
    # one right-hand side at a time (a mini-batch per row) gives the same rows
    for j in range(3):
        torch.testing.assert_close(solver.solve(rhs[j : j + 1]).solution[0], expected[j], rtol=1e-12, atol=1e-14)
    assert float(result.solution.norm()) > 0.1 * float(rhs.norm())


def fit(model: nn.Module, x, y, weight_decay: float, steps: int = 200):
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@pytest.fixture(scope="module")
def logistic_problem():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    y = (x[:, :3] + 0.5 * torch.randn(300, 3, generator=gen, dtype=torch.float64)).argmax(1)
    model = fit(nn.Linear(8, 3, bias=False).double(), x, y, 1e-2)
    return SoftmaxRegressionObjective(model.weight.detach(), x, y, 1e-2)


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    y = (x[:, :3] ** 2).argmax(1)
    model = fit(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(), x, y, 1e-3, steps=500)
    return TorchObjective(model, "cross_entropy", (x, y), weight_decay=1e-3, chunk_size=64)


@pytest.mark.parametrize("problem, damping", [("logistic_problem", 0.0), ("mlp_problem", 0.05)])
def test_every_solver_against_direct(problem, damping, request):
    objective = request.getfixturevalue(problem)
    curvature = HessianOperator(objective)
    rhs = objective.measurement_gradients(objective.train.materialize() if hasattr(objective, "train") else (objective.inputs[:4], objective.targets[:4]))[:4]
    direct = DirectSolver(curvature, damping=damping)
    expected = direct.solve(rhs).solution
    cg = CGSolver(curvature, damping=damping, rtol=1e-12).solve(rhs)
    assert rel_err(cg.solution, expected) <= 1e-8
    # mini-batches as large as the data set keep the sampling noise small
    n = objective.n_train
    lissa = LiSSASolver(curvature, scale="auto", damping=damping, depth=1000, repeats=16, batch_size=n, seed=0, progress=False)
    result = lissa.solve(rhs)
    assert rel_err(result.solution, expected) <= 5e-2  # LiSSA noise ~ 1/sqrt(repeats); 1e-2 is tested on least squares
    assert torch.all(result.relative_residuals(rhs) < 0.1)


def test_direct_reports_negative_eigenvalues_of_indefinite_curvature():
    eigenvalues = torch.tensor([-0.5, -0.01, 0.2, 1.0, 3.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    matrix = q @ torch.diag(eigenvalues) @ q.T
    with pytest.raises(NotPositiveDefiniteError) as excinfo:
        DirectSolver(DenseOperator(matrix))
    err = excinfo.value
    assert len(err.negative_eigenvalues) == 2
    assert err.smallest == pytest.approx(-0.5, rel=1e-10)
    assert "-0.5" in str(err) and "damping >=" in str(err)
    # the suggested damping makes it solvable
    DirectSolver(DenseOperator(matrix), damping=err.suggested_damping)


def test_untrained_mlp_has_indefinite_hessian_and_direct_says_so(mlp_problem):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = mlp_problem.train.materialize()
    objective = TorchObjective(model, "cross_entropy", (x, 2 - y))
    summary = spectrum_summary(torch.linalg.eigvalsh(objective.hessian()))
    if summary.negative == 0:
        pytest.skip("this random init happens to be convex")
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        DirectSolver(HessianOperator(objective))


def test_spectrum_summary_counts_and_lanczos_extremes():
    eigenvalues = torch.tensor([-2.0, 0.0, 0.5, 0.25, 1.0, 7.0], dtype=torch.float64)
    summary = spectrum_summary(eigenvalues)
    assert (summary.negative, summary.zero, summary.between_zero_and_one, summary.at_least_one) == (1, 1, 2, 2)
    assert summary.min == -2.0 and summary.max == 7.0 and summary.condition_number == float("inf")
    assert "| 1 | 1 | 2 | 2 |" in summary.table()
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    eig = torch.linspace(0.1, 9.0, 40, dtype=torch.float64)
    lo, hi = extreme_eigenvalues(DenseOperator(q @ torch.diag(eig) @ q.T))
    assert lo == pytest.approx(0.1, rel=1e-8) and hi == pytest.approx(9.0, rel=1e-8)


def test_direct_factorised_in_place_equals_the_explicit_solve_and_measures_exact_residuals():
    objective, h = linear_regression(300, 10, 1e3, 1e-3)
    rhs = torch.randn(4, 10, dtype=torch.float64)
    curvature = HessianOperator(objective)
    damping = 1e-2
    expected = torch.linalg.solve(h + damping * torch.eye(10, dtype=torch.float64), rhs.T).T
    in_place = DirectSolver(curvature, damping=damping, overwrite_matrix=True)
    result = in_place.solve(rhs)
    assert rel_err(result.solution, expected) <= 1e-10
    true_residuals = ((h + damping * torch.eye(10, dtype=torch.float64)) @ result.solution.T).T - rhs
    assert torch.allclose(result.residual_norms, true_residuals.norm(dim=1), rtol=0, atol=1e-12)
    assert in_place.matrix is None
    with pytest.raises(ValueError, match="in place"):
        in_place.spectrum()
    with pytest.raises(ValueError, match="DenseOperator"):
        DirectSolver(DenseOperator(h), overwrite_matrix=True)


def test_direct_factorised_in_place_still_names_the_damping_that_fixes_an_indefinite_curvature():
    eigenvalues = torch.tensor([-0.5, -0.01, 0.2, 1.0, 3.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    matrix = q @ torch.diag(eigenvalues) @ q.T

    class Products(CurvatureOperator):  # builds a fresh matrix from products, as Hessian operators do
        dim, dtype = 5, torch.float64

        def matvec(self, vectors):
            return vectors @ matrix

    with pytest.raises(NotPositiveDefiniteError) as excinfo:
        DirectSolver(Products(), overwrite_matrix=True)
    assert excinfo.value.smallest == pytest.approx(-0.5, rel=1e-10)
    assert len(excinfo.value.negative_eigenvalues) == 2
