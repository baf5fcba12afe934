"""Randomized Nystroem approximation of a curvature, and the Nystroem sketch-and-solve iHVP.

Randomized Nystroem approximation (Frangella, Tropp & Udell 2023, Algorithm 2.1)
of a symmetric positive semi-definite M (p x p) with rank r:

    Omega = qr(Gaussian (p, r))                    orthonormal test matrix
    Y     = M Omega                                one block product with r vectors
    nu    = sqrt(p) eps(dtype) ||Y||_2             shift for numerical stability
    Y_nu  = Y + nu Omega                           sketch of M + nu I
    L L^T = Omega^T Y_nu                           Cholesky
    B     = Y_nu L^{-T};  B = U Sigma V^T          thin SVD
    Lambda_hat = max(Sigma^2 - nu, 0)

giving M_nys = U Lambda_hat U^T = (M Omega)(Omega^T M Omega)^+ (M Omega)^T (up to the
shift), with U (p, r) orthonormal and Lambda_hat descending. M_nys <= M in the
positive semi-definite order, and M_nys = M when r = p.

:class:`NystromSketchSolver` (Hataya & Yamada 2023) replaces M by M_nys and inverts
M_nys + damping I exactly by the Woodbury identity:

    x = U (Lambda_hat + damping)^{-1} U^T b + (b - U U^T b) / damping .

The component of b outside range(U) is divided by the damping alone: the sketch
sees no curvature there. The error therefore shrinks as the rank grows and
vanishes at r = p.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.linalg import check_directions
from influencekit.persistence import load_checked, save_tensors
from influencekit.solvers.base import SolveResult, Solver


@dataclass(frozen=True)
class NystromApproximation:
    """M ~ U diag(eigenvalues) U^T.

    Attributes:
        eigenvectors: U, shape (p, r), orthonormal columns.
        eigenvalues: Lambda_hat, shape (r,), non-negative, descending.
        shift: the stabilising shift nu used in the construction.
    """

    eigenvectors: Tensor
    eigenvalues: Tensor
    shift: float


def randomized_nystrom(curvature: CurvatureOperator, rank: int, seed: int = 0) -> NystromApproximation:
    """Rank-``rank`` randomized Nystroem approximation of a positive semi-definite ``curvature``.

    Costs one ``matvec`` with a block of ``rank`` vectors plus O(p r^2) work.
    The Gaussian test matrix is drawn from ``torch.Generator().manual_seed(seed)``.

    Raises:
        ValueError: if ``rank`` is not in [1, p], or if Omega^T (M + nu I) Omega is not
            positive definite (M has clearly negative curvature: use a Gauss-Newton
            curvature, or a model at a minimum).
    """
    p = curvature.dim
    if not 1 <= rank <= p:
        raise ValueError(f"rank must be in [1, p = {p}], got {rank}")
    generator = torch.Generator().manual_seed(seed)
    omega, _ = torch.linalg.qr(torch.randn(p, rank, generator=generator, dtype=curvature.dtype))
    sketch = curvature.matvec(omega.T).T  # Y = M Omega, (p, r)
    shift = math.sqrt(p) * torch.finfo(curvature.dtype).eps * float(torch.linalg.matrix_norm(sketch, ord=2))
    shifted = sketch + shift * omega
    core = omega.T @ shifted
    factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if int(info) != 0:
        raise ValueError(
            "Omega^T M Omega is not positive definite: the randomized Nystroem approximation needs a positive "
            "semi-definite curvature (use a Gauss-Newton curvature or a model trained to a minimum)"
        )
    b = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # Y_nu L^{-T}, (p, r)
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return NystromApproximation(u.contiguous(), (sigma**2 - shift).clamp_min(0.0), shift)


class SavedNystrom:
    """Saving and loading for the objects built on a :class:`NystromApproximation` (the sketch solver and the
    preconditioner): U and Lambda as safetensors, rank, damping, seed and shift as JSON; loading goes
    through the constructor with the saved approximation, so nothing is sketched again."""

    rank: int
    damping: float
    seed: int
    dim: int
    approximation: NystromApproximation

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write U and Lambda (safetensors) and rank, damping, seed, shift (JSON) into ``directory``."""
        return save_tensors(
            directory,
            {"eigenvectors": self.approximation.eigenvectors, "eigenvalues": self.approximation.eigenvalues},
            {"class": type(self).__name__, "rank": self.rank, "damping": self.damping, "seed": self.seed,
             "shift": self.approximation.shift, "dim": self.dim},
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], curvature: CurvatureOperator | None = None) -> Any:
        """Rebuild a saved object without touching the curvature; ``curvature`` (same p), if given, only
        measures a solver's residuals (without it ``SolveResult.residual_norms`` is None)."""
        tensors, arguments = load_checked(directory, cls.__name__, curvature)
        approximation = NystromApproximation(tensors["eigenvectors"], tensors["eigenvalues"], arguments["shift"])
        return cls(curvature, rank=arguments["rank"], damping=arguments["damping"], seed=arguments["seed"],  # type: ignore[call-arg]
                   approximation=approximation)


class NystromSketchSolver(SavedNystrom, Solver):
    """Sketch-and-solve iHVPs with a rank-r randomized Nystroem approximation (Hataya & Yamada 2023).

    Solves (M_nys + damping I) x = b exactly, M_nys = U Lambda U^T the rank-r
    approximation of the module docstring: x = U (Lambda + damping)^{-1} U^T b +
    (b - U U^T b) / damping. Equals the exact (M + damping I)^{-1} b when
    rank = p; for rank < p, (M_nys + damping I)^{-1} >= (M + damping I)^{-1}, so
    directions of M outside the sketch are under-damped by their missing curvature.

    Fitting costs one block product with ``rank`` vectors; each solve O(k p r),
    plus one block product to measure residuals.

    Args:
        curvature: positive semi-definite operator M (p x p).
        rank: r, in [1, p].
        damping: > 0 (the Woodbury inverse needs it).
        seed: seed of the Gaussian test matrix.
        measure_residuals: report ||(M + damping I) x - b|| with the full M.
        approximation: the sketch of an earlier fit (what :meth:`load` passes); then
            ``curvature`` may be None (no residuals) and nothing is sketched.
    """

    def __init__(
        self,
        curvature: CurvatureOperator | None,
        *,
        rank: int,
        damping: float,
        seed: int = 0,
        measure_residuals: bool = True,
        approximation: NystromApproximation | None = None,
    ):
        if not damping > 0:
            raise ValueError(f"NystromSketchSolver needs damping > 0, got {damping}")
        start = time.perf_counter()
        super().__init__(curvature, damping=damping, measure_residuals=measure_residuals)
        self.rank, self.seed = int(rank), int(seed)
        if approximation is None:
            if curvature is None:
                raise ValueError("NystromSketchSolver needs a curvature to sketch, or the approximation of an earlier fit")
            approximation = randomized_nystrom(curvature, self.rank, self.seed)
        self.approximation = approximation
        self.dim = approximation.eigenvectors.shape[0]
        self.setup_seconds = time.perf_counter() - start

    def solve(self, rhs: Tensor) -> SolveResult:
        """X (k, p) with rows (M_nys + damping I)^{-1} b_j; residuals use the full M (None if loaded without it)."""
        start = time.perf_counter()
        u, eigenvalues = self.approximation.eigenvectors, self.approximation.eigenvalues
        b = check_directions(rhs, self.dim, "rhs").to(u.dtype)
        coefficients = b @ u  # (k, r)
        solution = (coefficients / (eigenvalues + self.damping)) @ u.T + (b - coefficients @ u.T) / self.damping
        seconds = time.perf_counter() - start
        return SolveResult(solution, self.residual_norms(solution, b), None, seconds, {"rank": self.rank})
