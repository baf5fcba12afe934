"""Solve with a block-diagonal curvature one block at a time."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Callable

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.curvature.block_diagonal import BlockDiagonalOperator, BlockSpec, CurvatureBlock
from influencekit.linalg import check_directions
from influencekit.solvers.base import SolveResult, Solver, damping_per_block

MakeSolver = Callable[[CurvatureOperator, str], Solver]


class BlockDiagonalSolver(Solver):
    """Solves (M_bd + D) X^T = B^T block by block, with M_bd the block-diagonal part of M.

    D is diagonal with the damping d_b of block b on the coordinates of b, so
    the solution of block b is x_b = (M_{b b} + d_b I)^{-1} rhs_b. Each block is
    handed to its own solver as a :class:`~influencekit.curvature.block_diagonal.CurvatureBlock`
    of size |b| that already includes d_b (with ``matvec``, ``sampled_matvec``
    and ``to_dense``), so ``DirectSolver``, ``CGSolver`` and ``LiSSA``
    all work per block.

    Args:
        curvature: the full curvature M (p x p).
        blocks: a partition of the coordinates of theta (see
            :mod:`influencekit.curvature.block_diagonal`).
        make_solver: ``make_solver(block_operator, block_name) -> Solver``,
            called once per block at construction (so e.g. a Cholesky factor is
            computed once). The block operator carries the damping: build the
            solver with damping 0 (a non-zero solver damping is refused, as it
            would be added twice).
        damping: d_b, one float for all blocks or ``{block name: damping}``
            naming every block.

    The result's ``residual_norms`` are ||(M_bd + D) x_j - b_j||, the
    root-sum-square of the per-block residuals that each block's solver
    measured with its exact block operator (None if any block did not
    measure). ``info`` holds per block (keyed by name): ``"block_results"``
    (the block's SolveResult), ``"block_residual_norms"`` (shape (k,) or None)
    and ``"dampings"``.
    """

    def __init__(
        self,
        curvature: CurvatureOperator,
        *,
        blocks: BlockSpec,
        make_solver: MakeSolver,
        damping: float | Mapping[str, float] = 0.0,
    ):
        start = time.perf_counter()
        self.measure_residuals = True
        self.curvature = BlockDiagonalOperator(curvature, blocks)
        self.blocks = self.curvature.blocks
        self.dampings = damping_per_block(damping, list(self.blocks))
        self.block_operators = {
            name: CurvatureBlock(curvature, index, self.dampings[name]) for name, index in self.blocks.items()
        }
        self.solvers: dict[str, Solver] = {}
        for name, block_operator in self.block_operators.items():
            solver = make_solver(block_operator, name)
            if not isinstance(solver, Solver):
                raise TypeError(f"make_solver must return a Solver, got {type(solver).__name__} for block {name!r}")
            if getattr(solver, "damping", 0.0) != 0.0:
                raise ValueError(
                    f"the solver of block {name!r} has damping {solver.damping:g}; pass dampings to "
                    "BlockDiagonalSolver(damping=...) instead (the block operators already include them)"
                )
            self.solvers[name] = solver
        self.setup_seconds = time.perf_counter() - start

    @property
    def damping(self) -> float:  # type: ignore[override]
        """The damping of every block; AttributeError when the blocks' dampings differ (see ``dampings``)."""
        values = set(self.dampings.values())
        if len(values) != 1:
            raise AttributeError(f"the blocks have different dampings {self.dampings}; there is no single damping")
        return values.pop()

    def solve(self, rhs: Tensor) -> SolveResult:
        """X (k, p) with rows (M_bd + D)^{-1} b_j for rhs rows b_j (rhs shape (k, p))."""
        start = time.perf_counter()
        b = check_directions(rhs, self.curvature.dim, "rhs").to(self.curvature.dtype)
        solution = torch.zeros_like(b)
        results: dict[str, SolveResult] = {}
        for name, index in self.blocks.items():
            result = self.solvers[name].solve(b[:, index])
            if result.solution.shape != (b.shape[0], index.numel()):
                raise RuntimeError(
                    f"the solver of block {name!r} returned shape {tuple(result.solution.shape)}, "
                    f"expected {(b.shape[0], index.numel())}"
                )
            solution[:, index] = result.solution.to(b.dtype)
            results[name] = result
        block_residuals = {name: result.residual_norms for name, result in results.items()}
        measured = [r for r in block_residuals.values() if r is not None]
        overall = torch.stack(measured).square().sum(dim=0).sqrt() if len(measured) == len(results) else None
        info = {"block_results": results, "block_residual_norms": block_residuals, "dampings": dict(self.dampings)}
        return SolveResult(solution, overall, None, time.perf_counter() - start, info)
