"""Koh & Liang (2017), Figure 2 (logistic-regression panels): predicted vs. actual loss change.

Pipeline (every number it prints is checkable):
 1. MNIST, Koh & Liang's split (training images 5,000..59,999, pixels / 255).
 2. Softmax regression W (10 x 784, no bias), R(W) = mean CE + (0.01/2)||W||^2,
    float64, Newton-CG to ||grad R|| <= 1e-10 within 100 Newton steps.
 3. Explicit Hessian, its Cholesky factor (which proves positive definiteness)
    and its extreme eigenvalues (Lanczos, shift-inverted for the smallest).
    Refused (exit code 2, one line naming the fix) when the model is not at its
    optimum (unless ``--allow-untrustworthy``: then ``results.json`` says
    ``"trustworthy": false`` and lists ``"untrustworthy_reasons"``), and always
    when the Hessian is not positive definite (only with --weight-decay <= 0:
    the leave-one-out objectives then have no minimum to retrain to).
 4. Predicted change on removal, -(1/n) I_up,loss, for all training points with
    each solver: exact (Cholesky), CG, LiSSA (Koh & Liang: scale 25, depth 5000,
    10 repeats, batch 1, damping 0).
 5. The ``num_points`` largest |I_up,loss| (exact) are refit without each point to
    the exact leave-one-out optimum (float64, ||grad|| <= 1e-10) on Dask, each refit
    saved at once in a crash-safe cache; actual = L(z_test, W_-i) - L(z_test, W).
 6. ``results.json``, ``points.csv``, ``figure.png`` and ``report.html`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor

from influencekit.curvature import DenseOperator, HessianOperator
from influencekit.curvature.spectrum import extreme_eigenvalues
from influencekit.datasets.mnist import add_data_arguments
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.persistence import atomic_write
from influencekit.reports.experiments import write_koh_liang_fig2_report
from influencekit.scores.influence import InfluenceFunction
from influencekit.solvers import CGSolver, DirectSolver, LiSSASettings, LiSSASolver
from influencekit.solvers.base import NotPositiveDefiniteError
from influencekit.validation.leave_one_out import (
    MappedRefitProblem,
    SoftmaxRefitProblem,
    as_numpy,
    as_weights,
    refit_leave_one_out,
    softmax_test_losses,
)
from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache, fingerprint_of

SOLVERS = ("exact", "cg", "lissa")


@dataclass
class RetrainingRunConfig:
    """Where a reproduction that retrains reads and writes, and how it runs (both Figure 2 panels).

    Attributes:
        out: output directory.
        data_dir, download: MNIST's directory (``load_or_download_mnist``), and whether to download it.
        workers, scheduler: refits on a local Dask cluster of ``workers`` processes (0: in-process),
            or on the cluster of ``scheduler``.
        cache_dir: the crash-safe refit cache (default ``out/refits``).
        allow_untrustworthy: go on with a model off its optimum (results marked).
        progress: progress bars (None: only on a terminal).
    """

    out: Path
    data_dir: Path | None = None
    download: bool = True
    workers: int = 2
    scheduler: str | None = None
    cache_dir: Path | None = None
    allow_untrustworthy: bool = False
    progress: bool | None = None


@dataclass
class Fig2Config(RetrainingRunConfig):
    """Arguments of the reproduction (defaults: Koh & Liang's Figure 2)."""

    test_indices: list[int] = field(default_factory=lambda: [8])
    num_points: int = 500
    solvers: list[str] = field(default_factory=lambda: list(SOLVERS))
    train_size: int | None = None
    weight_decay: float = 0.01
    optimum_tol: float = 1e-10
    max_newton_steps: int = 100
    cg_rtol: float = 1e-10
    lissa: LiSSASettings = field(default_factory=LiSSASettings.koh_liang)
    refit_batch_size: int = 50


class UntrustworthyModelError(RuntimeError):
    """The model is not at an optimum or its Hessian is not positive definite (message: one line, with the fix)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_data(config: Fig2Config):
    from influencekit.datasets import koh_liang_split, load_or_download_mnist

    split = koh_liang_split(load_or_download_mnist(config.data_dir, download=config.download, progress=config.progress))
    x, y = split.x_train, split.y_train
    if config.train_size is not None:
        x, y = x[: config.train_size], y[: config.train_size]
    return x, y, split.x_test, split.y_test


def _correlations(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    return {
        "pearson": float(scipy.stats.pearsonr(predicted, actual)[0]),
        "spearman": float(scipy.stats.spearmanr(predicted, actual)[0]),
    }


def run(config_or_args: Fig2Config | argparse.Namespace) -> int:
    config = config_or_args if isinstance(config_or_args, Fig2Config) else _config_from_args(config_or_args)
    return run_or_refuse(reproduce, config)


def run_or_refuse(pipeline: Callable[[Any], dict], config: Any) -> int:
    """Exit status of ``pipeline(config)``: 0, or 2 with one ``refused: ...`` line when the model is untrustworthy."""
    try:
        pipeline(config)
    except UntrustworthyModelError as error:
        _log(f"refused: {error}")
        return 2
    return 0


def reproduce(config: Fig2Config) -> dict:
    """Run the whole pipeline; returns (and writes) the results dictionary."""
    unknown = set(config.solvers) - set(SOLVERS)
    if unknown or not config.solvers:
        raise ValueError(f"unknown solvers {sorted(unknown)}; choose from {SOLVERS}")
    start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = _load_data(config)
    tests = (x_test[config.test_indices], y_test[config.test_indices])
    _log(f"data: n_train = {len(y)}, d = {x.shape[1]}, test indices {config.test_indices}")

    fit, objective, model_info = _fit_model(config, x, y, x_test, y_test)
    exact, hessian_info, reasons = _factor_hessian(config, fit, objective)
    predicted, solver_info = _influence_by_solver(config, objective, exact, tests)
    reference = "exact" if "exact" in predicted else next(iter(predicted))
    chosen_per_test = np.argsort(-np.abs(predicted[reference]), axis=1)[:, : config.num_points]
    refits, retrain_info = _retrain(config, x, y, fit, exact, sorted({int(i) for i in chosen_per_test.reshape(-1)}))
    per_test = _measured_changes(config, fit.weights, tests, chosen_per_test, refits, predicted)

    results = _results_document(config, len(y), model_info, hessian_info, solver_info, retrain_info, predicted, per_test, reasons)
    results["total_seconds"] = time.perf_counter() - start
    atomic_write(config.out / "results.json", json.dumps(results, indent=2))
    _write_points(config.out / "points.csv", per_test, y, list(predicted))
    _plot(config.out / "figure.png", per_test, list(predicted), len(y))
    write_koh_liang_fig2_report(config, results, per_test, predicted, (x, y), tests, fit.weights)
    for name, values in results["solvers"].items():
        _log(f"{name}: Pearson R = {values['pearson']:.4f}, Spearman rho = {values['spearman']:.4f} over {config.num_points} points")
    _log(f"total {results['total_seconds']:.1f} s; wrote {config.out / 'results.json'}, points.csv, figure.png, report.html")
    return results


def _fit_model(config: Fig2Config, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor):
    """Step 2: softmax regression by Newton-CG (within the budget), its objective, and what the fit reached."""
    fit = fit_softmax_regression(x, y, config.weight_decay, num_classes=10, tol=config.optimum_tol,
                                 max_newton_steps=config.max_newton_steps, strict=False)
    objective = SoftmaxRegressionObjective(fit.weights, x, y, config.weight_decay)
    test_accuracy = float(((x_test @ fit.weights.T).argmax(1) == y_test).double().mean())
    _log(f"model: ||grad R|| = {fit.gradient_norm:.3g} after {fit.newton_steps} Newton steps "
         f"({fit.cg_iterations} CG iterations, {fit.seconds:.1f} s); test accuracy {test_accuracy:.4f}")
    info = {"train_grad_norm": fit.gradient_norm, "test_accuracy": test_accuracy, "fit_seconds": fit.seconds,
            "newton_steps": fit.newton_steps}
    return fit, objective, info


def _factor_hessian(config: Fig2Config, fit, objective: SoftmaxRegressionObjective) -> tuple[DirectSolver, dict, list[str]]:
    """Step 3: the explicit Hessian, its Cholesky factor and extreme eigenvalues; refuses an untrustworthy model.

    Returns the direct solver, the Hessian's summary and the reasons the results would not be
    trustworthy (empty, or with ``--allow-untrustworthy`` the reasons it went on regardless).
    """
    t = time.perf_counter()
    hessian = objective.hessian()
    hessian_seconds = time.perf_counter() - t
    t = time.perf_counter()
    reasons: list[str] = []
    if fit.gradient_norm > config.optimum_tol:
        reasons.append(f"not at the optimum: ||grad R|| = {fit.gradient_norm:.3g} > --optimum-tol {config.optimum_tol:g} "
                       f"after {fit.newton_steps} Newton steps (raise --max-newton-steps above {config.max_newton_steps})")
    try:
        exact = DirectSolver(hessian)
    except NotPositiveDefiniteError as error:
        negative = int((error.negative_eigenvalues < 0).sum())
        reasons.append(f"the Hessian is not positive definite: {negative} negative eigenvalues, smallest {error.smallest:.4g}; "
                       f"damping {error.suggested_damping:.3g} would make H + damping I positive definite, but the "
                       f"leave-one-out refits need a minimum: use --weight-decay > 0 (got {config.weight_decay:g})")
        raise UntrustworthyModelError("; ".join(reasons)) from error  # --allow-untrustworthy cannot retrain either
    if reasons and not config.allow_untrustworthy:
        raise UntrustworthyModelError("; ".join(reasons) + "; or pass --allow-untrustworthy to go on (results marked)")
    factor_seconds = time.perf_counter() - t
    min_eig, max_eig = extreme_eigenvalues(DenseOperator(hessian), inverse=exact.inverse_operator())
    _log(f"hessian: {hessian.shape[0]} x {hessian.shape[0]} in {hessian_seconds:.1f} s, Cholesky {factor_seconds:.1f} s; "
         f"eigenvalues in [{min_eig:.4g}, {max_eig:.4g}]")
    for reason in reasons:
        _log(f"untrustworthy (--allow-untrustworthy): {reason}")
    info = {"min_eig": min_eig, "max_eig": max_eig, "negative": 0, "seconds": hessian_seconds + factor_seconds}
    return exact, info, reasons


def _influence_by_solver(config: Fig2Config, objective: SoftmaxRegressionObjective, exact: DirectSolver,
                         tests: tuple[Tensor, Tensor]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Step 4: the predicted removal effects -(1/n) I_up,loss (m_test, n) of each solver, and each solve's evidence."""
    curvature = HessianOperator(objective)
    solvers = {
        "exact": lambda: exact,
        "cg": lambda: CGSolver(curvature, rtol=config.cg_rtol, maxiter=2000),
        "lissa": lambda: LiSSASolver.from_settings(curvature, config.lissa, progress=config.progress),
    }
    predicted: dict[str, np.ndarray] = {}
    solver_info: dict[str, dict] = {}
    for name in config.solvers:
        t = time.perf_counter()
        scores = InfluenceFunction(objective, solvers[name](), allow_unconverged=config.allow_untrustworthy).scores(tests)
        seconds = time.perf_counter() - t
        predicted[name] = scores.predicted_loss_change.numpy()
        solve = scores.inverse_hvp
        relative = solve.relative_residuals(objective.measurement_gradients(tests))
        solver_info[name] = {
            "seconds": seconds,
            "relative_residual": [float(r) for r in relative] if relative is not None else None,
            "iterations": None if solve.iterations is None else [int(i) for i in solve.iterations],
        }
        _log(f"{name}: scores of {objective.n_train} training points in {seconds:.2f} s, relative residual "
             f"{max(solver_info[name]['relative_residual']):.2g}")
    return predicted, solver_info


def _retrain(config: Fig2Config, x: Tensor, y: Tensor, fit, exact: DirectSolver, removed: list[int]) -> tuple[dict, dict]:
    """Step 5: the exact leave-one-out refit without each point of ``removed``, from the crash-safe cache or on Dask."""
    t = time.perf_counter()
    problem = SoftmaxRefitProblem(x, y, config.weight_decay, fit.weights, exact.factor, tol=config.optimum_tol)
    fingerprint = fingerprint_of(x, y, fit.weights, weight_decay=config.weight_decay, tol=config.optimum_tol, model="softmax-regression")
    cache = RefitCache(config.cache_dir or config.out / "refits", fingerprint)
    from_cache = len(set(removed).intersection(cache.done_indices()))
    _log(f"refit cache {cache.path}: {from_cache} of {len(removed)} refits already there")
    with contextlib.ExitStack() as stack:
        shared: SoftmaxRefitProblem | MappedRefitProblem = problem
        if config.scheduler is None and config.workers > 0 and from_cache < len(removed):
            # Local workers map one copy of the data and factor instead of unpickling their own.
            shared = problem.save_mapped(stack.enter_context(_problem_directory(cache.path)))
        refits = run_refits(
            _refit_batch, removed, cache, shared=shared, workers=config.workers,
            scheduler_address=config.scheduler, batch_size=config.refit_batch_size, progress=config.progress is not False,
        )
    seconds = time.perf_counter() - t
    max_refit_grad = max(float(refits[i]["gradient_norm"]) for i in removed)
    _log(f"retraining: {len(removed)} leave-one-out refits in {seconds:.1f} s, max ||grad|| {max_refit_grad:.3g}")
    info = {"max_grad_norm": max_refit_grad, "seconds": seconds, "refits": len(removed), "from_cache": from_cache,
            "workers": config.workers, "scheduler": config.scheduler, "cache": str(cache.path)}
    return refits, info


def _measured_changes(config: Fig2Config, weights: Tensor, tests: tuple[Tensor, Tensor], chosen_per_test: np.ndarray,
                      refits: dict, predicted: dict[str, np.ndarray]) -> list[dict]:
    """Step 6: per test point, the actual change L(z_test, theta_-i) - L(z_test, theta) of its chosen points."""
    base_losses = softmax_test_losses(weights, *tests).numpy()
    per_test = []
    for t_pos, test_index in enumerate(config.test_indices):
        chosen = chosen_per_test[t_pos]
        refit_weights = torch.stack([as_weights(refits[int(i)]) for i in chosen])
        test = (tests[0][t_pos : t_pos + 1], tests[1][t_pos : t_pos + 1])
        actual = softmax_test_losses(refit_weights, *test)[:, 0].numpy() - base_losses[t_pos]
        per_test.append({
            "test_index": test_index,
            "test_label": int(tests[1][t_pos]),
            "test_loss": float(base_losses[t_pos]),
            "points": [int(i) for i in chosen],
            "actual": actual,
            "predicted": {name: values[t_pos, chosen] for name, values in predicted.items()},
        })
    return per_test


def _results_document(config: Fig2Config, n: int, model_info: dict, hessian_info: dict, solver_info: dict,
                      retrain_info: dict, predicted: dict[str, np.ndarray], per_test: list[dict], reasons: list[str]) -> dict:
    """``results.json``: correlations of every solver with retraining (first test point), and the evidence."""
    primary = per_test[0]
    return {
        "test_index": primary["test_index"],
        "n_train": n,
        "num_points": config.num_points,
        "model": model_info,
        "hessian": hessian_info,
        "solvers": {
            name: {**_correlations(primary["predicted"][name], primary["actual"]), **solver_info[name],
                   "correlation_with_exact": (_correlations(predicted[name][0], predicted["exact"][0])["pearson"]
                                              if "exact" in predicted else None)}
            for name in predicted
        },
        "retrain": retrain_info,
        "tests": [
            {"test_index": e["test_index"], "test_label": e["test_label"], "test_loss": e["test_loss"],
             "solvers": {name: _correlations(e["predicted"][name], e["actual"]) for name in predicted}}
            for e in per_test
        ],
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "sign_convention": "predicted = -(1/n) I_up,loss = (1/n) g_test^T H^-1 g_i; actual = L(z_test, theta_-i) - L(z_test, theta)",
        "trustworthy": not reasons,
        "untrustworthy_reasons": reasons,
    }


@contextlib.contextmanager
def _problem_directory(cache_path: Path):
    """``cache_path/.problem-PID`` for the mapped problem, removed afterwards (and left-overs of killed runs)."""
    for stale in cache_path.glob(".problem-*"):
        pid = stale.name.removeprefix(".problem-")
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    directory = cache_path / f".problem-{os.getpid()}"
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refit_batch(problem: SoftmaxRefitProblem | MappedRefitProblem, batch: list[int]) -> list[dict]:
    if isinstance(problem, MappedRefitProblem):
        problem = problem.load()
    return [as_numpy(r) for r in refit_leave_one_out(problem, batch)]


def _write_points(path: Path, per_test: list[dict], labels: torch.Tensor, solver_names: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["test_index", "train_index", "mnist_index", "label", *[f"predicted_{s}" for s in solver_names], "actual"])
        for entry in per_test:
            for pos, index in enumerate(entry["points"]):
                writer.writerow([entry["test_index"], index, index + 5000, int(labels[index]),
                                 *[f"{entry['predicted'][s][pos]:.10g}" for s in solver_names], f"{entry['actual'][pos]:.10g}"])


def _plot(path: Path, per_test: list[dict], solver_names: list[str], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(per_test), len(solver_names)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for r, entry in enumerate(per_test):
        actual = entry["actual"]
        for c, name in enumerate(solver_names):
            pred = entry["predicted"][name]
            corr = _correlations(pred, actual)
            ax = axes[r][c]
            lo, hi = float(min(actual.min(), pred.min())), float(max(actual.max(), pred.max()))
            pad = 0.05 * (hi - lo)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)
            ax.scatter(actual, pred, s=8, alpha=0.7)
            ax.set_xlabel("Actual diff in loss")
            ax.set_ylabel("Predicted diff in loss")
            ax.set_title(f"{name}, test {entry['test_index']}\nPearson R = {corr['pearson']:.3f}, Spearman ρ = {corr['spearman']:.3f}", fontsize=10)
    fig.suptitle(f"Koh & Liang Fig. 2: {len(per_test[0]['points'])} most influential of {n} training points", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure(parser: argparse.ArgumentParser) -> None:
    d = Fig2Config(out=Path("out"))
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--test-index", default="8", help="test image index, or several separated by commas (default 8)")
    parser.add_argument("--num-points", type=int, default=d.num_points, help="most influential points to retrain without (default 500)")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated subset of exact,cg,lissa")
    parser.add_argument("--workers", type=int, default=d.workers, help="Dask LocalCluster workers (0: in-process)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (overrides --workers)")
    parser.add_argument("--train-size", type=int, default=None, help="use only the first N training points (smaller problem)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help="lambda of R(W) = mean CE + (lambda/2)||W||^2 (default 0.01); <= 0 leaves no unique minimum, "
                             "the Hessian is then singular or indefinite and the run is refused")
    parser.add_argument("--optimum-tol", type=float, default=d.optimum_tol,
                        help="||grad R|| the model and every refit must reach (default 1e-10)")
    parser.add_argument("--max-newton-steps", type=int, default=d.max_newton_steps,
                        help="Newton-CG budget of the full-data fit (default 100; 0: evaluate at W = 0); a fit that stops "
                             "short of --optimum-tol is refused unless --allow-untrustworthy")
    LiSSASettings.add_arguments(parser, d.lissa)
    parser.add_argument("--cache-dir", type=Path, default=None, help="refit cache (default OUT/refits); reruns resume from it")
    parser.add_argument("--allow-untrustworthy", action="store_true",
                        help="go on with a model that is not at its optimum (results.json: trustworthy false, untrustworthy_reasons); "
                             "a Hessian that is not positive definite is refused regardless")
    parser.add_argument("--no-progress", action="store_true")


def _config_from_args(args: argparse.Namespace) -> Fig2Config:
    return Fig2Config(
        out=args.out, data_dir=args.data_dir, download=not args.no_download, test_indices=[int(s) for s in str(args.test_index).split(",")],
        num_points=args.num_points, solvers=[s.strip() for s in args.solvers.split(",") if s.strip()],
        train_size=args.train_size, workers=args.workers, scheduler=args.scheduler,
        weight_decay=args.weight_decay, optimum_tol=args.optimum_tol, max_newton_steps=args.max_newton_steps,
        lissa=LiSSASettings.from_args(args), cache_dir=args.cache_dir,
        allow_untrustworthy=args.allow_untrustworthy, progress=False if args.no_progress else None,
    )
