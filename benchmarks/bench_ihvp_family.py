"""Benchmark: performance and fidelity of the inverse-Hessian family (issue 4's table).

Workloads
---------
W1  Koh & Liang's MNIST logistic regression: training images 5,000..59,999
    (n = 55,000), pixels / 255, W (10 x 784) without bias, objective
    R = mean CE + (0.01/2)||W||^2 in float64, fitted to ||grad R|| <= 1e-10 by
    ``fit_softmax_regression``; test image 8. Hessian-based methods use the
    closed-form ``SoftmaxRegressionObjective``; GGN, empirical Fisher and K-FAC
    use ``nn.Linear(784, 10, bias=False)`` with the same weights in a
    ``TorchObjective`` (chunks of 4,096). The model is linear in theta, so its
    GGN *is* its Hessian (the GGN rows differ from the exact answer by
    round-off only). No damping: the weight decay makes H positive definite.
    Reference: Cholesky of the explicit Hessian (``DirectSolver``).
W2  MLP 784-128(tanh)-10 (p = 101,770) on the first 10,000 of W1's training
    images, R = mean CE + (1e-3/2)||theta||^2 (all weights and biases), float64,
    trained by full-batch L-BFGS (strong Wolfe) from a seeded initialisation to
    ||grad R|| <= ``--w2-gtol`` (or ``--w2-max-iter`` iterations; the reached norm
    is reported); test image 8. Every method solves with damping mu = 1e-3 added
    to the curvature (on top of the weight decay). There is no explicit Hessian:
    the references are CG on the damped GGN and on the damped Hessian with
    relative residual 1e-10. Each row is compared with the reference of the
    matrix it approximates: rows on the Hessian with the Hessian reference,
    all others (GGN, block-diagonal GGN, K-FAC, EK-FAC, and the empirical-Fisher
    rows, which approximate the GGN = true Fisher) with the GGN reference. The
    JSON has both errors for every row.

Each (workload, method, curvature, setting) runs in a fresh subprocess of this
script, so ``peak MB`` is that process's ru_maxrss (imports, data, model,
reference and the method); the ``baseline`` row of each workload is a process
that only loads those, and each row's notes give its peak above its own
baseline ("+N MB"). ``seconds`` = fit (constructor / factor fit / sketch /
preconditioner) + solve (test gradient and iHVP) + scoring all n training
points (``objective.train_gradient_dots``), as ``InfluenceFunction.scores``
does; the split is in the notes and the JSON. Solvers that measure a residual
inside ``solve`` with an extra full pass (Arnoldi, Nystroem sketch, LiSSA,
DataInf) are asked not to. ``iHVP rel. error`` = ||x - x_ref|| / ||x_ref||;
Pearson and Spearman compare the influences I_up,loss of all n training points
on test image 8 with the reference's. The model fits and references are
cached under ``--out``/cache, so reruns skip them.

Also reported: iterations to relative residual 1e-8 of plain CG and of
Nystroem-preconditioned CG on W1 (the bar: PCG needs at most half of CG's).

Failures (exceptions, NotPositiveDefinite, divergence, a killed or timed-out
worker) become rows with the error message. Progress goes to stderr; the
Markdown table to stdout and, with the JSON, to ``--out`` (rewritten after
every row, so an interrupted run keeps what it has).

Full run (on a quiet machine; roughly 1-2 hours on 2 cores, most of it W2: the
L-BFGS training, cached afterwards, the references, and Jacobi-PCG):
    python benchmarks/bench_ihvp_family.py --data-dir ../shared/data/mnist --out out/bench_ihvp_family
Quick check (small sizes: W1 on 3,000 points, W2 on 1,000; W2's LiSSA depth
1,000 and tuned Arnoldi rank 100, since p = 101,770 at any n; the W1 spectrum
of the 7,840 x 7,840 Hessian costs the same as in the full run):
    python benchmarks/bench_ihvp_family.py --quick
Subsets: ``--workloads w1 --methods cg,cg-nystrom --settings default``.
"""

# The code lives in the package benchmarks/ihvp_family/ (workloads, cache, prepare, context, solvers, runner,
# report; its __init__ says which does what). This file is the command line, and the worker processes' entry point.

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ihvp_family.report import fmt, write_outputs  # noqa: E402
from ihvp_family.runner import run_job, worker_main  # noqa: E402
from ihvp_family.solvers import KNOWN_METHODS  # noqa: E402
from ihvp_family.util import log  # noqa: E402
from ihvp_family.workloads import SPECS, Spec, select_specs, workload_config  # noqa: E402

SCRIPT = Path(__file__).resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes: W1 on 3,000 points, W2 on 1,000")
    parser.add_argument("--workloads", default="w1,w2", help="comma-separated: w1, w2 (default both)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(KNOWN_METHODS)}")
    parser.add_argument("--curvatures", default=None, help="comma-separated subset of hessian, ggn, fisher, ggn-blockdiag")
    parser.add_argument("--settings", default="default,tuned", help="comma-separated: default, tuned")
    parser.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST directory (default ../shared/data/mnist)")
    parser.add_argument("--out", default=None, help="output directory (default out/bench_ihvp_family[_quick])")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's own)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row before its worker is killed")
    parser.add_argument("--w1-n", type=int, default=None, help="override W1's training size")
    parser.add_argument("--w2-n", type=int, default=None, help="override W2's training size")
    parser.add_argument("--w2-gtol", type=float, default=1e-6, help="W2 L-BFGS target ||grad R|| (default 1e-6)")
    parser.add_argument("--w2-max-iter", type=int, default=10000, help="W2 L-BFGS iteration cap (default 10000)")
    parser.add_argument("--no-hessian-reference", action="store_true", help="W2: skip the damped-Hessian CG reference")
    return parser


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def run_header(args: argparse.Namespace) -> list[str]:
    """The machine, load, versions and threads, for the report."""
    return [f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} torch threads per worker"
            + ("; QUICK mode (small sizes)" if args.quick else "")]


def run_workload(name: str, specs: list[Spec], args: argparse.Namespace, jobs_dir: Path,
                 prepared: dict[str, dict]) -> Iterator[dict[str, Any]]:
    """Prepare the workload (its result goes into ``prepared``), then yield its rows, one worker each."""
    cfg = workload_config(name, args)
    log(f"{name}: preparing (n = {cfg['n']:,}) ...")
    start = time.perf_counter()
    prep = run_job("prepare", cfg, Spec(name, "prepare", "-", "-"), jobs_dir, None)
    prep["config"] = cfg
    prepared[name] = prep
    log(f"{name}: prepare {prep.get('status')} in {time.perf_counter() - start:.1f} s")
    for spec in specs:
        if prep.get("status") != "ok":
            yield {"spec": asdict(spec), "status": "error", "error": f"prepare failed: {prep.get('error')}"}
            continue
        log(f"{spec.key}: running ({spec.describe})")
        row = run_job("method", cfg, spec, jobs_dir, args.timeout)
        if row.get("status") == "ok":
            log(f"{spec.key}: {row.get('seconds', 0):.2f} s, peak {row.get('peak_mb', 0):.0f} MB, "
                f"rel. error {fmt(row.get('rel_error'), '.2e')}, Pearson {fmt(row.get('pearson'), '.4f')} "
                f"(wall {row['wall_s']:.1f} s)")
        yield row


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)

    if args.out is None:
        args.out = "out/bench_ihvp_family_quick" if args.quick else "out/bench_ihvp_family"
    out = Path(args.out)
    command = "python " + shlex.join([os.path.relpath(SCRIPT), *sys.argv[1:]])
    workloads, methods = _names(args.workloads), _names(args.methods)
    unknown = [w for w in workloads if w not in SPECS] + [m for m in methods or [] if m not in KNOWN_METHODS]
    if unknown:
        parser.error(f"unknown workloads/methods {unknown}")
    curvatures = None if args.curvatures is None else set(args.curvatures.split(","))
    settings = set(args.settings.split(","))

    header = run_header(args)
    rows: list[dict[str, Any]] = []
    prepared: dict[str, dict] = {}
    total_start = time.perf_counter()
    for name in workloads:
        specs = select_specs(name, args.quick, methods, curvatures, settings)
        for row in run_workload(name, specs, args, out / "jobs", prepared):
            rows.append(row)
            write_outputs(out, command, header, prepared, rows)  # an interrupted run keeps what it has
    header.append(f"- total wall time of this run: {time.perf_counter() - total_start:.0f} s")
    markdown = write_outputs(out, command, header, prepared, rows)
    print(markdown)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
