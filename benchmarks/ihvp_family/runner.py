"""Running rows: the parent starts one fresh worker process per job (``run_job``); the worker (``worker_main``)
runs the prepare step or one row (``run_method``), compares it with the references (``compare``) and writes its
result as JSON. A fresh process per row makes ``peak MB`` that row's own ru_maxrss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from influencekit.memory import peak_rss_mb
from influencekit.scores.influence import InfluenceFunction

from .context import Context
from .prepare import prepare
from .solvers import build_solver
from .util import json_default, log
from .workloads import ITERATION_BAR_RTOL, Spec

ENTRY_POINT = Path(__file__).resolve().parent.parent / "bench_ihvp_family.py"  # its --worker mode runs worker_main


# ----------------------------------------------------------------------------------------------------------------------
# Worker side: one process per job
# ----------------------------------------------------------------------------------------------------------------------
def iterations_to(history: torch.Tensor | None, rhs_norm: float, rtol: float) -> int | None:
    """First iteration whose residual norm is <= rtol ||b|| (row 0), or None."""
    if history is None:
        return None
    values = history[:, 0] if history.dim() == 2 else history
    hits = (values <= rtol * rhs_norm).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def run_method(ctx: Context, spec: Spec) -> dict[str, Any]:
    """Fit, solve and score one row (timed as fit / solve / score), then its notes and its errors against the references.

    Solve = test gradient and iHVP, as ``InfluenceFunction.scores`` does; score = I_up,loss of all n training points.
    """
    out: dict[str, Any] = {"baseline_mb": peak_rss_mb()}
    start = time.perf_counter()
    solver, objective, notes = build_solver(ctx, spec)
    fitted = time.perf_counter()
    result = InfluenceFunction(objective, solver, allow_unconverged=True).inverse_hvp_of_test(ctx.test)  # capped solves are measured, not refused
    solved = time.perf_counter()
    scores = -objective.train_gradient_dots(result.solution)[0]
    scored = time.perf_counter()
    out.update(fit_s=fitted - start, solve_s=solved - fitted, score_s=scored - solved, seconds=scored - start)
    out["peak_mb"] = peak_rss_mb()
    rhs_norm = float(objective.measurement_gradients(ctx.test)[0].norm())
    notes.update(solve_notes(spec, result, rhs_norm))
    if spec.method == "exact":
        notes.update(spectrum_notes(solver))
        out["peak_mb"] = max(out["peak_mb"], peak_rss_mb())
    out["notes"] = notes
    out.update(compare(ctx, spec, result.solution[0].detach(), scores))
    return out


def solve_notes(spec: Spec, result, rhs_norm: float) -> dict[str, Any]:
    """What the solve's evidence says: iterations (and to relative residual 1e-8), products, convergence, residual."""
    notes: dict[str, Any] = {}
    info = result.info or {}
    if result.iterations is not None:
        notes["iterations"] = int(result.iterations[0])
    if spec.method == "block-cg":
        notes["products"] = int(info.get("products", 0))
    if "residual_history" in info:
        notes["iterations_to_1e-8"] = iterations_to(info["residual_history"], rhs_norm, ITERATION_BAR_RTOL)
    if "converged" in info:
        notes["converged"] = bool(info["converged"][0])
    if info.get("negative_curvature") is not None and bool(info["negative_curvature"][0]):
        notes["negative_curvature"] = True
    if "block_results" in info:
        notes["block_iterations"] = {name: int(r.iterations[0]) for name, r in info["block_results"].items()
                                     if r.iterations is not None}
    if result.residual_norms is not None:
        notes["relative_residual"] = float(result.residual_norms[0]) / rhs_norm
    return notes


def spectrum_notes(solver) -> dict[str, Any]:
    """The exact solver's spectrum (eigvalsh of the explicit (p, p) matrix: the same cost at any n) and its seconds."""
    t0 = time.perf_counter()
    spectrum = solver.spectrum()
    return {"spectrum": {"min": spectrum.min, "max": spectrum.max, "condition": spectrum.condition_number,
                         "negative": spectrum.negative, "zero": spectrum.zero, "how": "eigvalsh"},
            "spectrum_s": time.perf_counter() - t0}


def compare(ctx: Context, spec: Spec, x: torch.Tensor, scores: torch.Tensor) -> dict[str, Any]:
    """iHVP relative error, Pearson and Spearman of the influences against every reference; the row's own on top."""
    import numpy as np  # scipy is imported here only, so the baseline rows do not count it
    import scipy.stats

    out: dict[str, Any] = {"reference": ctx.reference_for(spec.curvature)}
    for kind, ref in ctx.references.items():
        rel = float((x - ref["x"]).norm() / ref["x"].norm())
        a, b = scores.detach().numpy(), ref["influence"].numpy()
        finite = bool(np.isfinite(a).all())
        pearson = float(scipy.stats.pearsonr(a, b)[0]) if finite else float("nan")
        spearman = float(scipy.stats.spearmanr(a, b)[0]) if finite else float("nan")
        out[f"vs_{kind}"] = {"rel_error": rel, "pearson": pearson, "spearman": spearman}
    chosen = out.get(f"vs_{out['reference']}")
    if chosen is not None:
        out.update(chosen)
    return out


def run_row(cfg: dict, spec: Spec) -> dict[str, Any]:
    """Load the workload's context, then run the row (the baseline row stops after loading)."""
    t0 = time.perf_counter()
    ctx = Context(cfg)
    if spec.method == "baseline":
        return {"status": "ok", "seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(),
                "notes": {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}}
    if ctx.reference_for(spec.curvature) not in ctx.references:
        log(f"{spec.key}: no {ctx.reference_for(spec.curvature)} reference; errors are against what exists")
    return {**run_method(ctx, spec), "status": "ok"}


def worker_main(job_path: str) -> int:
    """Run the job described in ``job_path``; every failure becomes an error result. Always writes the result file."""
    job = json.loads(Path(job_path).read_text())
    cfg, spec = job["config"], Spec(**job["spec"])
    result: dict[str, Any] = {"spec": asdict(spec)}
    try:
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        if job["kind"] == "prepare":
            result.update(prepare=prepare(cfg), status="ok")
        else:
            result.update(run_row(cfg, spec))
    except BaseException as error:  # noqa: BLE001 - every failure becomes a row
        result.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(),
                      peak_mb=peak_rss_mb())
        log(f"{spec.key}: FAILED: {result['error']}")
    Path(job["result"]).write_text(json.dumps(result, default=json_default))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------------
def run_job(kind: str, cfg: dict, spec: Spec, jobs_dir: Path, timeout: float | None) -> dict[str, Any]:
    """Run a "prepare" or "method" job in a fresh worker process; its result, or an error row if it died or timed out."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stem = spec.key.replace("/", "_") if kind != "prepare" else f"{cfg['name']}_prepare"
    job_path, result_path = jobs_dir / f"{stem}.job.json", jobs_dir / f"{stem}.result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({"kind": kind, "config": cfg, "spec": asdict(spec), "result": str(result_path)}))
    start = time.perf_counter()
    env = dict(os.environ)
    if cfg.get("threads"):
        env.update(OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    try:
        proc = subprocess.run([sys.executable, str(ENTRY_POINT), "--worker", str(job_path)], env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout:g} s (worker killed)", start)
    if not result_path.exists():
        why = "killed by a signal (out of memory?)" if proc.returncode < 0 else "no result"
        return _failed(spec, f"worker exited with rc {proc.returncode}: {why}", start)
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def _failed(spec: Spec, error: str, start: float) -> dict[str, Any]:
    return {"spec": asdict(spec), "status": "error", "error": error, "wall_s": time.perf_counter() - start}
