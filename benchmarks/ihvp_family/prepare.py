"""The prepare step (one worker per workload, before its rows): load MNIST, train the model, compute the references.

Everything it computes is cached (:mod:`.cache`); a rerun with the same settings reads it back. A cached reference
is reused only if it was computed for the same weights (fingerprint).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from influencekit.curvature import GaussNewtonOperator, HessianOperator
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.scores.influence import InfluenceFunction
from influencekit.solvers import CGSolver, DirectSolver

from .cache import fingerprint, load_cached, load_mnist_subset, reference_path, save_cached, w1_weights_path, w2_model_path
from .context import make_mlp
from .util import log
from .workloads import REFERENCE_RTOL

LBFGS_ITERATIONS_PER_STEP = 100


def prepare(cfg: dict) -> dict[str, Any]:
    """Data, trained model and references of the workload (cached); returns what was done, for the report."""
    t0 = time.perf_counter()
    x, y, test = load_mnist_subset(cfg)
    info: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    if cfg["name"] == "w1":
        info.update(_prepare_w1(cfg, x, y, test))
    else:
        info.update(_prepare_w2(cfg, x, y, test))
    return info


def _cached_reference(path: Path, weights_fingerprint: str) -> dict | None:
    """The cached reference's metadata (marked cached) if it was computed for these weights, else None."""
    cached = load_cached(path)
    if cached is None or cached[1].get("weights") != weights_fingerprint:
        return None
    return {**cached[1], "cached": True}


def _reference_solve(objective, solver, test) -> tuple[Any, float, float]:
    """(scores, relative residual of the iHVP, seconds) of the reference solver's influences on the test batch."""
    start = time.perf_counter()
    scores = InfluenceFunction(objective, solver).scores(test)
    rhs = objective.measurement_gradients(test)[0]
    relative_residual = float(scores.inverse_hvp.residual_norms[0] / rhs.norm())
    return scores, relative_residual, time.perf_counter() - start


def _save_reference(path: Path, scores, meta: dict) -> None:
    save_cached(path, {"x": scores.inverse_hvp.solution[0], "influence": scores.influence_on_loss[0]}, meta)


# -- W1: softmax regression, Cholesky reference ---------------------------------------------------------------------
def _prepare_w1(cfg: dict, x: torch.Tensor, y: torch.Tensor, test) -> dict[str, Any]:
    weights, training = _fit_w1(cfg, x, y)
    return {"training": training, "reference_hessian": _w1_reference(cfg, weights, x, y, test)}


def _fit_w1(cfg: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """W1's weights by Newton-CG to ||grad R|| <= 1e-10 (or from the cache) and the fit's summary."""
    cached = load_cached(w1_weights_path(cfg))
    if cached is None:
        log(f"w1: fitting softmax regression on n = {cfg['n']:,} (Newton-CG to ||grad R|| <= 1e-10)")
        fit = fit_softmax_regression(x, y, cfg["weight_decay"], num_classes=10)
        meta = {"gradient_norm": fit.gradient_norm, "newton_steps": fit.newton_steps,
                "cg_iterations": fit.cg_iterations, "train_s": fit.seconds}
        save_cached(w1_weights_path(cfg), {"weights": fit.weights}, meta)
        weights = fit.weights
    else:
        weights, meta = cached[0]["weights"], {**cached[1], "cached": True}
    log(f"w1: ||grad R|| = {meta['gradient_norm']:.2e} ({meta['newton_steps']} Newton steps, {meta['train_s']:.1f} s"
        f"{', cached' if meta.get('cached') else ''})")
    return weights, meta


def _w1_reference(cfg: dict, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor, test) -> dict:
    """Cholesky of the explicit Hessian (or the cached one for these weights)."""
    path, fp = reference_path(cfg, "hessian"), fingerprint(weights)
    cached = _cached_reference(path, fp)
    if cached is not None:
        return cached
    log("w1: reference = Cholesky of the explicit Hessian")
    objective = SoftmaxRegressionObjective(weights, x, y, cfg["weight_decay"])
    solver = DirectSolver(HessianOperator(objective), damping=cfg["damping"])
    scores, relative_residual, seconds = _reference_solve(objective, solver, test)
    meta = {"weights": fp, "solver": "DirectSolver (Cholesky)", "seconds": seconds, "relative_residual": relative_residual}
    _save_reference(path, scores, meta)
    return meta


# -- W2: MLP by L-BFGS, CG references -------------------------------------------------------------------------------
def _prepare_w2(cfg: dict, x: torch.Tensor, y: torch.Tensor, test) -> dict[str, Any]:
    model, training = _trained_w2(cfg, x, y)
    info: dict[str, Any] = {"training": training}
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=cfg["weight_decay"], chunk_size=cfg["chunk_size"])
    fp = fingerprint(objective.parameters_vector())
    for kind in ["ggn"] + (["hessian"] if cfg["hessian_reference"] else []):
        info[f"reference_{kind}"] = _cached_reference(reference_path(cfg, kind), fp) or _w2_reference(cfg, objective, test, kind, fp)
    return info


def _trained_w2(cfg: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, dict]:
    """W2's MLP trained by L-BFGS (or from the cache), in eval mode, and the training summary."""
    cached = load_cached(w2_model_path(cfg))
    model = make_mlp(cfg)
    if cached is None:
        meta = _train_w2(cfg, model, x, y)
        _save_trained(cfg, model, x, y, meta)
    else:
        model.load_state_dict(cached[0])
        meta = {**cached[1], "cached": True}
    model.eval()
    log(f"w2: ||grad R|| = {meta['gradient_norm']:.2e} after {meta['iterations']} L-BFGS iterations "
        f"({meta['train_s']:.1f} s{', cached' if meta.get('cached') else ''}), train accuracy {meta['train_accuracy']:.4f}")
    return model, meta


def _train_w2(cfg: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Full-batch L-BFGS (strong Wolfe) on R = mean CE + (wd/2)||theta||^2 to ||grad R|| <= gtol or max_iter iterations.

    Runs in steps of at most 100 iterations, logging R and ||grad R|| after each; stops early when an L-BFGS step
    accepts no iteration (stalled) or the gradient is not finite.
    """
    log(f"w2: training MLP 784-{cfg['hidden']}-10 on n = {cfg['n']:,} by full-batch L-BFGS to ||grad R|| <= {cfg['gtol']:g}")
    params = list(model.parameters())
    wd = cfg["weight_decay"]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=LBFGS_ITERATIONS_PER_STEP, history_size=50, tolerance_grad=0.0,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * wd * sum((q * q).sum() for q in params)
        loss.backward()
        return loss

    start, done, norm = time.perf_counter(), 0, math.inf
    while done < cfg["max_iter"]:
        optimizer.param_groups[0]["max_iter"] = min(LBFGS_ITERATIONS_PER_STEP, cfg["max_iter"] - done)
        loss = optimizer.step(closure)
        previous, done = done, optimizer.state[params[0]]["n_iter"]
        closure()
        norm = float(torch.cat([q.grad.reshape(-1) for q in params]).norm())
        log(f"w2: L-BFGS iteration {done}: R = {float(loss):.10f}, ||grad R|| = {norm:.2e}")
        if norm <= cfg["gtol"] or not math.isfinite(norm) or done == previous:
            break  # converged, broken, or stalled (no accepted step)
    optimizer.zero_grad()
    return {"iterations": done, "train_s": time.perf_counter() - start}


def _save_trained(cfg: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor, meta: dict) -> None:
    """Adds the trained model's ||grad R||, R and training accuracy to ``meta``, and caches model and summary."""
    model.eval()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=cfg["weight_decay"], chunk_size=cfg["chunk_size"])
    meta["gradient_norm"] = float(objective.objective_gradient().norm())
    meta["objective"] = objective.objective_value()
    meta["train_accuracy"] = float((model(x).argmax(1) == y).double().mean())
    save_cached(w2_model_path(cfg), {k: v.detach() for k, v in model.state_dict().items()}, meta)


def _w2_reference(cfg: dict, objective: TorchObjective, test, kind: str, weights_fingerprint: str) -> dict:
    """CG (rtol 1e-10) on the damped GGN or Hessian; not cached (and not used) if it meets negative curvature."""
    log(f"w2: reference = CG on the damped {kind.upper()} (damping {cfg['damping']:g}, rtol {REFERENCE_RTOL:g})")
    operator = GaussNewtonOperator(objective) if kind == "ggn" else HessianOperator(objective)
    solver = CGSolver(operator, damping=cfg["damping"], rtol=REFERENCE_RTOL)
    scores, relative_residual, seconds = _reference_solve(objective, solver, test)
    solve = scores.inverse_hvp
    meta = {"weights": weights_fingerprint, "solver": f"CG rtol {REFERENCE_RTOL:g}", "seconds": seconds,
            "iterations": int(solve.iterations[0]), "relative_residual": relative_residual,
            "converged": bool(solve.info["converged"][0]),
            "negative_curvature": bool(solve.info["negative_curvature"][0])}
    log(f"w2: {kind} reference: {meta['iterations']} iterations, relative residual {meta['relative_residual']:.1e}, "
        f"{meta['seconds']:.1f} s")
    if meta["negative_curvature"]:
        log(f"w2: CG met negative curvature on the damped {kind}: no {kind} reference")
    else:
        _save_reference(path=reference_path(cfg, kind), scores=scores, meta=meta)
    return meta
