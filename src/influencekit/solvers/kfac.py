"""The inverse of the K-FAC / EK-FAC curvature: (G_kfac + lambda I + damping)^{-1} b in the Kronecker eigenbasis.

With a layer's approximation diagonal in the basis Q_S kron Q_A with eigenvalues
Lambda (:class:`~influencekit.curvature.kfac.KFACCurvature`), its part V (out, columns)
of a vector maps to Q_S [(Q_S^T V Q_A) / (Lambda + lambda + damping)] Q_A^T, without
forming any Kronecker product. ``damping`` is one number or one per layer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.curvature.kfac import KFACCurvature, OutputHessianFactor
from influencekit.linalg import check_directions
from influencekit.persistence import load_saved
from influencekit.solvers.base import NotPositiveDefiniteError, SolveResult, Solver, damping_per_block


class SingularKFACError(NotPositiveDefiniteError):
    """The damped K-FAC / EK-FAC approximation is (numerically) singular, so it cannot be inverted."""

    def __init__(self, layer: str, eigenvalues: Tensor, smallest: float, damping: float, suggested_damping: float):
        self.layer = layer
        self.negative_eigenvalues = eigenvalues
        self.smallest = smallest
        self.suggested_damping = suggested_damping
        ValueError.__init__(
            self,
            f"layer {layer!r}: the Kronecker-factored curvature plus weight decay plus damping {damping:g} is "
            f"singular: {len(eigenvalues)} eigenvalue(s) are numerically zero (smallest {smallest:.4g}). "
            f"K-FAC factors are only positive semi-definite (cross-entropy always leaves one zero direction "
            f"per example); pass damping >= {suggested_damping:.3g} (e.g. 0.1 x the mean eigenvalue), as a "
            f"number or per layer as {{module name: damping}}.",
        )


class KFACSolver(Solver):
    """Solves (G_kfac + lambda I + damping) x = b with K-FAC or EK-FAC.

    Args:
        curvature: a :class:`~influencekit.curvature.kfac.KFACCurvature` (fitted or not),
            or the :class:`~influencekit.objectives.TorchObjective` to build one from with
            ``eigenvalue_correction``, ``chunk_size`` and ``output_hessian``.
        damping: added to the approximation's eigenvalues; one number, or a dict
            {module name: damping} naming every layer (see ``approximation.layers``).
        eigenvalue_correction, chunk_size, output_hessian: as in ``KFACCurvature``,
            used when ``curvature`` is an objective.
        residual_operator: the operator M the residuals ||(M + damping) x - b|| are
            measured with (e.g. the GGN or Hessian of the same objective); without it
            there are no residuals: the approximation solves its own system exactly.
        measure_residuals: measure them when ``residual_operator`` is given.

    Attributes:
        approximation: the :class:`KFACCurvature`.
        layer_damping: the damping of each layer.
    """

    def __init__(
        self,
        curvature: KFACCurvature | Any,
        *,
        damping: float | Mapping[str, float] = 0.0,
        eigenvalue_correction: bool = False,
        chunk_size: int = 256,
        output_hessian: str | OutputHessianFactor | None = None,
        residual_operator: CurvatureOperator | None = None,
        measure_residuals: bool = True,
    ):
        if not isinstance(curvature, KFACCurvature):
            curvature = KFACCurvature(
                curvature, eigenvalue_correction=eigenvalue_correction, chunk_size=chunk_size, output_hessian=output_hessian
            )
        self.approximation = curvature
        self.layer_damping = damping_per_block(damping, [layer.name for layer in curvature.layers], what="layer")
        self.curvature = residual_operator
        self.measure_residuals = bool(measure_residuals)
        self.damping = damping if isinstance(damping, (int, float)) else dict(damping)  # type: ignore[assignment]
        self.dim, self.dtype = curvature.dim, curvature.dtype

    @property
    def setup_seconds(self) -> float:  # type: ignore[override]
        """Seconds of the approximation's fit (0 before it, or when loaded)."""
        return self.approximation.fit_seconds or 0.0

    def fit(self) -> KFACSolver:
        """Fit the approximation now (otherwise it is fitted on the first solve); returns self."""
        self.approximation.fit()
        return self

    def damping_vector(self) -> Tensor:
        """The damping of each coordinate of theta, shape (p,)."""
        vector = torch.zeros(self.dim, dtype=self.dtype, device=self.approximation.device)
        for layer in self.approximation.layers:
            vector[layer.theta_indices()] = self.layer_damping[layer.name]
        return vector

    def damped_eigenvalues(self) -> dict[str, Tensor]:
        """Per layer, the eigenvalues of the damped approximation (out, columns); raises if any is ~0.

        "~0" means at most (out + columns) eps max|eigenvalue|: the symmetric
        eigensolver gets each eigenvalue of an m x m factor to about m eps times
        its largest, so a product s_i a_j + lambda + damping below that bound
        cannot be told from zero.
        """
        out = {}
        for name, eigenvalues in self.approximation.eigenvalues().items():
            damping = self.layer_damping[name]
            denominators = eigenvalues + damping
            tolerance = float(denominators.abs().max()) * sum(denominators.shape) * torch.finfo(self.dtype).eps
            bad = denominators <= tolerance
            if bad.any():
                undamped = eigenvalues - self.approximation.objective.weight_decay
                suggestion = max(0.1 * float(undamped.mean()), 10 * tolerance, torch.finfo(self.dtype).tiny)
                raise SingularKFACError(name, denominators[bad].sort().values, float(denominators.min()), damping, suggestion)
            out[name] = denominators
        return out

    def inverse_matvec(self, vectors: Tensor) -> Tensor:
        """(G_kfac + lambda I + damping)^{-1} times each row of ``vectors`` (k, p); usable as a CG preconditioner."""
        denominators = self.damped_eigenvalues()
        return self.approximation.in_eigenbasis(vectors, lambda layer, rotated: rotated / denominators[layer.name])

    def residual_norms(self, solution: Tensor, rhs: Tensor) -> Tensor | None:
        if not self.measure_residuals or self.curvature is None:
            return None
        return (self.curvature.matvec(solution) + self.damping_vector() * solution - rhs).norm(dim=1)

    def solve(self, rhs: Tensor) -> SolveResult:
        """Rows (G_kfac + lambda I + damping)^{-1} b_j of ``rhs`` (k, p); residuals with ``residual_operator``."""
        if self.approximation.factors is None:
            self.approximation.fit()
        start = time.perf_counter()
        rhs = check_directions(rhs, self.dim, "rhs").to(self.dtype)
        solution = self.inverse_matvec(rhs)
        seconds = time.perf_counter() - start
        info = {
            "method": "ekfac" if self.approximation.eigenvalue_correction else "kfac",
            "layers": [layer.name for layer in self.approximation.layers],
            "fit_seconds": self.approximation.fit_seconds,
        }
        return SolveResult(solution, self.residual_norms(solution, rhs), None, seconds, info)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """The approximation's factors and this solver's damping, in ``directory``."""
        return self.approximation.save(directory, extra={"damping": self.damping})

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], objective: Any, *, residual_operator: CurvatureOperator | None = None,
        **curvature_options: Any,
    ) -> KFACSolver:
        """A solver with the factors and damping saved in ``directory``, for ``objective``; ``curvature_options``
        go to :meth:`KFACCurvature.from_saved` (``output_hessian``)."""
        tensors, arguments = load_saved(directory, KFACCurvature.SAVED_CLASS)
        approximation = KFACCurvature.from_saved(tensors, arguments, objective, **curvature_options)
        return cls(approximation, damping=arguments.get("damping", 0.0), residual_operator=residual_operator)
