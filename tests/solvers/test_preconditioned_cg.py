"""Jacobi and Nystroem preconditioners: their construction, PCG against explicit float64 solves, save/load."""

import pytest
import torch

from influencekit.curvature import CurvatureOperator, DenseOperator
from influencekit.solvers import (
    BlockCGSolver,
    CGSolver,
    JacobiPreconditioner,
    NystromPreconditioner,
)
from solver_problems import DAMPING, exact_solution, F64, ill_conditioned_hessian


def spd_operator(p: int = 30, seed: int = 1) -> DenseOperator:
    """Explicit SPD matrix S Q diag(1 .. 1e-3) Q^T S with random orthogonal Q and badly scaled S = diag(1 .. 1e-2)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    scale = torch.logspace(0, -2, p, dtype=F64)
    matrix = (q * torch.logspace(0, -3, p, dtype=F64)) @ q.T
    return DenseOperator(scale[:, None] * matrix * scale[None, :])


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((x - reference).norm(dim=1) / reference.norm(dim=1)).max())


def random_rhs(k: int, p: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


class CountingOperator(CurvatureOperator):
    """Wraps an operator and records the shape of every matvec block."""

    def __init__(self, inner: CurvatureOperator):
        self.inner, self.dim, self.dtype = inner, inner.dim, inner.dtype
        self.calls: list[tuple[int, ...]] = []

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(vectors.shape))
        return self.inner.matvec(vectors)


# -- Jacobi -------------------------------------------------------------------------------


def test_hutchinson_uses_one_block_product_and_is_exact_on_a_diagonal_matrix():
    diagonal = torch.linspace(0.5, 3.0, 30, dtype=F64)
    counting = CountingOperator(DenseOperator(torch.diag(diagonal)))
    preconditioner = JacobiPreconditioner(counting, damping=0.25, num_probes=7, seed=3)
    assert counting.calls == [(7, 30)]
    torch.testing.assert_close(preconditioner.diagonal, diagonal, rtol=0, atol=1e-15)  # z * (D z) = z^2 d = d
    v = random_rhs(3, 30)
    torch.testing.assert_close(preconditioner(v), v / (diagonal + 0.25), rtol=1e-15, atol=0)


def test_hutchinson_estimate_approaches_the_diagonal():
    curvature = ill_conditioned_hessian()
    true = curvature.to_dense().diagonal()
    few = JacobiPreconditioner(curvature, num_probes=16, seed=0).diagonal
    many = JacobiPreconditioner(curvature, num_probes=4096, seed=0).diagonal
    assert (many - true).norm() < 0.25 * (few - true).norm()


@pytest.mark.parametrize("make", [ill_conditioned_hessian, spd_operator])
def test_exact_jacobi_diagonal(make):
    curvature = make()
    exact = JacobiPreconditioner(curvature, damping=DAMPING, exact=True, block_size=7)
    torch.testing.assert_close(exact.diagonal, curvature.to_dense().diagonal(), rtol=1e-12, atol=1e-15)
    assert exact.clamped == 0


def test_jacobi_replaces_non_positive_estimates_by_the_mean():
    # PSD, but z * (M z) in entry 0 is 0.1 - 0.5 < 0 whenever the two probe signs differ
    curvature = DenseOperator(torch.tensor([[0.1, 0.5], [0.5, 10.0]], dtype=F64))
    for seed in range(20):
        preconditioner = JacobiPreconditioner(curvature, num_probes=1, seed=seed)
        if float(preconditioner.diagonal[0]) < 0:
            break
    torch.testing.assert_close(preconditioner.diagonal, torch.tensor([-0.4, 9.5], dtype=F64))
    assert preconditioner.clamped == 1
    torch.testing.assert_close(preconditioner.inverse, 1 / torch.tensor([(0.4 + 9.5) / 2, 9.5], dtype=F64))


# -- Nystroem -----------------------------------------------------------------------------


def test_nystrom_preconditioner_matches_its_formula():
    curvature = spd_operator(p=20)
    preconditioner = NystromPreconditioner(curvature, rank=6, damping=1e-3, seed=4)
    u, lam = preconditioner.approximation.eigenvectors, preconditioner.approximation.eigenvalues
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=F64), rtol=0, atol=1e-13)
    explicit = (lam[-1] + 1e-3) * (u / (lam + 1e-3)) @ u.T + torch.eye(20, dtype=F64) - u @ u.T
    v = random_rhs(4, 20)
    torch.testing.assert_close(preconditioner(v), v @ explicit, rtol=1e-12, atol=1e-14)
    # with r = p the preconditioned matrix P^{-1}(M + mu I) is (lambda_p + mu) I
    full = NystromPreconditioner(curvature, rank=20, damping=1e-3)
    damped = curvature.matrix + 1e-3 * torch.eye(20, dtype=F64)
    eig = torch.linalg.eigvals(full(torch.eye(20, dtype=F64)) @ damped).real
    assert float(eig.max() / eig.min()) < 1 + 1e-6


def test_nystrom_preconditioner_refuses_a_singular_sketch():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(10, 3, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="damping > 0"):
        NystromPreconditioner(DenseOperator(low_rank @ low_rank.T), rank=5, damping=0.0)


# -- PCG against explicit solves -----------------------------------------------------------


def preconditioners(curvature: CurvatureOperator) -> dict[str, object]:
    return {
        "jacobi-hutchinson": JacobiPreconditioner(curvature, damping=DAMPING, num_probes=64, seed=0),
        "jacobi-exact": JacobiPreconditioner(curvature, damping=DAMPING, exact=True),
        "nystrom": NystromPreconditioner(curvature, rank=16, damping=DAMPING, seed=0),
    }


@pytest.mark.parametrize("make", [ill_conditioned_hessian, spd_operator])
@pytest.mark.parametrize("solver_class", [CGSolver, BlockCGSolver])
def test_preconditioned_solvers_reach_the_explicit_solution(make, solver_class):
    curvature = make()
    for k in (1, 3):
        rhs = random_rhs(k, curvature.dim)
        truth = exact_solution(curvature, DAMPING, rhs)
        for name, preconditioner in preconditioners(curvature).items():
            result = solver_class(curvature, damping=DAMPING, rtol=1e-12, preconditioner=preconditioner).solve(rhs)
            assert relative_error(result.solution, truth) <= 1e-8, (name, k)
            assert bool((result.relative_residuals(rhs) <= 1e-10).all()), (name, k)


def test_nystrom_pcg_needs_far_fewer_iterations_on_the_ill_conditioned_hessian():
    curvature = ill_conditioned_hessian()
    rhs = random_rhs(4, curvature.dim)
    plain = CGSolver(curvature, damping=DAMPING, rtol=1e-12).solve(rhs)
    preconditioner = NystromPreconditioner(curvature, rank=24, damping=DAMPING, seed=0)
    preconditioned = CGSolver(curvature, damping=DAMPING, rtol=1e-12, preconditioner=preconditioner).solve(rhs)
    assert bool(plain.info["converged"].all()) and bool(preconditioned.info["converged"].all())
    assert int(preconditioned.iterations.max()) * 3 <= int(plain.iterations.min())


# -- persistence ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jacobi-hutchinson", "jacobi-exact", "nystrom"])
def test_save_load_round_trip_gives_identical_solutions(kind, tmp_path):
    curvature = ill_conditioned_hessian()
    preconditioner = preconditioners(curvature)[kind]
    preconditioner.save(tmp_path / kind)
    loaded = type(preconditioner).load(tmp_path / kind, curvature)
    rhs = random_rhs(3, curvature.dim)
    assert torch.equal(loaded(rhs), preconditioner(rhs))
    first = CGSolver(curvature, damping=DAMPING, rtol=1e-12, preconditioner=preconditioner).solve(rhs)
    second = CGSolver(curvature, damping=DAMPING, rtol=1e-12, preconditioner=loaded).solve(rhs)
    assert torch.equal(first.solution, second.solution)


def test_load_checks_kind_and_dimension(tmp_path):
    curvature = spd_operator(p=12)
    JacobiPreconditioner(curvature, damping=DAMPING).save(tmp_path / "jacobi")
    with pytest.raises(ValueError, match="JacobiPreconditioner"):
        NystromPreconditioner.load(tmp_path / "jacobi")
    with pytest.raises(ValueError, match="p = 12"):
        JacobiPreconditioner.load(tmp_path / "jacobi", spd_operator(p=10))
    with pytest.raises(FileNotFoundError):
        JacobiPreconditioner.load(tmp_path / "missing")
