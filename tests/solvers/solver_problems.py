"""Test problems shared by the solver tests: explicit operators with known, awkward spectra, and exact solves."""

import torch

from influencekit import SoftmaxRegressionObjective
from influencekit.curvature import CurvatureOperator, DenseOperator, HessianOperator

F64 = torch.float64
DAMPING = 1e-5


def ill_conditioned_hessian(n: int = 200, d: int = 12, c: int = 4, seed: int = 0) -> HessianOperator:
    """Softmax regression whose inputs have condition number ~1e4 (feature scales 1 .. 1e-4); p = c d = 48.

    Its Hessian has the eigenvalue weight_decay = 1e-6 with multiplicity d (softmax is
    invariant to adding one vector to every class row), which forces Arnoldi restarts.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) * torch.logspace(0, -4, d, dtype=F64)
    assert torch.linalg.cond(x) >= 1e4
    y = torch.randint(0, c, (n,), generator=gen)
    w = 0.5 * torch.randn(c, d, generator=gen, dtype=F64)
    return HessianOperator(SoftmaxRegressionObjective(w, x, y, weight_decay=1e-6))


def decaying_spd_operator(p: int = 30, seed: int = 1) -> DenseOperator:
    """Explicit SPD matrix with eigenvalues 1 .. 1e-5 (distinct, decaying) in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    return DenseOperator((q * torch.logspace(0, -5, p, dtype=F64)) @ q.T)


def exact_solution(curvature: CurvatureOperator, damping: float, rhs: torch.Tensor) -> torch.Tensor:
    """Rows (M + damping I)^{-1} b_j by an explicit float64 solve."""
    damped = curvature.to_dense() + damping * torch.eye(curvature.dim, dtype=F64)
    return torch.linalg.solve(damped, rhs.T).T


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((x - reference).norm(dim=1) / reference.norm(dim=1)).max())


def random_rhs(k: int, p: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)
