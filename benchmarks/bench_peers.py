"""influencekit against dattri 0.3.0, pyDVL 0.10.0, Captum 0.9.0 and kronfluence 1.0.1 at matched iHVP accuracy
(issue 15, item 2). Install the peers with ``pip install -e .[peers]`` (or ``--no-deps`` for each: torch stays 2.13.0).

Workloads (``--workload``, sizes by ``--n``):

* ``w1``: Koh & Liang's MNIST logistic regression (``nn.Linear(784, 10, bias=False)``, wd 0.01, test image 8);
  reference: float64 Cholesky of the explicit Hessian (``ihvp_family``'s cache; at n = 55,000 seeded from
  ``bench_generic_w1.py``'s cache in ``--generic-work``).
* ``w2``: the MLP 784-128(tanh)-10 of ``ihvp_family`` (L-BFGS to ||grad R|| <= 1e-6, wd 1e-3, damping 1e-3);
  references: CG rtol 1e-10 in float64 on the damped Hessian (and GGN, for K-FAC/EK-FAC/DataInf).
* ``cnn``: the Figure 2 right-panel CNN (``koh_liang_cnn``, 2,616 parameters), fitted briefly (Adam then
  L-BFGS: a model for timing, not a verified optimum); reference: CG rtol 1e-10 in float64 on H + damping I.

Each row runs in a fresh process (``peak MB`` = its ru_maxrss; ``base MB`` = after loading the workload). A row
computes s = (H + damping I)^-1 g_test in ``--dtype`` (default float32) and is timed from its solver's
construction to the iHVP (fit + solve: data loaders, factor fits and set-up included; loading the workload
not). Scores I_up,loss of all n training points are then computed from each row's s by the same routine
(``TorchObjective.train_gradient_dots``) for the Pearson column, except for kronfluence, which only returns
scores: its time includes its scores of all n points. Rows run interleaved ``--repeats`` times; each row
keeps its fastest run. ``convention``: the library's own score API on the first 64 training points, r_i,
fitted as r_i = c <s_exact, g_i>: c = +1 is <H^-1 g_test, g_i> (= -I_up,loss), c = -1 is I_up,loss.

    python benchmarks/bench_peers.py --workload w1 --n 55000 --only "CG" --out /tmp/peers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ihvp_family.util import json_default, log  # noqa: E402

W1_N, W2_N, CNN_N = 55_000, 1_000, 500


def rows(workload: str) -> list[dict[str, Any]]:
    """(label, library, method, params) of the workload's rows, in run order; settings tuned to matched iHVP error."""
    ik = "influencekit"
    if workload == "w1":
        return [
            dict(label="influencekit CG (TorchObjective), rtol 1e-5", library=ik, method="any", params={"method": "cg", "rtol": 1e-5}),
            dict(label="influencekit CG (closed form), rtol 1e-5", library=ik, method="any", params={"method": "cg", "rtol": 1e-5, "closed_form": True}),
            dict(label="influencekit CG (TorchObjective, one chunk of n), rtol 1e-5", library=ik, method="any",
                 params={"method": "cg", "rtol": 1e-5, "objective_chunk": W1_N}),
            dict(label="influencekit CG (TorchObjective), rtol 5e-5", library=ik, method="any", params={"method": "cg", "rtol": 5e-5}),
            dict(label="influencekit CG + K-FAC preconditioner (TorchObjective), rtol 1e-5", library=ik, method="any",
                 params={"method": "cg-kfac", "rtol": 1e-5}),
            dict(label="dattri CG, max_iter 50", library="dattri", method="cg", params={"max_iter": 50}),
            dict(label="dattri CG, max_iter 100", library="dattri", method="cg", params={"max_iter": 100}),
            dict(label="pyDVL CG, rtol 1e-5, maxiter 100", library="pydvl", method="cg", params={"rtol": 1e-5, "maxiter": 100, "batch_size": 5500}),
            dict(label="influencekit LiSSA, depth 1000, B 100, T 1", library=ik, method="any",
                 params={"method": "lissa", "scale": "auto", "depth": 1000, "repeats": 1, "batch_size": 100}),
            dict(label="dattri LiSSA, depth 1000, B 100, T 1", library="dattri", method="lissa",
                 params={"scaling": 25.0, "depth": 1000, "repeats": 1, "batch_size": 100}),
            dict(label="pyDVL LiSSA, depth 1000, B 100", library="pydvl", method="lissa",
                 params={"scale": 25.0, "depth": 1000, "batch_size": 100}),
            # matched accuracy: the scale influencekit's "auto" picks at n = 1,000 (3.62, logged in its notes)
            dict(label="pyDVL LiSSA, depth 1000, B 100, scale 3.62", library="pydvl", method="lissa",
                 params={"scale": 3.62, "depth": 1000, "batch_size": 100}),
            dict(label="dattri LiSSA, depth 1000, B 100, T 1, scaling 3.62", library="dattri", method="lissa",
                 params={"scaling": 3.62, "depth": 1000, "repeats": 1, "batch_size": 100}),
            dict(label="influencekit Arnoldi, rank 100 (Krylov 200)", library=ik, method="any",
                 params={"method": "arnoldi", "rank": 100, "krylov_dim": 200}),
            dict(label="dattri Arnoldi, top_k 100, max_iter 200", library="dattri", method="arnoldi", params={"top_k": 100, "max_iter": 200}),
            dict(label="pyDVL Arnoldi, rank 100 (Krylov 200)", library="pydvl", method="arnoldi",
                 params={"rank": 100, "krylov_dim": 200, "batch_size": 5500}),
            dict(label="Captum Arnoldi, projection 100, arnoldi_dim 200", library="captum", method="arnoldi",
                 params={"projection_dim": 100, "arnoldi_dim": 200, "batch_size": 5500}),
            dict(label="influencekit EK-FAC", library=ik, method="any", params={"method": "ekfac", "curvature": "ggn", "chunk_size": 4096}),
            dict(label="pyDVL EK-FAC", library="pydvl", method="ekfac", params={"batch_size": 5500}),
            dict(label="kronfluence EK-FAC (with scores of all n)", library="kronfluence", method="ekfac",
                 params={"strategy": "ekfac", "batch_size": 5500}),
            dict(label="influencekit DataInf, damping = wd", library=ik, method="any",
                 params={"method": "datainf", "damping": "weight_decay", "chunk_size": 4096, "curvature": "fisher"}),
            dict(label="pyDVL DataInf (InverseHarmonicMean), regularization = wd", library="pydvl", method="datainf",
                 params={"regularization": 0.01, "batch_size": 5500}),
        ]
    if workload == "w2":
        return [
            dict(label="influencekit CG (Hessian), rtol 1e-5", library=ik, method="any", params={"method": "cg", "rtol": 1e-5}),
            dict(label="influencekit CG (Hessian), rtol 1e-4", library=ik, method="any", params={"method": "cg", "rtol": 1e-4}),
            dict(label="influencekit CG (Hessian), rtol 3e-6", library=ik, method="any", params={"method": "cg", "rtol": 3e-6}),
            dict(label="influencekit CG (Hessian), rtol 1e-6", library=ik, method="any", params={"method": "cg", "rtol": 1e-6}),
            dict(label="influencekit CG + K-FAC preconditioner (Hessian), rtol 1e-5", library=ik, method="any",
                 params={"method": "cg-kfac", "rtol": 1e-5}),
            dict(label="dattri CG, max_iter 100", library="dattri", method="cg", params={"max_iter": 100}),
            dict(label="dattri CG, max_iter 150", library="dattri", method="cg", params={"max_iter": 150}),
            dict(label="pyDVL CG, rtol 1e-5, maxiter 100", library="pydvl", method="cg", params={"rtol": 1e-5, "maxiter": 100, "batch_size": 1000}),
            dict(label="influencekit LiSSA, depth 1000, B 100", library=ik, method="any",
                 params={"method": "lissa", "scale": "auto", "depth": 1000, "repeats": 1, "batch_size": 100}),
            dict(label="dattri LiSSA, depth 1000, B 100", library="dattri", method="lissa",
                 params={"scaling": 25.0, "depth": 1000, "repeats": 1, "batch_size": 100}),
            dict(label="pyDVL LiSSA, depth 1000, B 100", library="pydvl", method="lissa", params={"scale": 25.0, "depth": 1000, "batch_size": 100}),
            dict(label="influencekit Arnoldi, rank 100 (Krylov 200)", library=ik, method="any",
                 params={"method": "arnoldi", "rank": 100, "krylov_dim": 200}),
            dict(label="dattri Arnoldi, top_k 100, max_iter 200", library="dattri", method="arnoldi", params={"top_k": 100, "max_iter": 200}),
            dict(label="pyDVL Arnoldi, rank 100 (Krylov 200)", library="pydvl", method="arnoldi",
                 params={"rank": 100, "krylov_dim": 200, "batch_size": 1000}),
            dict(label="Captum Arnoldi, projection 100, arnoldi_dim 200", library="captum", method="arnoldi",
                 params={"projection_dim": 100, "arnoldi_dim": 200, "batch_size": 1000}),
            dict(label="influencekit EK-FAC (GGN)", library=ik, method="any", params={"method": "ekfac", "curvature": "ggn", "chunk_size": 1000}),
            dict(label="pyDVL EK-FAC", library="pydvl", method="ekfac", params={"batch_size": 1000}),
            dict(label="kronfluence EK-FAC (with scores of all n)", library="kronfluence", method="ekfac",
                 params={"strategy": "ekfac", "batch_size": 1000}),
            dict(label="influencekit DataInf per layer, damping = wd + mu", library=ik, method="any",
                 params={"method": "datainf", "per_layer": True, "damping": "wd+mu", "chunk_size": 250, "curvature": "fisher"}),
            dict(label="pyDVL DataInf per layer, regularization = wd + mu", library="pydvl", method="datainf",
                 params={"regularization": 2e-3, "per_layer": True, "batch_size": 1000}),
        ]
    return [
        dict(label="influencekit CG, rtol 1e-5", library=ik, method="any", params={"method": "cg", "rtol": 1e-5}),
        dict(label="influencekit CG + K-FAC preconditioner, rtol 1e-5", library=ik, method="any", params={"method": "cg-kfac", "rtol": 1e-5}),
        dict(label="dattri CG, max_iter 100", library="dattri", method="cg", params={"max_iter": 100}),
        dict(label="pyDVL CG, rtol 1e-5, maxiter 100", library="pydvl", method="cg", params={"rtol": 1e-5, "maxiter": 100, "batch_size": 500}),
        dict(label="influencekit LiSSA, depth 1000, B 50", library=ik, method="any",
             params={"method": "lissa", "scale": "auto", "depth": 1000, "repeats": 1, "batch_size": 50}),
        dict(label="dattri LiSSA, depth 1000, B 50", library="dattri", method="lissa",
             params={"scaling": 25.0, "depth": 1000, "repeats": 1, "batch_size": 50}),
        dict(label="pyDVL LiSSA, depth 1000, B 50", library="pydvl", method="lissa", params={"scale": 25.0, "depth": 1000, "batch_size": 50}),
        dict(label="influencekit Arnoldi, rank 100 (Krylov 200)", library=ik, method="any",
             params={"method": "arnoldi", "rank": 100, "krylov_dim": 200}),
        dict(label="dattri Arnoldi, top_k 100, max_iter 200", library="dattri", method="arnoldi", params={"top_k": 100, "max_iter": 200}),
        dict(label="pyDVL Arnoldi, rank 100 (Krylov 200)", library="pydvl", method="arnoldi",
             params={"rank": 100, "krylov_dim": 200, "batch_size": 500}),
        dict(label="Captum Arnoldi, projection 100, arnoldi_dim 200", library="captum", method="arnoldi",
             params={"projection_dim": 100, "arnoldi_dim": 200, "batch_size": 500}),
        dict(label="influencekit EK-FAC (GGN)", library=ik, method="any", params={"method": "ekfac", "curvature": "ggn", "chunk_size": 500}),
        dict(label="kronfluence EK-FAC (with scores of all n)", library="kronfluence", method="ekfac",
             params={"strategy": "ekfac", "batch_size": 500}),
    ]


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The workload's configuration (``ihvp_family``'s keys, so its cache and Context apply)."""
    from ihvp_family.workloads import W1_WEIGHT_DECAY, W2_DAMPING, W2_HIDDEN, W2_WEIGHT_DECAY

    cache = str((args.out / "cache").resolve())
    common = {"name": args.workload, "data_dir": str(args.data_dir.resolve()), "cache_dir": cache, "threads": None,
              "quick": False, "test_index": 8, "dtype": args.dtype}
    if args.workload == "w1":
        return {**common, "n": args.n or W1_N, "weight_decay": W1_WEIGHT_DECAY, "damping": 0.0, "chunk_size": 4096}
    if args.workload == "w2":
        return {**common, "n": args.n or W2_N, "weight_decay": W2_WEIGHT_DECAY, "damping": W2_DAMPING, "chunk_size": 1024,
                "hidden": W2_HIDDEN, "seed": 0, "gtol": 1e-6, "max_iter": 5000, "hessian_reference": True}
    return {**common, "n": args.n or CNN_N, "weight_decay": 1e-3, "damping": args.cnn_damping, "chunk_size": 500,
            "hidden": 0, "seed": 0, "gtol": 0.0}


# -- worker: one row in a fresh process ---------------------------------------------------------------------------------
def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(job_path: Path) -> None:
    """Run one row; write its result (seconds, memory, errors, convention) to the job's result file."""
    import numpy as np
    import scipy.stats
    import torch

    from peers.context import PeerContext
    from peers.rows import ROWS

    job = json.loads(job_path.read_text())
    cfg, row = job["config"], job["row"]
    ctx = PeerContext(cfg)
    base = peak_mb()
    fn = ROWS[(row["library"], row["method"])]
    start = time.perf_counter()
    solved = fn(ctx, row["params"])
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": seconds, "peak_mb": peak_mb(), "base_mb": base, "notes": solved.notes}
    kind = "ggn" if row["params"].get("curvature") in ("ggn", "fisher") or row["method"] in ("ekfac", "datainf") else "hessian"
    ref = ctx.references.get(kind) or ctx.references["hessian"]
    out["reference"] = kind if kind in ctx.references else "hessian"
    if solved.ihvp is not None:
        s = solved.ihvp.detach().to(torch.float64)
        out["ihvp_error"] = float((s - ref["x"]).norm() / ref["x"].norm())
        influence = -ctx.torch_objective.train_gradient_dots(solved.ihvp.detach().to(ctx.dtype).unsqueeze(0))[0]
    else:
        influence = solved.influence
    a, b = influence.detach().double().numpy(), ref["influence"].double().numpy()
    out["score_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out["pearson"] = float(scipy.stats.pearsonr(a, b)[0]) if np.isfinite(a).all() else float("nan")
    if solved.native is not None:
        r = solved.native().detach().double()
        u = -ref["influence"][: r.numel()].double()  # <s_exact, g_i>
        c = float(r @ u / (u @ u))
        out["convention"] = {"c": c, "c_times_n": c * ctx.n, "corr": float(np.corrcoef(r.numpy(), u.numpy())[0, 1])}
    job_path.with_suffix(".result.json").write_text(json.dumps(out, default=json_default))


def hvp_race(args: argparse.Namespace, cfg: dict) -> str:
    """W1: seconds of one Hessian-vector product (k = 1) by influencekit's TorchObjective (retained graphs), by its
    closed form, and by dattri's ``hvp_at_x`` (rev-rev, as its CG uses; rev-fwd), interleaved ``--repeats`` rounds.

    CG's time is about (its iterations + 2) x one product (+ the retained graphs' set-up, timed here too), so
    these minima and the rows' iteration counts answer "how much faster" with less noise than whole solves.
    """
    import torch
    from dattri.func.hessian import hvp_at_x

    from influencekit.curvature import HessianOperator
    from peers.context import PeerContext
    from timing import interleaved_times

    ctx = PeerContext(cfg)
    objective = ctx.torch_objective
    start = time.perf_counter()
    operator = HessianOperator(objective)
    v = torch.randn(1, objective.dim, generator=torch.Generator().manual_seed(0), dtype=ctx.dtype)
    operator.matvec(v)
    setup = time.perf_counter() - start
    from influencekit.objectives.torch_objective import TorchObjective

    one_chunk = HessianOperator(TorchObjective(ctx.model, "cross_entropy", (ctx.x, ctx.y), weight_decay=ctx.weight_decay,
                                               chunk_size=ctx.n))
    theta = objective.parameters_vector()
    ctx.closed_form = True
    closed = HessianOperator(ctx.objective("hessian"))
    dattri = {mode: hvp_at_x(lambda t: ctx.regularised_loss(t, ctx.x, ctx.y), x=(theta,), mode=mode) for mode in ("rev-rev", "rev-fwd")}
    fns = {f"influencekit TorchObjective (retained graphs, chunks of {cfg['chunk_size']:,})": lambda: operator.matvec(v),
           f"influencekit TorchObjective (retained graphs, one chunk of {ctx.n:,})": lambda: one_chunk.matvec(v),
           "influencekit closed form": lambda: closed.matvec(v),
           "dattri hvp_at_x rev-rev": lambda: dattri["rev-rev"](v[0]),
           "dattri hvp_at_x rev-fwd": lambda: dattri["rev-fwd"](v[0])}
    reference = operator.matvec(v)[0].double()
    agree = {name: float((torch.as_tensor(fn()).reshape(-1).double() - reference).norm() / reference.norm()) for name, fn in fns.items()}
    times = interleaved_times(fns, args.repeats)
    lines = [f"| W1 one HVP (n = {cfg['n']:,}, {cfg['dtype']}, k = 1) | min s | median s | relative difference from ours |",
             "|---|---|---|---|"]
    for name, values in times.items():
        values = sorted(values)
        lines.append(f"| {name} | {values[0]:.3f} | {values[len(values) // 2]:.3f} | {agree[name]:.1e} |")
    lines.append(f"| influencekit retained-graph set-up (first product included) | {setup:.2f} | | |")
    return "\n".join(lines) + "\n"


# -- parent ---------------------------------------------------------------------------------------------------------------
def prepare(cfg: dict, args: argparse.Namespace) -> None:
    """Model, data and references in the cache (in this process; not timed)."""
    if cfg["name"] == "cnn":
        from peers.context import prepare_cnn

        prepare_cnn(cfg)
        return
    from ihvp_family.prepare import prepare as prepare_family
    from peers.context import seed_w1_cache

    if cfg["name"] == "w1":
        seed_w1_cache(cfg, args.generic_work)
    prepare_family(cfg)


def run_row(cfg: dict, row: dict, jobs: Path, index: int) -> dict[str, Any]:
    jobs.mkdir(parents=True, exist_ok=True)
    job = jobs / f"{cfg['name']}_{index}.json"
    result = job.with_suffix(".result.json")
    result.unlink(missing_ok=True)
    job.write_text(json.dumps({"config": cfg, "row": row}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job)], capture_output=True, text=True)
    if not result.exists():
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"rc {proc.returncode}: {tail[0]}", "wall_s": time.perf_counter() - start}
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - start}


def markdown(cfg: dict, results: dict[str, dict], repeats: int) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"| {cfg['name'].upper()} (n = {cfg['n']:,}, {cfg['dtype']}) | seconds (best of {repeats}) | peak MB (base) "
             f"| iHVP error | score error | Pearson | convention c (c x n) |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:120]} | | | | | |")
            continue
        conv = r.get("convention")
        conv_text = f"{conv['c']:+.3g} ({conv['c_times_n']:+.3g})" if conv else "-"
        lines.append(f"| {label} | {r['seconds']:.2f} | {r['peak_mb']:.0f} ({r['base_mb']:.0f}) | {num(r.get('ihvp_error'), '.1e')} "
                     f"| {r['score_error']:.1e} | {r['pearson']:.6f} | {conv_text} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["w1", "w2", "cnn"], default="w1")
    parser.add_argument("--n", type=int, default=None, help=f"training points (W1 {W1_N:,}, W2 {W2_N:,}, CNN {CNN_N:,})")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--generic-work", type=Path, default=Path("/tmp/influencekit-w1"), help="bench_generic_w1.py's --work")
    parser.add_argument("--out", type=Path, default=Path("/tmp/influencekit-peers"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cnn-damping", type=float, default=0.01)
    parser.add_argument("--only", nargs="*", default=None, help="run only rows whose label contains one of these")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hvp-race", action="store_true", help="W1 only: time single HVPs, ours against dattri's")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    cfg = config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(cfg, args)
    if args.hvp_race:
        table = hvp_race(args, cfg)
        write_atomic(args.out / f"hvp_race_{cfg['name']}_n{cfg['n']}_{cfg['dtype']}.md", table)
        print(table)
        return
    selected = [r for r in rows(args.workload) if args.only is None or any(s in r["label"] for s in args.only)]
    results: dict[str, dict] = {}
    stem = args.out / f"peers_{cfg['name']}_n{cfg['n']}_{cfg['dtype']}"
    for repeat in range(args.repeats):
        for index, row in enumerate(selected):
            result = run_row(cfg, row, args.out / "jobs", index)
            log(f"{row['label']}: " + json.dumps(result, default=json_default))
            best = results.get(row["label"])
            if best is None or "error" in best or ("error" not in result and result["seconds"] < best["seconds"]):
                results[row["label"]] = {**result, "params": row["params"], "library": row["library"]}
            write_atomic(stem.with_suffix(".json"), json.dumps({"config": cfg, "repeats": args.repeats, "rows": results},
                                                                  indent=1, default=json_default))
    table = markdown(cfg, results, args.repeats)
    write_atomic(stem.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
