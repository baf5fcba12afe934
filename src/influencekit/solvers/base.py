"""The solver contract: every inverse-Hessian-vector-product solver, its result and its errors.

A solver solves (M + damping I) X^T = B^T for a block of right-hand sides B
(k, p), M a curvature operator (:mod:`influencekit.curvature`). Every solver

* is built as ``Solver(curvature, *, damping=..., <its settings>, measure_residuals=True)``:
  the curvature first, everything else keyword-only;
* records the seconds its construction took (factorisations, sketches, fits) in
  ``setup_seconds``;
* returns a :class:`SolveResult` from ``solve(rhs)``: the solution and the evidence
  for it (residual norms measured with the full operator, iterations, seconds);
* if it fits something worth keeping, ``save(path) -> Path`` writes it and the
  classmethod ``load(path, curvature=None)`` rebuilds the solver through its
  constructor (the curvature, when given, only measures residuals).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from influencekit.curvature.base import CurvatureOperator


@dataclass
class SolveResult:
    """Solution X of (M + damping I) X^T = B^T and the evidence for it.

    Attributes:
        solution: X, shape (k, p), one row per right-hand side.
        residual_norms: ||(M + damping I) x_j - b_j|| per row, shape (k,), measured
            with the full operator (None when the solver was asked not to measure).
        iterations: iterations used per row, shape (k,), or None for direct solvers.
        seconds: wall time of the solve.
        info: solver-specific diagnostics (e.g. LiSSA's norm trace; ``converged``
            and ``negative_curvature`` (k,) for iterative solvers).
    """

    solution: Tensor
    residual_norms: Tensor | None
    iterations: Tensor | None
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def relative_residuals(self, rhs: Tensor) -> Tensor | None:
        """||(M + damping I) x_j - b_j|| / ||b_j|| per row, or None when residuals were not measured."""
        if self.residual_norms is None:
            return None
        return self.residual_norms / rhs.norm(dim=1).clamp_min(1e-300)


class Solver(ABC):
    """Solves (M + damping I) x = b for every row b of a block (k, p); one job, nothing else.

    Args:
        curvature: the operator M (p x p), or None for a solver rebuilt from disk
            without one (then residuals cannot be measured).
        damping: added to the diagonal of M.
        measure_residuals: report ||(M + damping I) x - b|| per row (one more
            operator product per solve).
    """

    curvature: CurvatureOperator | None
    damping: float
    measure_residuals: bool
    setup_seconds: float = 0.0

    def __init__(self, curvature: CurvatureOperator | None, *, damping: float = 0.0, measure_residuals: bool = True):
        self.curvature = curvature
        self.damping = float(damping)
        self.measure_residuals = bool(measure_residuals)

    @abstractmethod
    def solve(self, rhs: Tensor) -> SolveResult:
        """Return X (k, p) with rows (M + damping I)^{-1} b_j for rhs rows b_j."""

    def apply_damped(self, vectors: Tensor) -> Tensor:
        """(M + damping I) v for each row of ``vectors`` (k, p)."""
        assert self.curvature is not None
        return self.curvature.matvec(vectors) + self.damping * vectors

    def residual_norms(self, solution: Tensor, rhs: Tensor) -> Tensor | None:
        """||(M + damping I) x_j - b_j|| per row, or None when not measured or there is no curvature."""
        if not self.measure_residuals or self.curvature is None:
            return None
        return (self.apply_damped(solution) - rhs).norm(dim=1)


class NotPositiveDefiniteError(ValueError):
    """The damped curvature is not positive definite, so its inverse is not an influence."""

    def __init__(self, eigenvalues_negative: Tensor, smallest: float, damping: float, suggested_damping: float):
        self.negative_eigenvalues = eigenvalues_negative
        self.smallest = smallest
        self.suggested_damping = suggested_damping
        shown = ", ".join(f"{float(e):.3g}" for e in eigenvalues_negative[:5])
        more = "" if len(eigenvalues_negative) <= 5 else f", ... ({len(eigenvalues_negative)} in all)"
        super().__init__(
            f"the curvature plus damping {damping:g} is not positive definite: {len(eigenvalues_negative)} "
            f"non-positive eigenvalue(s) [{shown}{more}], smallest {smallest:.4g}. Is the model at an optimum? "
            f"Train it further, or pass damping >= {suggested_damping:.3g} (the damped quadratic surrogate "
            f"of Koh & Liang), or use a Gauss-Newton curvature."
        )


def damping_per_block(
    damping: float | Sequence[float] | Mapping[Any, float],
    names: Sequence[Any],
    *,
    what: str = "block",
    positive: bool = False,
) -> dict[Any, float]:
    """One damping per named block from a number, a sequence (in block order) or a mapping naming every block.

    Raises:
        ValueError: a mapping that does not name every block exactly, a sequence of the wrong
            length, or a damping that is not finite and >= 0 (> 0 with ``positive``).
    """
    if isinstance(damping, Mapping):
        unknown = sorted(map(str, set(damping) - set(names)))
        missing = [name for name in names if name not in damping]
        if unknown or missing:
            raise ValueError(
                f"per-{what} damping must name every {what} exactly: {what}s {list(names)}; "
                f"unknown {unknown}, missing {missing}"
            )
        values = {name: float(damping[name]) for name in names}
    elif isinstance(damping, Sequence) and not isinstance(damping, str):
        if len(damping) != len(names):
            raise ValueError(f"need one damping per {what} ({len(names)}), got {len(damping)}")
        values = {name: float(value) for name, value in zip(names, damping)}
    else:
        values = {name: float(damping) for name in names}
    bound = "> 0" if positive else ">= 0"
    bad = {name: v for name, v in values.items() if not math.isfinite(v) or v < 0 or (positive and v == 0)}
    if bad:
        raise ValueError(f"damping must be finite and {bound}, got {bad}")
    return values
