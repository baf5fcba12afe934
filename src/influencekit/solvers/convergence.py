"""One check of every iterative solve's result: refuse (or warn about) an unconverged solve.

An iterative solver reports ``info["converged"]`` (a bool per right-hand side);
a :class:`~influencekit.solvers.block_diagonal.BlockDiagonalSolver` reports its
blocks' results in ``info["block_results"]``. When a row did not converge the
check estimates the extreme eigenvalues of the damped operator M + d I by
Lanczos (``lanczos_ritz_values``, on the error path only) and

* if M + d I is not positive definite (smallest Ritz value <= 0, or CG met a
  direction with d^T (M + d I) d <= 0), raises :class:`IndefiniteCurvatureError`
  naming the damping ``-1.1 lambda_min(M)`` that makes it positive definite;
* otherwise raises :class:`UnconvergedSolveError` naming the largest relative
  residual and a ``maxiter`` from the CG bound
  ``ceil(sqrt(kappa) ln(2 / rtol) / 2)`` for the estimated condition number kappa.

Lanczos Ritz values lie inside the spectrum, so with fewer steps than p the
estimate of lambda_min errs towards zero; the 10 % margin covers a nearly
converged estimate. With ``allow_unconverged`` the same message is a warning.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from influencekit.curvature.spectrum import lanczos_ritz_values
from influencekit.errors import NonFiniteError, UnconvergedSolveError, UnconvergedSolveWarning
from influencekit.solvers.base import NotPositiveDefiniteError, SolveResult

LANCZOS_STEPS = 60


class IndefiniteCurvatureError(UnconvergedSolveError, NotPositiveDefiniteError):
    """An iterative solve met negative curvature: the damped curvature is not positive definite.

    Attributes:
        smallest: Lanczos estimate of the smallest eigenvalue of the undamped curvature M.
        suggested_damping: a damping d with M + d I positive definite (about -1.1 ``smallest``).
    """

    def __init__(self, message: str, smallest: float, suggested_damping: float):
        Exception.__init__(self, message)
        self.smallest = smallest
        self.suggested_damping = suggested_damping


class _Damped:
    """M + d I as a curvature operator (``dim``, ``dtype``, ``matvec``) for Lanczos."""

    def __init__(self, operator: Any, damping: float):
        self.operator, self.damping = operator, damping
        self.dim, self.dtype = operator.dim, operator.dtype

    def matvec(self, vectors: Tensor) -> Tensor:
        return self.operator.matvec(vectors) + self.damping * vectors


def _unconverged_parts(solver: Any, rhs: Tensor, result: SolveResult, label: str, outer_damping: float):
    """(label, solver, rhs, result, damping inside the operator) for each (block) solve with an unconverged row."""
    blocks = result.info.get("block_results")
    if isinstance(blocks, dict) and hasattr(solver, "solvers"):
        for name, block_result in blocks.items():
            yield from _unconverged_parts(
                solver.solvers[name], rhs[:, solver.blocks[name]], block_result, f" in block {name!r}", solver.dampings[name]
            )
        return
    converged = result.info.get("converged")
    if isinstance(converged, Tensor) and not bool(converged.all()):
        yield label, solver, rhs, result, outer_damping


def check_solve(solver: Any, rhs: Tensor, result: SolveResult, *, allow_unconverged: bool = False) -> None:
    """Raise when ``result`` (the solve of ``rhs`` (k, p) by ``solver``) is not finite or did not converge.

    Raises:
        NonFiniteError: the solution has a NaN/inf (the operator or the right-hand side was not finite).
        IndefiniteCurvatureError: a row stopped on negative curvature, or M + d I has a non-positive eigenvalue.
        UnconvergedSolveError: a row stopped at ``maxiter`` above its tolerance (a warning instead
            when ``allow_unconverged``).
    """
    if not bool(torch.isfinite(result.solution).all()):
        row = int((~torch.isfinite(result.solution)).any(dim=1).nonzero()[0])
        raise NonFiniteError(
            f"the solve of {type(solver).__name__} is not finite for right-hand side {row}; a Hessian-vector product "
            "is not finite: check the loss at the training examples (log(0), overflow)"
        )
    for label, part, part_rhs, part_result, inner_damping in _unconverged_parts(solver, rhs, result, "", 0.0):
        message, error = _diagnose(part, part_rhs, part_result, label, inner_damping)
        if not allow_unconverged:
            raise error
        warnings.warn(message, UnconvergedSolveWarning, stacklevel=3)


def _diagnose(solver: Any, rhs: Tensor, result: SolveResult, label: str, inner_damping: float):
    converged = result.info["converged"]
    failed = int((~converged).sum())
    name = type(solver).__name__
    operator = getattr(solver, "curvature", None)
    outer_damping = float(getattr(solver, "damping", 0.0))
    damping = outer_damping + inner_damping  # the damping d of M + d I
    negative = result.info.get("negative_curvature")
    met_negative = isinstance(negative, Tensor) and bool(negative.any())
    if operator is None:
        message = (
            f"{name} did not converge{label} on {failed} of {len(converged)} right-hand sides; "
            "add damping or raise maxiter"
        )
        return message, UnconvergedSolveError(message)
    ritz = lanczos_ritz_values(_Damped(operator, outer_damping), min(LANCZOS_STEPS, operator.dim))
    lowest, highest = float(ritz[0]), float(ritz[-1])  # of M + d I
    smallest = lowest - damping  # of M
    tolerance = operator.dim * torch.finfo(operator.dtype).eps * max(abs(highest), abs(lowest))
    if met_negative or lowest <= tolerance:
        suggested = -1.1 * smallest if smallest < 0 else damping + 1e-3 * abs(highest)
        if suggested <= damping:
            suggested = 2 * damping + 1e-3 * abs(highest)
        message = (
            f"{name} met negative curvature{label}: the curvature plus damping {damping:g} is not positive definite "
            f"(smallest eigenvalue of the curvature ~{smallest:.4g} by Lanczos), so {failed} of {len(converged)} "
            f"solves stopped early and their influence is meaningless; pass damping={suggested:.3g} "
            "(or train the model to a minimum, or use a Gauss-Newton curvature)"
        )
        return message, IndefiniteCurvatureError(message, smallest, suggested)
    kappa = highest / lowest
    rtol = float(getattr(solver, "rtol", 1e-10) or 1e-10)
    maxiter = int(getattr(solver, "maxiter", 0) or 0)
    needed = max(math.ceil(0.5 * math.sqrt(kappa) * math.log(2 / rtol)), 2 * maxiter)
    relative = result.relative_residuals(rhs)
    worst = f", largest relative residual {float(relative[~converged].max()):.2g}" if relative is not None else ""
    message = (
        f"{name} did not converge{label} on {failed} of {len(converged)} right-hand sides within maxiter={maxiter} "
        f"(rtol {rtol:g}{worst}; condition number ~{kappa:.3g}); pass maxiter={needed} or more damping "
        f"(e.g. damping={damping + 1e-3 * highest:.3g}), or allow_unconverged=True to accept it"
    )
    return message, UnconvergedSolveError(message)
