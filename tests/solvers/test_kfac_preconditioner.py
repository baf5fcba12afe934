"""K-FAC as a CG preconditioner: PCG on the exact Hessian of nn.Modules against explicit float64 solves."""

import pytest
import torch
from torch import nn

from influencekit.curvature import HessianOperator, KFACCurvature
from influencekit.objectives import TorchObjective
from influencekit.solvers import CGSolver, KFACPreconditioner, SingularKFACError
from solver_problems import F64, relative_error


def softmax_regression(weight_decay: float = 1e-2, n: int = 400, d: int = 30, c: int = 5) -> TorchObjective:
    """nn.Linear softmax regression on inputs with unequal feature scales (1 .. 1e-2) at a random point."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=F64) * torch.logspace(0, -2, d, dtype=F64) + 0.3
    y = torch.randint(0, c, (n,), generator=gen)
    model = nn.Linear(d, c).double().eval()
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(c, d, generator=gen, dtype=F64))
        model.bias.copy_(0.1 * torch.randn(c, generator=gen, dtype=F64))
    return TorchObjective(model, "cross_entropy", (x, y), weight_decay=weight_decay, chunk_size=128)


def tanh_mlp(weight_decay: float = 1e-3) -> TorchObjective:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (300,), generator=gen)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double().eval()
    return TorchObjective(model, "cross_entropy", (x, y), weight_decay=weight_decay, chunk_size=128)


def rhs(objective: TorchObjective, k: int = 3) -> torch.Tensor:
    return torch.randn(k, objective.dim, generator=torch.Generator().manual_seed(5), dtype=F64)


# the random MLP is off its optimum: lambda_min(H) = -0.12, so it gets damping 0.2
@pytest.mark.parametrize("make, damping", [(softmax_regression, 0.0), (tanh_mlp, 0.2)])
def test_kfac_preconditioned_cg_matches_the_explicit_solve_in_fewer_iterations(make, damping):
    objective = make()
    hessian = objective.hessian()
    b = rhs(objective)
    exact = torch.linalg.solve(hessian + damping * torch.eye(objective.dim, dtype=F64), b.T).T
    operator = HessianOperator(objective)
    plain = CGSolver(operator, damping=damping, rtol=1e-10, maxiter=1000).solve(b)
    preconditioner = KFACPreconditioner(objective, damping=damping)
    preconditioned = CGSolver(operator, damping=damping, rtol=1e-10, maxiter=1000, preconditioner=preconditioner).solve(b)
    assert relative_error(plain.solution, exact) <= 1e-8
    assert relative_error(preconditioned.solution, exact) <= 1e-8
    assert int(preconditioned.iterations.max()) < int(plain.iterations.min())
    assert preconditioner.setup_seconds > 0


def test_kfac_preconditioner_inverts_its_own_kronecker_approximation():
    """P^{-1} applied to P v gives v back, with P rebuilt densely from the fitted factors: kron(S, A) + lambda + damping."""
    objective = softmax_regression()
    preconditioner = KFACPreconditioner(objective, damping=0.05)
    (layer,) = preconditioner.approximation.layers
    factors = preconditioner.approximation.factors[layer.name]
    a = (factors.eigenvectors_A * factors.eigenvalues_A) @ factors.eigenvectors_A.T
    s = (factors.eigenvectors_S * factors.eigenvalues_S) @ factors.eigenvectors_S.T
    torch.testing.assert_close(a, factors.A, rtol=1e-10, atol=1e-12)
    dense = torch.kron(s, a) + (objective.weight_decay + 0.05) * torch.eye(objective.dim, dtype=F64)
    # the layer's V (out, columns = [inputs, 1]) row-major, as positions in theta
    order = layer.theta_indices()
    v = rhs(objective, 2)
    applied = torch.zeros_like(v)
    applied[:, order] = (dense @ v[:, order].T).T
    torch.testing.assert_close(preconditioner(applied), v, rtol=1e-10, atol=1e-10)


def test_kfac_preconditioner_round_trips_through_save_and_load(tmp_path):
    objective = tanh_mlp()
    preconditioner = KFACPreconditioner(objective, damping=0.1)
    loaded = KFACPreconditioner.load(preconditioner.save(tmp_path / "kfac"), objective)
    v = rhs(objective)
    torch.testing.assert_close(loaded(v), preconditioner(v), rtol=0, atol=0)
    assert loaded.damping == 0.1


def test_singular_kfac_preconditioner_names_the_damping_it_needs():
    """Cross-entropy's output Hessian always has the null vector 1, so S is singular without weight decay or damping."""
    with pytest.raises(SingularKFACError, match=r"pass damping >= \d"):
        KFACPreconditioner(softmax_regression(weight_decay=0.0), damping=0.0)


def test_factors_from_a_subset_are_those_of_the_subset_and_leave_the_cg_answer_unchanged(tmp_path):
    objective = softmax_regression()
    subset = KFACCurvature(objective, fit_examples=100, seed=3, chunk_size=64).fit()
    indices = torch.randperm(objective.n_train, generator=torch.Generator().manual_seed(3))[:100].sort().values
    x, y = objective.train.materialize()
    on_subset = TorchObjective(objective.model, "cross_entropy", (x[indices], y[indices]), weight_decay=objective.weight_decay)
    reference = KFACCurvature(on_subset).fit()
    assert subset.n_examples == 100
    for name, factors in subset.factors.items():
        torch.testing.assert_close(factors.A, reference.factors[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(factors.S, reference.factors[name].S, rtol=1e-12, atol=1e-14)
    assert KFACCurvature(objective, fit_examples=objective.n_train + 5).fit_examples is None  # all of them

    b = rhs(objective)
    exact = torch.linalg.solve(objective.hessian(), b.T).T
    preconditioner = KFACPreconditioner(subset)
    solved = CGSolver(HessianOperator(objective), rtol=1e-10, maxiter=1000, preconditioner=preconditioner).solve(b)
    assert relative_error(solved.solution, exact) <= 1e-8
    loaded = KFACPreconditioner.load(preconditioner.save(tmp_path / "subset"), objective)
    assert loaded.approximation.n_examples == 100
    torch.testing.assert_close(loaded(b), preconditioner(b), rtol=0, atol=0)
