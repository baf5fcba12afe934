"""Arnoldi iHVPs: project onto the dominant eigen-directions of the curvature (Schioppa et al. 2022).

Fitting runs ``krylov_dim`` steps of the Arnoldi iteration from a random unit
vector (for symmetric M this is Lanczos; every new vector is re-orthogonalised
against all previous ones, twice, so the basis Q (p, m) stays orthonormal to
working precision). If the Krylov space becomes invariant before m steps (M has
fewer than m distinct eigenvalues along the start vector: repeated eigenvalues,
a null space), the iteration restarts from a fresh random vector orthogonal to
Q. The Rayleigh-Ritz projection T = Q^T M Q (m x m, formed from the stored
products M q_j) is diagonalised, and the ``rank`` Ritz pairs of largest
|eigenvalue| are kept: eigenvalues Lambda (r,), orthonormal eigenvectors U (p, r).

The iHVP is the projected one of the paper:

    x = U (Lambda + damping)^{-1} U^T b ,

i.e. the inverse of M + damping I restricted to span(U). **The component of b
orthogonal to span(U) is dropped** (not divided by the damping, unlike
:class:`~influencekit.solvers.nystrom.NystromSketchSolver`): the error is
||(M + damping I)^{-1} b_perp||, large when b has weight on small eigenvalues.
With rank = krylov_dim = p, span(U) is everything and x is exact.

Eigenvalues are selected by magnitude, so negative curvature (a model not at a
minimum) is kept, as in the paper, and divided by as it is (``info`` of the fit
counts negative eigenvalues); an eigenvalue with Lambda_i + damping = 0 makes the
inverse undefined and is refused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.linalg import check_directions
from influencekit.persistence import load_checked, save_tensors
from influencekit.solvers.base import SolveResult, Solver

#: A new Krylov vector shorter than this fraction of ||M q_j|| means an invariant subspace: restart.
BREAKDOWN_TOLERANCE = 1e-8


def _orthogonalise(vector: Tensor, basis: Tensor) -> Tensor:
    """``vector`` minus its projection on the orthonormal columns of ``basis``, two Gram-Schmidt passes."""
    for _ in range(2):
        vector = vector - basis @ (basis.T @ vector)
    return vector


def arnoldi_eigenpairs(
    curvature: CurvatureOperator, rank: int, krylov_dim: int, seed: int = 0
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """Top-``rank`` Ritz pairs by |eigenvalue| from a ``krylov_dim``-step Arnoldi iteration on M.

    Costs ``krylov_dim`` operator products with single vectors and O(p m^2) work.

    Returns:
        eigenvalues (rank,), by decreasing magnitude; eigenvectors (p, rank),
        orthonormal columns; and ``{"restarts": ..., "negative_eigenvalues": ...}``.
    """
    p = curvature.dim
    if not 1 <= rank <= krylov_dim <= p:
        raise ValueError(f"need 1 <= rank <= krylov_dim <= p = {p}, got rank={rank}, krylov_dim={krylov_dim}")
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(p, krylov_dim, dtype=curvature.dtype)
    images = torch.zeros(p, krylov_dim, dtype=curvature.dtype)  # M q_j
    q = torch.randn(p, generator=generator, dtype=curvature.dtype)
    q /= q.norm()
    restarts = 0
    for j in range(krylov_dim):
        basis[:, j] = q
        images[:, j] = curvature.matvec(q.unsqueeze(0))[0]
        if j + 1 == krylov_dim:
            break
        done = basis[:, : j + 1]
        w = _orthogonalise(images[:, j], done)
        if float(w.norm()) <= BREAKDOWN_TOLERANCE * float(images[:, j].norm()):
            # invariant subspace (or M q_j = 0): go on from a random direction orthogonal to Q, whose
            # component outside span(Q) (dimension p - j - 1 >= 1) has norm of order one
            restarts += 1
            w = _orthogonalise(torch.randn(p, generator=generator, dtype=curvature.dtype), done)
        q = w / w.norm()
    projected = basis.T @ images
    ritz_values, ritz_vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
    order = torch.argsort(ritz_values.abs(), descending=True)[:rank]
    eigenvalues, eigenvectors = ritz_values[order].contiguous(), (basis @ ritz_vectors[:, order]).contiguous()
    return eigenvalues, eigenvectors, {"restarts": restarts, "negative_eigenvalues": int((eigenvalues < 0).sum())}


class ArnoldiEigenpairs(NamedTuple):
    """The fitted top eigenpairs M ~ U diag(eigenvalues) U^T and the fit's diagnostics."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    fit_info: dict


class ArnoldiSolver(Solver):
    """iHVPs from the top-``rank`` eigenpairs of M by magnitude (Schioppa et al. 2022).

    x = U (Lambda + damping)^{-1} U^T b; the part of b outside span(U) is dropped
    (see the module docstring). Exact (up to round-off) with rank = krylov_dim = p.

    Args:
        curvature: the symmetric operator M (p x p).
        rank: r, eigenpairs kept, 1 <= r <= krylov_dim.
        krylov_dim: m, Arnoldi steps (operator products); default min(p, max(2 r, r + 20)).
            Ritz pairs converge from the extremes of the spectrum, so m > r makes
            the top-r ones accurate.
        damping: added to the kept eigenvalues.
        seed: seed of the random start (and restart) vectors.
        measure_residuals: report ||(M + damping I) x - b|| with the full M.
        eigenpairs: the result of an earlier fit (what :meth:`load` passes); then
            ``curvature`` may be None (no residuals) and nothing is fitted.

    Attributes:
        eigenvalues: Lambda, shape (r,), by decreasing |value|.
        eigenvectors: U, shape (p, r), orthonormal columns.
        fit_info: ``restarts`` and ``negative_eigenvalues`` of the fit.
    """

    def __init__(
        self,
        curvature: CurvatureOperator | None,
        *,
        rank: int,
        damping: float = 0.0,
        krylov_dim: int | None = None,
        seed: int = 0,
        measure_residuals: bool = True,
        eigenpairs: ArnoldiEigenpairs | None = None,
    ):
        start = time.perf_counter()
        super().__init__(curvature, damping=damping, measure_residuals=measure_residuals)
        self.rank, self.seed = int(rank), int(seed)
        if eigenpairs is None:
            if curvature is None:
                raise ValueError("ArnoldiSolver needs a curvature to fit, or the eigenpairs of an earlier fit")
            self.krylov_dim = int(krylov_dim) if krylov_dim is not None else min(curvature.dim, max(2 * rank, rank + 20))
            eigenpairs = ArnoldiEigenpairs(*arnoldi_eigenpairs(curvature, self.rank, self.krylov_dim, self.seed))
        else:
            self.krylov_dim = int(krylov_dim) if krylov_dim is not None else eigenpairs.eigenvectors.shape[1]
        self.fit_info = eigenpairs.fit_info
        self._set_state(eigenpairs.eigenvalues, eigenpairs.eigenvectors, self.damping)
        self.setup_seconds = time.perf_counter() - start

    def _set_state(self, eigenvalues: Tensor, eigenvectors: Tensor, damping: float) -> None:
        shifted = eigenvalues + damping
        scale = float(eigenvalues.abs().max())
        tiny = eigenvalues.shape[0] * torch.finfo(eigenvalues.dtype).eps * max(scale, abs(damping))
        if bool((shifted.abs() <= tiny).any()):
            raise ValueError(
                f"a kept eigenvalue plus damping {damping:g} is zero (smallest |Lambda + damping| = "
                f"{float(shifted.abs().min()):.3g}): the projected inverse is undefined; pass damping > 0 or a smaller rank"
            )
        self.eigenvalues, self.eigenvectors, self.damping = eigenvalues, eigenvectors, damping
        self.dim = eigenvectors.shape[0]

    def solve(self, rhs: Tensor) -> SolveResult:
        """X (k, p) with rows U (Lambda + damping)^{-1} U^T b_j; residuals use the full M (None if loaded without it)."""
        start = time.perf_counter()
        b = check_directions(rhs, self.dim, "rhs").to(self.eigenvectors.dtype)
        solution = ((b @ self.eigenvectors) / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
        seconds = time.perf_counter() - start
        return SolveResult(solution, self.residual_norms(solution, b), None, seconds, {"rank": self.rank})

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the eigenpairs (safetensors) and rank, krylov_dim, damping, seed, fit info (JSON)."""
        return save_tensors(
            directory,
            {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors},
            {"class": type(self).__name__, "rank": self.rank, "krylov_dim": self.krylov_dim, "damping": self.damping,
             "seed": self.seed, "fit_info": self.fit_info, "dim": self.dim},
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], curvature: CurvatureOperator | None = None) -> ArnoldiSolver:
        """Rebuild a saved solver without new products; ``curvature`` (same p) only measures residuals."""
        tensors, arguments = load_checked(directory, cls.__name__, curvature)
        eigenpairs = ArnoldiEigenpairs(tensors["eigenvalues"], tensors["eigenvectors"], arguments["fit_info"])
        return cls(curvature, rank=arguments["rank"], damping=arguments["damping"], krylov_dim=arguments["krylov_dim"],
                   seed=arguments["seed"], eigenpairs=eigenpairs)
