"""The report: Markdown table with notes, setup lines, the Nystroem-PCG iteration bar, and results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .util import json_default


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or "-" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


# -- the table ------------------------------------------------------------------------------------------------------
def notes_text(row: dict[str, Any]) -> str:
    """The row's last column: failure, or the solve's evidence, the time split, memory, setting and reference."""
    if row.get("status") != "ok":
        return "**FAILED**: " + row.get("error", "?").replace("|", "/").replace("\n", " ")[:300]
    n = row.get("notes", {})
    if row["spec"]["method"] == "baseline":
        return f"load {n.get('load_s', 0):.1f} s, {n.get('threads')} threads"
    parts = [*_solve_parts(n), *_fit_parts(n)]
    if "spectrum" in n:
        parts.append(_spectrum_part(n))
    parts.append(f"fit {row['fit_s']:.2f} / solve {row['solve_s']:.2f} / score {row['score_s']:.2f} s")
    parts.append(f"+{row['peak_mb'] - row['baseline_mb']:.0f} MB")
    parts.append(f"{row['spec']['describe']}; ref: {row.get('reference')}")
    return "; ".join(parts)


def _solve_parts(n: dict[str, Any]) -> list[str]:
    """Iterations, products, per-block iterations, convergence and residual."""
    parts = []
    if "iterations" in n:
        text = f"{n['iterations']} it"
        if n.get("iterations_to_1e-8") is not None:
            text += f" ({n['iterations_to_1e-8']} to 1e-8)"
        parts.append(text)
    if "products" in n:
        parts.append(f"{n['products']} products")
    if "block_iterations" in n:
        parts.append("block it " + ", ".join(f"{k}: {v}" for k, v in n["block_iterations"].items()))
    if n.get("converged") is False:
        parts.append("NOT converged")
    if n.get("negative_curvature"):
        parts.append("negative curvature met")
    if "relative_residual" in n:
        parts.append(f"rel. res. {n['relative_residual']:.1e}")
    return parts


def _fit_parts(n: dict[str, Any]) -> list[str]:
    """What the fit chose or met: LiSSA's scale, Nystroem's lambda_r, clamped diagonal, DataInf's damping, Arnoldi's."""
    parts = []
    if "scale" in n:
        parts.append(f"scale {n['scale']:.3g}")
    if "lambda_r" in n:
        parts.append(f"lambda_r {n['lambda_r']:.3g}")
    if n.get("clamped"):
        parts.append(f"{n['clamped']} clamped")
    if "block_damping" in n:
        parts.append("lambda_l " + ", ".join(f"{d:g}" for d in n["block_damping"]))
    if n.get("restarts"):
        parts.append(f"{n['restarts']} restarts")
    if n.get("negative_eigenvalues"):
        parts.append(f"{n['negative_eigenvalues']} negative Ritz values")
    return parts


def _spectrum_part(n: dict[str, Any]) -> str:
    s = n["spectrum"]
    return (f"spectrum ({s['how']}) {n['spectrum_s']:.1f} s: eig [{s['min']:.3g}, {s['max']:.3g}], cond {s['condition']:.3g}, "
            f"{s['negative']} < 0")


HEADER = ("| workload | method | curvature | setting | seconds | peak MB | iHVP rel. error | Pearson | Spearman | "
          "iterations / notes |\n|---|---|---|---|---:|---:|---:|---:|---:|---|")


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown results table, one line per row (timings and errors blank for failed rows)."""
    lines = [HEADER]
    for row in rows:
        s = row["spec"]
        ok = row.get("status") == "ok"
        lines.append(
            f"| {s['workload']} | {s['method']} | {s['curvature']} | {s['setting']} "
            f"| {fmt(row.get('seconds') if ok else None, '.2f')} | {fmt(row.get('peak_mb'), '.0f')} "
            f"| {fmt(row.get('rel_error') if ok else None, '.2e')} | {fmt(row.get('pearson') if ok else None, '.6f')} "
            f"| {fmt(row.get('spearman') if ok else None, '.6f')} | {notes_text(row)} |"
        )
    return "\n".join(lines)


def iteration_bar(rows: list[dict[str, Any]]) -> list[str]:
    """Iterations to relative residual 1e-8, plain CG vs Nystroem-PCG (the bar, on W1: PCG <= CG / 2)."""
    def find(workload, method, curvature, setting):
        for row in rows:
            s = row["spec"]
            if (s["workload"], s["method"], s["curvature"], s["setting"]) == (workload, method, curvature, setting):
                return row.get("notes", {}).get("iterations_to_1e-8") if row.get("status") == "ok" else None
        return None

    lines = []
    for workload, curvature in (("w1", "hessian"), ("w2", "ggn")):
        cg = find(workload, "cg", curvature, "default")
        for setting in ("default", "tuned"):
            pcg = find(workload, "cg-nystrom", curvature, setting)
            if cg is None or pcg is None:
                continue
            text = (f"- {workload.upper()} ({curvature}), iterations to relative residual 1e-8: CG {cg}, "
                    f"Nystroem-PCG ({setting}) {pcg}, ratio {pcg / cg:.2f}")
            if workload == "w1":
                text += f": {'meets' if pcg <= cg / 2 else 'MISSES'} the bar (<= 0.50)"
            lines.append(text)
    return lines


NOTES = """\
- **seconds** = fit (constructor, factors, sketch or preconditioner) + solve (test gradient and iHVP) + scoring all n
  training points (`train_gradient_dots`), in a fresh worker process; imports, data loading, model training and the
  reference are excluded. The notes split it as fit / solve / score.
- **peak MB** = ru_maxrss of the worker process (Python, torch, the n training images, model, reference and the
  method; the prepare step caches the workload's images, so workers never hold all of MNIST). The
  `baseline` row is a worker that only loads those; "+N MB" in the notes is a row's peak above its own baseline.
- **iHVP rel. error** = ||x - x_ref|| / ||x_ref||; **Pearson / Spearman** compare I_up,loss of all n training points
  on test image 8 with the reference's. "ref:" names the reference: W1, Cholesky of the explicit Hessian (the model
  is linear, so GGN == Hessian); W2, CG (rtol 1e-10) on the damped GGN for GGN, block-diagonal, K-FAC, EK-FAC and
  empirical-Fisher rows, on the damped Hessian for Hessian rows. results.json has both for every row.
- W1's Hessian rows use the closed-form `SoftmaxRegressionObjective` (products and scoring); GGN, Fisher, K-FAC and
  EK-FAC rows the `TorchObjective` of `nn.Linear(784, 10, bias=False)`; DataInf the closed-form objective's
  per-example gradients (it needs only an `Objective`; the numbers are the same).
- W2: every method adds damping mu = 1e-3 to its curvature (on top of the weight decay), as the references do;
  DataInf's damping is its own (paper default, or wd + mu when tuned).
- CG "N it (M to 1e-8)": iterations to its tolerance, and to relative residual 1e-8 (from its residual history).
  LiSSA "it" = depth x repeats. Nystroem sketch-and-solve sketches the data term M - wd I and uses damping wd (+ mu),
  so directions outside the sketch keep exactly the weight decay. Arnoldi drops the part of b outside its subspace.
- K-FAC / EK-FAC "tuned" only enlarges the fitting chunks (speed; K-FAC never uses chunks larger than the
  objective's): extra damping (+1e-3 ... +1e-1) moved both further from the reference on the quick workloads, so the
  damping stays at the reference's.
"""

QUICK_NOTE = ("Small sizes (W1 n = 3,000, W2 n = 1,000); W2's LiSSA depth 1000 and tuned Arnoldi rank 100 "
              "(Krylov 200). Not the benchmark's numbers.")


# -- the setup section ----------------------------------------------------------------------------------------------
def setup_lines(prepared: dict[str, dict]) -> list[str]:
    """One line per workload (two more for W2's references): sizes, training and reference, or the prepare failure."""
    lines = []
    for name, info in prepared.items():
        if info.get("status") != "ok":
            lines.append(f"- {name}: prepare FAILED: {info.get('error')}")
        elif name == "w1":
            lines.append(_w1_setup(info["config"], info["prepare"]))
        else:
            lines.extend(_w2_setup(info["config"], info["prepare"]))
    return lines


def _cached(meta: dict) -> str:
    return ", cached" if meta.get("cached") else ""


def _w1_setup(cfg: dict, p: dict) -> str:
    t, ref = p["training"], p["reference_hessian"]
    return (f"- W1: n = {cfg['n']:,}, p = 7,840, weight decay {cfg['weight_decay']:g}, damping 0; "
            f"Newton-CG fit ||grad R|| = {t['gradient_norm']:.2e} ({t['newton_steps']} steps, "
            f"{t['train_s']:.1f} s{_cached(t)}); reference: {ref['solver']}, relative residual "
            f"{ref['relative_residual']:.1e} ({ref['seconds']:.1f} s{_cached(ref)}). GGN == Hessian (linear model).")


def _w2_setup(cfg: dict, p: dict) -> list[str]:
    t = p["training"]
    lines = [f"- W2: n = {cfg['n']:,}, p = 101,770, weight decay {cfg['weight_decay']:g}, damping "
             f"{cfg['damping']:g}; L-BFGS {t['iterations']} iterations ({t['train_s']:.1f} s{_cached(t)}), "
             f"||grad R|| = {t['gradient_norm']:.2e}, R = {t['objective']:.6f}, train accuracy "
             f"{t['train_accuracy']:.4f}."]
    for kind in ("ggn", "hessian"):
        ref = p.get(f"reference_{kind}")
        if ref is None:
            lines.append(f"  - {kind} reference: not computed")
            continue
        lines.append(f"  - {kind} reference: {ref['solver']}: {ref['iterations']} iterations, relative residual "
                     f"{ref['relative_residual']:.1e}, {ref['seconds']:.1f} s{_cached(ref)}"
                     + ("; NEGATIVE CURVATURE met: not used" if ref.get("negative_curvature") else ""))
    return lines


# -- the files ------------------------------------------------------------------------------------------------------
def markdown_report(command: str, header: list[str], prepared: dict, rows: list[dict], bar: list[str]) -> str:
    """results.md: command, header, setup, table, notes, the iteration bar and the quick-mode caveat (if they apply)."""
    quick = any(p.get("config", {}).get("quick") for p in prepared.values())
    return "\n".join(
        ["# iHVP family: performance and fidelity", "", "```", command, "```", "", *header, "",
         "## Setup", "", *setup_lines(prepared), "", "## Results", "", table(rows), "", "## Notes", "", NOTES,
         *(["## Nystroem-PCG iteration bar", "", *bar, ""] if bar else []),
         *(["## Quick mode", "", QUICK_NOTE, ""] if quick else [])]
    )


def write_outputs(out: Path, command: str, header: list[str], prepared: dict, rows: list[dict]) -> str:
    """Write results.md and results.json under ``out`` (rewritten after every row); returns the Markdown."""
    bar = iteration_bar(rows)
    markdown = markdown_report(command, header, prepared, rows, bar)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown + "\n")
    payload = {"command": command, "prepared": prepared, "rows": rows, "iteration_bar": bar}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=json_default))
    return markdown
