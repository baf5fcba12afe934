"""One builder per method: ``BUILDERS[spec.method](ctx, spec) -> (solver, scoring objective, fit notes)``.

A builder constructs and fits its solver (the runner times this as "fit"); the scoring objective is the one whose
training gradients the row's influences are computed with. Every solver that would measure a residual inside
``solve`` with an extra full pass is asked not to (``measure_residuals=False``).
"""

from __future__ import annotations

from typing import Any, Callable

from influencekit.curvature import CurvatureOperator, KFACCurvature, blocks_per_module
from influencekit.solvers import (
    ArnoldiSolver,
    BlockCGSolver,
    CGSolver,
    DataInfSolver,
    DirectSolver,
    JacobiPreconditioner,
    KFACPreconditioner,
    KFACSolver,
    LiSSASolver,
    NystromPreconditioner,
    NystromSketchSolver,
)
from influencekit.solvers.block_diagonal import BlockDiagonalSolver

from .context import Context
from .workloads import Spec

Built = tuple[Any, Any, dict[str, Any]]  # (solver, scoring objective, fit notes)


def build_solver(ctx: Context, spec: Spec) -> Built:
    """(solver, scoring objective, fit notes) of the row; fitting happens here (timed as 'fit')."""
    builder = BUILDERS.get(spec.method)
    if builder is None:
        raise ValueError(f"unknown method {spec.method!r}; known: {', '.join(BUILDERS)}")
    return builder(ctx, spec)


# -- helpers ----------------------------------------------------------------------------------------------------------
def _data_term(operator: CurvatureOperator, shift: float) -> CurvatureOperator:
    """M - shift I as a curvature operator (the data term of a curvature that includes weight decay)."""

    class DataTerm(CurvatureOperator):
        def __init__(self):
            self.dim, self.dtype = operator.dim, operator.dtype

        def matvec(self, vectors):
            return operator.matvec(vectors) - shift * vectors

    return DataTerm()


def _closed_form_jacobi(ctx: Context, damping: float) -> JacobiPreconditioner:
    """JacobiPreconditioner with W1's exact Hessian diagonal, (1/n) sum_i p_ia (1 - p_ia) x_ij^2 + lambda."""
    probs = ctx.closed.probs
    diagonal = ((probs * (1 - probs)).T @ (ctx.x * ctx.x) / ctx.n + ctx.weight_decay).reshape(-1)
    return JacobiPreconditioner.from_diagonal(diagonal, damping)


def _jacobi(ctx: Context, spec: Spec, operator: CurvatureOperator) -> JacobiPreconditioner:
    """The row's diagonal: closed form (W1), exact GGN diagonal (K-FAC's pass, W2), or Hutchinson probes."""
    if spec.params.get("closed_form_diagonal"):
        return _closed_form_jacobi(ctx, ctx.damping)
    if spec.params.get("ggn_diagonal"):
        diagonal = KFACCurvature(ctx.torch_objective, chunk_size=1024).exact_diagonal()
        return JacobiPreconditioner.from_diagonal(diagonal, ctx.damping)
    return JacobiPreconditioner(operator, damping=ctx.damping, num_probes=spec.params["probes"], seed=0)


def _contiguous_layer_blocks(ctx: Context) -> dict[str, slice]:
    """The model's layers as slices of theta (DataInf's per-layer blocks)."""
    blocks = {}
    for name, index in blocks_per_module(ctx.model, ctx.torch_objective.space).items():
        start, stop = int(index.min()), int(index.max()) + 1
        if stop - start != index.numel():
            raise ValueError(f"block {name!r} is not contiguous in theta")
        blocks[name] = slice(start, stop)
    return blocks


# -- one builder per method -------------------------------------------------------------------------------------------
def _exact(ctx: Context, spec: Spec) -> Built:
    return DirectSolver(ctx.operator(spec.curvature), damping=ctx.damping), ctx.objective(spec.curvature), {}


def _cg(ctx: Context, spec: Spec) -> Built:
    if spec.curvature == "ggn-blockdiag":
        return _block_diagonal_cg(ctx, spec)
    solver = CGSolver(ctx.operator(spec.curvature), damping=ctx.damping, rtol=spec.params["rtol"])
    return solver, ctx.objective(spec.curvature), {}


def _block_diagonal_cg(ctx: Context, spec: Spec) -> Built:
    """CG on each layer's diagonal block of the GGN."""
    blocks = blocks_per_module(ctx.model, ctx.torch_objective.space)
    notes = {"blocks": {name: int(index.numel()) for name, index in blocks.items()}}
    solver = BlockDiagonalSolver(ctx.operator(spec.curvature), blocks=blocks, damping=ctx.damping,
                                 make_solver=lambda block, name: CGSolver(block, rtol=spec.params["rtol"]))
    return solver, ctx.torch_objective, notes


def _cg_jacobi(ctx: Context, spec: Spec) -> Built:
    operator = ctx.operator(spec.curvature)
    pre = _jacobi(ctx, spec, operator)
    solver = CGSolver(operator, damping=ctx.damping, rtol=spec.params["rtol"], preconditioner=pre,
                      maxiter=spec.params.get("maxiter"))
    return solver, ctx.objective(spec.curvature), {"clamped": pre.clamped}


def _cg_nystrom(ctx: Context, spec: Spec) -> Built:
    operator = ctx.operator(spec.curvature)
    pre = NystromPreconditioner(operator, rank=spec.params["rank"], damping=ctx.damping, seed=0)
    solver = CGSolver(operator, damping=ctx.damping, rtol=spec.params["rtol"], preconditioner=pre)
    return solver, ctx.objective(spec.curvature), {"lambda_r": float(pre.approximation.eigenvalues[-1])}


def _cg_kfac(ctx: Context, spec: Spec) -> Built:
    """CG preconditioned by K-FAC (EK-FAC with ``ekfac``), fitted on the TorchObjective."""
    pre = KFACPreconditioner(ctx.torch_objective, damping=ctx.damping, eigenvalue_correction=spec.params.get("ekfac", False))
    solver = CGSolver(ctx.operator(spec.curvature), damping=ctx.damping, rtol=spec.params["rtol"], preconditioner=pre)
    return solver, ctx.objective(spec.curvature), {"kfac_seconds": pre.setup_seconds}


def _block_cg(ctx: Context, spec: Spec) -> Built:
    operator = ctx.operator(spec.curvature)
    rank = spec.params.get("nystrom_rank")
    pre = NystromPreconditioner(operator, rank=rank, damping=ctx.damping, seed=0) if rank else None
    solver = BlockCGSolver(operator, damping=ctx.damping, rtol=spec.params["rtol"], preconditioner=pre)
    return solver, ctx.objective(spec.curvature), {}


def _lissa(ctx: Context, spec: Spec) -> Built:
    p = spec.params
    solver = LiSSASolver(ctx.operator(spec.curvature), scale=p["scale"], damping=ctx.damping, depth=p["depth"],
                         repeats=p["repeats"], batch_size=p["batch_size"], seed=0, measure_residuals=False,
                         progress=False)
    return solver, ctx.objective(spec.curvature), {"scale": solver.scale}


def _arnoldi(ctx: Context, spec: Spec) -> Built:
    solver = ArnoldiSolver(ctx.operator(spec.curvature), rank=spec.params["rank"], krylov_dim=spec.params.get("krylov_dim"),
                           damping=ctx.damping, seed=0, measure_residuals=False)
    return solver, ctx.objective(spec.curvature), {"krylov_dim": solver.krylov_dim, **solver.fit_info}


def _nystrom_sketch(ctx: Context, spec: Spec) -> Built:
    """Sketch of the data term M - wd I, solved with damping wd (+ mu): unsketched directions keep the weight decay."""
    wd = ctx.weight_decay
    solver = NystromSketchSolver(_data_term(ctx.operator(spec.curvature), wd), rank=spec.params["rank"],
                                 damping=wd + ctx.damping, seed=0, measure_residuals=False)
    return solver, ctx.objective(spec.curvature), {}


def _kfac(ctx: Context, spec: Spec) -> Built:
    """K-FAC, or EK-FAC for the "ekfac" rows, fitted on the TorchObjective."""
    solver = KFACSolver(ctx.torch_objective, damping=ctx.damping, eigenvalue_correction=spec.method == "ekfac",
                        chunk_size=spec.params["chunk_size"])
    solver.fit()
    return solver, ctx.torch_objective, {}


def _datainf(ctx: Context, spec: Spec) -> Built:
    """DataInf on any Objective: W1's closed form, W2's TorchObjective; damping by name (wd, wd + mu) or number."""
    p = spec.params
    objective = ctx.objective("hessian") if ctx.name == "w1" else ctx.torch_objective
    blocks = _contiguous_layer_blocks(ctx) if p.get("per_layer") else None
    damping = {"weight_decay": ctx.weight_decay, "wd+mu": ctx.weight_decay + ctx.damping}.get(p.get("damping"), p.get("damping"))
    solver = DataInfSolver(objective, damping=damping, blocks=blocks, chunk_size=p.get("chunk_size", 1024),
                           measure_residuals=False)
    return solver, objective, {"block_damping": [float(f"{d:.3g}") for d in solver.block_damping]}


BUILDERS: dict[str, Callable[[Context, Spec], Built]] = {
    "exact": _exact,
    "cg": _cg,
    "cg-jacobi": _cg_jacobi,
    "cg-nystrom": _cg_nystrom,
    "cg-kfac": _cg_kfac,
    "block-cg": _block_cg,
    "lissa": _lissa,
    "arnoldi": _arnoldi,
    "nystrom-sketch": _nystrom_sketch,
    "kfac": _kfac,
    "ekfac": _kfac,
    "datainf": _datainf,
}
KNOWN_METHODS = ("baseline", *BUILDERS)  # the baseline row loads the workload only
