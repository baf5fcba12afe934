"""Direct solver: Cholesky factorisation of the explicit damped curvature."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator, DenseOperator
from influencekit.curvature.spectrum import SpectrumSummary, spectrum_summary
from influencekit.linalg import PackedCholesky, check_directions, cholesky_solve
from influencekit.solvers.base import NotPositiveDefiniteError, SolveResult, Solver


class DirectSolver(Solver):
    """Exact iHVPs from the Cholesky factor of M + damping I (M explicit, p x p).

    Raises :class:`NotPositiveDefiniteError` (listing the offending eigenvalues
    and a damping that would fix them) when the factorisation fails.

    Args:
        curvature: a curvature operator (made explicit once) or a matrix (p, p).
        damping: added to the diagonal.
        measure_residuals: report ||(M + damping I) x - b|| (one product with the explicit M).
        overwrite_matrix: factorise the explicit matrix in its own memory
            (:class:`~influencekit.linalg.PackedCholesky`: p^2 numbers instead of 2 p^2,
            0.5 GB less on W1; residuals still use the exact M). :meth:`spectrum` is then
            unavailable. Needs an operator that builds a fresh matrix.
    """

    def __init__(
        self,
        curvature: CurvatureOperator | Tensor,
        *,
        damping: float = 0.0,
        measure_residuals: bool = True,
        overwrite_matrix: bool = False,
    ):
        start = time.perf_counter()
        if overwrite_matrix and isinstance(curvature, (Tensor, DenseOperator)):
            raise ValueError(
                "overwrite_matrix=True needs an operator that builds a fresh matrix, "
                "not a matrix or a DenseOperator, whose matrix it would destroy"
            )
        matrix = curvature if isinstance(curvature, Tensor) else curvature.to_dense()
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        if overwrite_matrix:
            packed = PackedCholesky(matrix, shift=damping)
            super().__init__(_PackedMatrix(packed), damping=damping, measure_residuals=measure_residuals)
            self.matrix, factor, info = None, packed.buffer, packed.info
        else:
            super().__init__(DenseOperator(matrix), damping=damping, measure_residuals=measure_residuals)
            self.matrix = matrix
            damped = matrix  # no copy (nor an identity matrix) unless there is damping: bounds peak memory at 2 p^2
            if self.damping != 0:
                damped = matrix.clone()
                damped.diagonal().add_(self.damping)
            factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            if overwrite_matrix:  # the factorisation destroyed the matrix: rebuild it for the diagnosis
                damped = curvature.to_dense()
                damped.diagonal().add_(self.damping)
            eig = torch.linalg.eigvalsh(damped)
            bad = eig[eig <= 0]
            smallest = float(eig[0])
            raise NotPositiveDefiniteError(bad, smallest, self.damping, self.damping + 2 * abs(smallest) + 1e-12)
        self.factor = factor
        self.setup_seconds = time.perf_counter() - start

    def solve(self, rhs: Tensor) -> SolveResult:
        start = time.perf_counter()
        rhs = check_directions(rhs, self.dim, "rhs").to(self.dtype)
        solution = cholesky_solve(self.factor, rhs)
        seconds = time.perf_counter() - start
        return SolveResult(solution.contiguous(), self.residual_norms(solution, rhs), None, seconds)

    def inverse_operator(self) -> "CholeskyInverse":
        """(M + damping I)^{-1} as a curvature operator (for Lanczos on the inverse)."""
        return CholeskyInverse(self.factor)

    def spectrum(self) -> SpectrumSummary:
        """Eigen-spectrum summary of the undamped matrix M."""
        if self.matrix is None:
            raise ValueError("this DirectSolver factorised its matrix in place (overwrite_matrix=True); build one without it for the spectrum")
        return spectrum_summary(torch.linalg.eigvalsh(self.matrix))


class CholeskyInverse(CurvatureOperator):
    """The inverse (L L^T)^{-1} of a Cholesky-factored matrix, as a linear operator."""

    def __init__(self, factor: Tensor):
        self.factor = factor
        self.dim = factor.shape[0]
        self.dtype = factor.dtype

    def matvec(self, vectors: Tensor) -> Tensor:
        return cholesky_solve(self.factor, check_directions(vectors, self.dim))


class _PackedMatrix(CurvatureOperator):
    """Products with the matrix that a :class:`PackedCholesky` keeps beside its factor."""

    def __init__(self, packed: PackedCholesky):
        self.packed = packed
        self.dim = packed.buffer.shape[0]
        self.dtype = packed.buffer.dtype

    def matvec(self, vectors: Tensor) -> Tensor:
        return self.packed.matvec(check_directions(vectors, self.dim))
