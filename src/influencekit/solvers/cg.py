"""Conjugate gradient for many right-hand sides at once."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.linalg import check_directions
from influencekit.solvers.base import SolveResult, Solver

Preconditioner = Callable[[Tensor], Tensor]


class KrylovSolver(Solver):
    """The settings every conjugate-gradient solver shares (:class:`CGSolver`, block CG).

    Args:
        curvature: the operator M.
        damping: added to the diagonal.
        rtol, atol: stop a right-hand side when ||r_j|| <= max(rtol ||b_j||, atol).
        maxiter: iteration cap (default 10 p).
        preconditioner: optional callable applying P^{-1} to a block (k, p) -> (k, p),
            P symmetric positive definite (see :mod:`~influencekit.solvers.preconditioners`).
        measure_residuals: recompute ||(M + damping I) x - b|| with the full operator at the end.
    """

    def __init__(
        self,
        curvature: CurvatureOperator,
        *,
        damping: float = 0.0,
        rtol: float = 1e-10,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: Preconditioner | None = None,
        measure_residuals: bool = True,
    ):
        super().__init__(curvature, damping=damping, measure_residuals=measure_residuals)
        self.rtol, self.atol = float(rtol), float(atol)
        self.maxiter = maxiter if maxiter is not None else 10 * curvature.dim
        self.preconditioner = preconditioner


class CGSolver(KrylovSolver):
    """(Preconditioned) CG on (M + damping I) x = b, each row of the block its own CG.

    All unconverged right-hand sides share one operator pass per iteration.
    Row j stops when ||r_j|| <= max(rtol ||b_j||, atol). M must be symmetric
    positive definite (after damping); negative curvature met along the way is
    reported in ``info["negative_curvature"]`` and stops that row.

    Arguments: those of :class:`KrylovSolver`.
    """

    def solve(self, rhs: Tensor, initial: Tensor | None = None) -> SolveResult:
        start = time.perf_counter()
        b = check_directions(rhs, self.curvature.dim, "rhs").to(self.curvature.dtype)
        k = b.shape[0]
        x = torch.zeros_like(b) if initial is None else initial.clone().to(b.dtype)
        r = b - self.apply_damped(x) if initial is not None else b.clone()
        precond = self.preconditioner or (lambda v: v)
        z = precond(r)
        d = z.clone()
        rz = (r * z).sum(dim=1)
        threshold = torch.clamp(self.rtol * b.norm(dim=1), min=self.atol)
        iterations = torch.zeros(k, dtype=torch.long)
        active = r.norm(dim=1) > threshold
        negative_curvature = torch.zeros(k, dtype=torch.bool)
        history: list[Tensor] = [r.norm(dim=1)]
        for _ in range(self.maxiter):
            if not active.any():
                break
            # all rows active (always, for one right-hand side): views, not index copies of (k, p) blocks
            rows: slice | Tensor = slice(None) if bool(active.all()) else active.nonzero().squeeze(1)
            d_rows = d[rows]
            md = self.apply_damped(d_rows)
            curvature = (d_rows * md).sum(dim=1)
            bad = curvature <= 0
            if bad.any():
                idx = torch.arange(k)[rows]
                negative_curvature[idx[bad]] = True
                active[idx[bad]] = False
                keep = ~bad
                rows, d_rows, md, curvature = idx[keep], d_rows[keep], md[keep], curvature[keep]
                if rows.numel() == 0:
                    break
            alpha = (rz[rows] / curvature).unsqueeze(1)
            x[rows] += alpha * d_rows
            r[rows] -= alpha * md
            iterations[rows] += 1
            r_rows = r[rows]
            z_new = precond(r_rows)
            rz_new = (r_rows * z_new).sum(dim=1)
            d[rows] = z_new + (rz_new / rz[rows]).unsqueeze(1) * d_rows
            rz[rows] = rz_new
            norms = r.norm(dim=1)
            history.append(norms)
            active &= norms > threshold
        seconds = time.perf_counter() - start
        info = {
            "converged": (history[-1] <= threshold) & ~negative_curvature,
            "negative_curvature": negative_curvature,
            "residual_history": torch.stack(history),
        }
        return SolveResult(x, self.residual_norms(x, b), iterations, seconds, info)
