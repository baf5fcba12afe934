"""Core benchmark on W1 (Koh & Liang's MNIST logistic regression), issue "core library".

W1: 55,000 training images (5,000..59,999) x 784 pixels / 255, 10 classes, W 784 x 10
without bias, mean CE + (0.01/2)||W||^2, float64, at its optimum; test image 8.

Phases (each in a fresh process so its peak memory is its own):
  fit      Newton-CG to ||grad R|| <= 1e-10 (weights cached in --work).
  exact    explicit Hessian, its full eigen-spectrum, Cholesky solve (reference s_test).
  cg       influence of all 55,000 points with CG (relative residual 1e-10) and Nystroem-PCG;
           relative error of s_test vs the exact one.
  lissa    Koh & Liang's LiSSA (scale 25, depth 5000, 10 repeats, batch 1).

Usage: python benchmarks/bench_core_w1.py --data-dir ../shared/data/mnist [--work /tmp/w1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from influencekit.memory import peak_rss_mb


def load_w1(data_dir: Path):
    from influencekit.datasets import koh_liang_split, load_mnist

    split = koh_liang_split(load_mnist(data_dir))
    return split.x_train, split.y_train, (split.x_test[8:9], split.y_test[8:9])


def phase_fit(args) -> dict:
    from influencekit.objectives.softmax_regression import fit_softmax_regression

    x, y, _ = load_w1(args.data_dir)
    fit = fit_softmax_regression(x, y, 0.01, num_classes=10)
    torch.save(fit.weights, args.work / "weights.pt")
    return {"seconds": fit.seconds, "gradient_norm": fit.gradient_norm, "newton_steps": fit.newton_steps, "cg_iterations": fit.cg_iterations}


def objective(args):
    from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective

    x, y, test = load_w1(args.data_dir)
    return SoftmaxRegressionObjective(torch.load(args.work / "weights.pt"), x, y, 0.01), test


def phase_exact(args) -> dict:
    from influencekit import DirectSolver, InfluenceFunction
    from influencekit.curvature import spectrum_summary

    obj, test = objective(args)
    start = time.perf_counter()
    hessian = obj.hessian()
    hessian_seconds = time.perf_counter() - start
    start = time.perf_counter()
    summary = spectrum_summary(torch.linalg.eigvalsh(hessian))
    eig_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = InfluenceFunction(obj, DirectSolver(hessian)).scores(test)
    solve_seconds = time.perf_counter() - start
    torch.save({"s_test": scores.inverse_hvp.solution, "influence": scores.influence_on_loss}, args.work / "exact.pt")
    return {"hessian_seconds": hessian_seconds, "eigvalsh_seconds": eig_seconds, "cholesky_and_scores_seconds": solve_seconds,
            "spectrum": summary.as_dict(), "spectrum_table": summary.table()}


def phase_cg(args) -> dict:
    from influencekit import CGSolver, HessianOperator, InfluenceFunction
    from influencekit.solvers import NystromPreconditioner

    obj, test = objective(args)
    obj.probs  # noqa: B018  (softmax of the training set, part of the model, not of the solve)
    exact = torch.load(args.work / "exact.pt") if (args.work / "exact.pt").exists() else None
    out = {}
    for name in ("cg", "nystrom_pcg"):
        start = time.perf_counter()
        curvature = HessianOperator(obj)
        pre = NystromPreconditioner(curvature, rank=args.nystrom_rank, seed=0) if name == "nystrom_pcg" else None
        setup = time.perf_counter() - start
        scores = InfluenceFunction(obj, CGSolver(curvature, rtol=args.rtol, maxiter=3000, preconditioner=pre)).scores(test)
        seconds = time.perf_counter() - start
        row = {"seconds": seconds, "preconditioner_seconds": setup, "iterations": int(scores.inverse_hvp.iterations[0]),
               "relative_residual": float(scores.inverse_hvp.relative_residuals(obj.measurement_gradients(test))[0])}
        if exact is not None:
            s = scores.inverse_hvp.solution
            row["s_test_relative_error"] = float((s - exact["s_test"]).norm() / exact["s_test"].norm())
            row["influence_relative_error"] = float((scores.influence_on_loss - exact["influence"]).norm() / exact["influence"].norm())
        out[name] = row
    return out


def phase_lissa(args) -> dict:
    from influencekit import HessianOperator, InfluenceFunction, LiSSASolver

    obj, test = objective(args)
    obj.probs  # noqa: B018
    start = time.perf_counter()
    solver = LiSSASolver(HessianOperator(obj), scale=25.0, depth=5000, repeats=10, batch_size=1, seed=0, progress=False, measure_residuals=False)
    scores = InfluenceFunction(obj, solver).scores(test)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds}
    exact_path = args.work / "exact.pt"
    if exact_path.exists():
        exact = torch.load(exact_path)
        a, b = scores.influence_on_loss[0], exact["influence"][0]
        top = b.abs().argsort(descending=True)[:500]
        row["s_test_relative_error"] = float((scores.inverse_hvp.solution - exact["s_test"]).norm() / exact["s_test"].norm())
        row["pearson_all_vs_exact"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        row["pearson_top500_vs_exact"] = float(torch.corrcoef(torch.stack([a[top], b[top]]))[0, 1])
    return row


PHASES = {"fit": phase_fit, "exact": phase_exact, "cg": phase_cg, "lissa": phase_lissa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/influencekit-w1"))
    parser.add_argument("--phases", default="fit,exact,cg,lissa")
    parser.add_argument("--rtol", type=float, default=1e-10)
    parser.add_argument("--nystrom-rank", type=int, default=100)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        result = PHASES[args.phase](args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}  (torch threads: {torch.get_num_threads()})")
    for phase in args.phases.split(","):
        command = [sys.executable, *sys.argv, "--phase", phase]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(f"{phase}: {json.dumps(json.loads(output), indent=1)}", flush=True)


if __name__ == "__main__":
    main()
