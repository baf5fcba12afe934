"""Koh & Liang (2017), Figure 2 right panel: influence on a small CNN vs. actual retraining.

Pipeline:
 1. MNIST, Koh & Liang's split; the first ``train_size`` (5,500: 10% of their
    55,000) training points; test image 6558.
 2. :func:`~influencekit.models.small_cnn.koh_liang_cnn` (2,616 parameters),
    weight decay 0.001, trained to a verified local optimum in float64
    (:func:`~influencekit.models.fitting.fit_to_local_optimum`: Adam, L-BFGS,
    Levenberg-Marquardt on the Gauss-Newton matrix, saddle-free Newton): ||grad R||, the
    explicit Hessian's extreme eigenvalues and its number of negative ones are
    reported, with the damping that would make H + lambda I positive definite.
 3. Predicted change on removal, -(1/n) I_up,loss, by CG on (H + damping I)
    (Koh & Liang: damping 0.01), for all training points.
 4. The ``num_points`` largest |I_up,loss| are retrained by the three modes of
    :mod:`influencekit.validation.retraining`: "true" (the true objective to
    ||grad|| <= tol; the reference: ``solvers.cg.pearson``), "surrogate" (Koh &
    Liang's damped quadratic surrogate with the same damping) and "budget"
    (a fixed number of full-batch gradient steps from theta_hat, as Koh & Liang
    retrained for a fixed budget). Actual = L(z_test, theta_-i) - L(z_test, theta_hat).
 5. ``results.json`` (the logistic-regression panels' schema plus
    ``correlations`` against every mode), ``points.csv``, ``figure.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from influencekit.curvature import DenseOperator
from influencekit.datasets.mnist import add_data_arguments
from influencekit.experiments.koh_liang_fig2 import (
    RetrainingRunConfig,
    UntrustworthyModelError,
    _correlations,
    _load_data,
    _log,
    _plot,
    run_or_refuse,
)
from influencekit.scores.influence import InfluenceFunction
from influencekit.models.fitting import fit_to_local_optimum
from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.solvers import CGSolver
from influencekit.validation.retraining import MODES, measurements_at, retrain


@dataclass
class CNNConfig(RetrainingRunConfig):
    """Arguments of the reproduction (defaults: Koh & Liang's right panel where affordable)."""

    test_index: int = 6558
    num_points: int = 100
    train_size: int | None = 5500
    channels: int = 8
    weight_decay: float = 0.001
    damping: float = 0.01
    optimum_tol: float = 1e-8
    refit_tol: float = 1e-8
    cg_rtol: float = 1e-10
    modes: list[str] = field(default_factory=lambda: list(MODES))
    budget_steps: int = 30
    budget_lr: float | None = None
    adam_epochs: int = 30
    adam_batch: int = 100
    adam_lr: float = 3e-3
    lbfgs_max_iter: int = 300
    gauss_newton_steps: int = 100
    seed: int = 0
    refit_batch_size: int = 10


def run(config_or_args: CNNConfig | argparse.Namespace) -> int:
    config = config_or_args if isinstance(config_or_args, CNNConfig) else _config_from_args(config_or_args)
    return run_or_refuse(reproduce, config)


def reproduce(config: CNNConfig) -> dict:
    """Run the whole pipeline; returns (and writes) the results dictionary."""
    if "true" not in config.modes or set(config.modes) - set(MODES):
        raise ValueError(f"modes must include 'true' and come from {MODES}, got {config.modes}")
    start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = _load_data(config)
    n = len(y)
    test = (x_test[config.test_index : config.test_index + 1], y_test[config.test_index : config.test_index + 1])
    _log(f"data: n_train = {n}, test index {config.test_index} (label {int(test[1][0])})")

    torch.manual_seed(config.seed)
    fit = fit_to_local_optimum(
        koh_liang_cnn(config.channels), "cross_entropy", x, y, config.weight_decay, tol=config.optimum_tol, adam_epochs=config.adam_epochs,
        adam_batch=config.adam_batch, adam_lr=config.adam_lr, lbfgs_max_iter=config.lbfgs_max_iter, max_gauss_newton_steps=config.gauss_newton_steps, seed=config.seed, log=_log,
    )
    objective, hessian, spectrum = fit.objective, fit.hessian, fit.spectrum
    test_accuracy = float((objective.outputs(objective.theta, (x_test.double(), y_test)).argmax(1) == y_test).double().mean())
    _log(f"model: ||grad R|| = {fit.gradient_norm:.3g}, test accuracy {test_accuracy:.4f}, "
         f"Hessian eigenvalues in [{spectrum.min:.4g}, {spectrum.max:.4g}], {spectrum.negative} negative")

    warnings: list[str] = []
    if not fit.at_local_optimum:
        warnings.append(f"not at a verified local optimum: ||grad R|| = {fit.gradient_norm:.3g} (tol {config.optimum_tol:g}), "
                        f"{spectrum.negative} negative eigenvalues; H + lambda I is positive definite for lambda >= "
                        f"{fit.damping_for_positive_definite:.4g}")
    if config.damping + spectrum.min <= 0:
        warnings.append(f"damping {config.damping:g} leaves H + damping I indefinite (smallest eigenvalue {spectrum.min:.4g}); "
                        f"use damping >= {fit.damping_for_positive_definite:.4g}")
    if warnings and not config.allow_untrustworthy:
        raise UntrustworthyModelError("; ".join(warnings) + " (--allow-untrustworthy to compute anyway)")
    damping_reason = (
        f"H is positive definite (smallest eigenvalue {spectrum.min:.4g}), so no damping is needed for a solution to exist; "
        f"{config.damping:g} is Koh & Liang's value and makes CG's prediction the first-order change of the damped "
        f"quadratic surrogate (mode 'surrogate')"
        if spectrum.min > 0 else
        f"H has {spectrum.negative} negative eigenvalues (smallest {spectrum.min:.4g}); damping >= "
        f"{fit.damping_for_positive_definite:.4g} makes H + damping I positive definite"
    )

    t = time.perf_counter()
    solver = CGSolver(DenseOperator(hessian), damping=config.damping, rtol=config.cg_rtol, maxiter=20 * objective.dim)
    scores = InfluenceFunction(objective, solver).scores(test)
    cg_seconds = time.perf_counter() - t
    predicted_all = scores.predicted_loss_change[0]
    relative = scores.inverse_hvp.relative_residuals(objective.measurement_gradients(test))
    chosen = [int(i) for i in scores.most_influential(config.num_points)[0]]
    predicted = predicted_all[chosen].numpy()
    _log(f"cg: damping {config.damping:g}, {int(scores.inverse_hvp.iterations[0])} iterations, relative residual "
         f"{float(relative[0]):.2g}, {cg_seconds:.1f} s")

    base = float(measurements_at(objective, objective.theta, test)[0])
    lr = config.budget_lr if config.budget_lr is not None else 1.0 / spectrum.max
    retrain_info: dict[str, dict] = {}
    actual: dict[str, np.ndarray] = {}
    for mode in config.modes:
        t = time.perf_counter()
        refits = retrain(
            objective, chosen, mode=mode, hessian=hessian, tol=config.refit_tol, damping=config.damping,
            budget_steps=config.budget_steps, budget_lr=lr, cache_dir=config.cache_dir or config.out / "refits",
            workers=config.workers, scheduler=config.scheduler, batch_size=config.refit_batch_size,
            progress=config.progress is not False,
        )
        seconds = time.perf_counter() - t
        thetas = torch.stack([refits[i]["theta"] for i in chosen])
        actual[mode] = (measurements_at(objective, thetas, test)[:, 0] - base).numpy()
        norms = [refits[i]["gradient_norm"] for i in chosen]
        retrain_info[mode] = {
            "seconds": seconds, "refits": len(chosen), "max_grad_norm": max(norms), "median_grad_norm": float(np.median(norms)),
            "not_converged": sum(not refits[i]["converged"] for i in chosen),
            "max_steps": max(refits[i]["steps"] for i in chosen), "refit_seconds": [refits[i]["seconds"] for i in chosen],
            **({"budget_steps": config.budget_steps, "budget_lr": lr} if mode == "budget" else {}),
            **({"damping": config.damping} if mode == "surrogate" else {}),
        }
        _log(f"retrain ({mode}): {len(chosen)} refits in {seconds:.1f} s, max ||grad|| {max(norms):.3g}; "
             f"Pearson R = {_correlations(predicted, actual[mode])['pearson']:.4f}")

    correlations = {mode: _correlations(predicted, actual[mode]) for mode in config.modes}
    results = {
        "test_index": config.test_index,
        "n_train": n,
        "num_points": config.num_points,
        "model": {"parameters": objective.dim, "test_accuracy": test_accuracy, **fit.summary()},
        "hessian": {**spectrum.as_dict(), "min_eig": spectrum.min, "max_eig": spectrum.max,
                    "damping_for_positive_definite": fit.damping_for_positive_definite},
        "damping": {"value": config.damping, "why": damping_reason},
        "solvers": {"cg": {**correlations["true"], "seconds": cg_seconds, "relative_residual": [float(relative[0])],
                           "iterations": [int(scores.inverse_hvp.iterations[0])], "damping": config.damping}},
        "correlations": correlations,
        "retrain": {**retrain_info, "max_grad_norm": retrain_info["true"]["max_grad_norm"],
                    "seconds": sum(r["seconds"] for r in retrain_info.values()), "workers": config.workers,
                    "scheduler": config.scheduler},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "sign_convention": "predicted = -(1/n) I_up,loss = (1/n) g_test^T (H + damping I)^-1 g_i; "
                           "actual = L(z_test, theta_-i) - L(z_test, theta_hat)",
        "warnings": warnings,
        "trustworthy": not warnings,
    }
    results["total_seconds"] = time.perf_counter() - start
    (config.out / "results.json").write_text(json.dumps(results, indent=2))
    _write_points(config.out / "points.csv", chosen, y, predicted, actual)
    panels = [{"test_index": f"{config.test_index}, retrain: {mode}", "points": chosen, "actual": actual[mode],
               "predicted": {"cg": predicted}} for mode in config.modes]
    _plot(config.out / "figure.png", panels, ["cg"], n)
    _log(f"cg vs true retraining: Pearson R = {correlations['true']['pearson']:.4f}, Spearman = "
         f"{correlations['true']['spearman']:.4f}; total {results['total_seconds']:.1f} s; wrote {config.out}")
    return results


def _write_points(path: Path, chosen: list[int], labels: torch.Tensor, predicted: np.ndarray, actual: dict[str, np.ndarray]) -> None:
    modes = list(actual)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["train_index", "mnist_index", "label", "predicted_cg", "actual",
                         *[f"actual_{m}" for m in modes if m != "true"]])
        for pos, index in enumerate(chosen):
            writer.writerow([index, index + 5000, int(labels[index]), f"{predicted[pos]:.10g}", f"{actual['true'][pos]:.10g}",
                             *[f"{actual[m][pos]:.10g}" for m in modes if m != "true"]])


def configure(parser: argparse.ArgumentParser) -> None:
    d = CNNConfig(out=Path("out"))
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--test-index", type=int, default=d.test_index)
    parser.add_argument("--num-points", type=int, default=d.num_points, help="most influential points to retrain without (default 100)")
    parser.add_argument("--train-size", type=int, default=d.train_size, help="first N training points of Koh & Liang's split (default 5500)")
    parser.add_argument("--channels", type=int, default=d.channels, help="channels of the 3x3 convolutions (default 8, Koh & Liang; fewer for quick checks)")
    parser.add_argument("--damping", type=float, default=d.damping, help="CG and surrogate damping (default 0.01, Koh & Liang)")
    parser.add_argument("--modes", default=",".join(MODES), help="retraining modes: true (required), surrogate, budget")
    parser.add_argument("--budget-steps", type=int, default=d.budget_steps, help="gradient steps of the 'budget' mode")
    parser.add_argument("--budget-lr", type=float, default=None, help="step size of the 'budget' mode (default 1 / largest eigenvalue)")
    parser.add_argument("--tol", type=float, default=d.refit_tol, help="gradient-norm tolerance of the optimum and of the refits")
    parser.add_argument("--adam-epochs", type=int, default=d.adam_epochs)
    parser.add_argument("--adam-batch", type=int, default=d.adam_batch, help="Adam mini-batch size (>= the training size: full-batch Adam)")
    parser.add_argument("--adam-lr", type=float, default=d.adam_lr)
    parser.add_argument("--lbfgs-max-iter", type=int, default=d.lbfgs_max_iter)
    parser.add_argument("--gauss-newton-steps", type=int, default=d.gauss_newton_steps,
                        help="most Levenberg-Marquardt steps with the explicit Gauss-Newton matrix before exact Newton")
    parser.add_argument("--workers", type=int, default=d.workers, help="Dask LocalCluster workers (0: in-process)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (overrides --workers)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="refit cache (default OUT/refits); reruns resume from it")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--allow-untrustworthy", action="store_true", help="compute even if not at a verified local optimum")
    parser.add_argument("--no-progress", action="store_true")


def _config_from_args(args: argparse.Namespace) -> CNNConfig:
    return CNNConfig(
        out=args.out, data_dir=args.data_dir, download=not args.no_download, test_index=args.test_index, num_points=args.num_points, train_size=args.train_size, channels=args.channels,
        damping=args.damping, modes=[m.strip() for m in args.modes.split(",") if m.strip()], budget_steps=args.budget_steps,
        budget_lr=args.budget_lr, optimum_tol=args.tol, refit_tol=args.tol, adam_epochs=args.adam_epochs, adam_batch=args.adam_batch, adam_lr=args.adam_lr,
        lbfgs_max_iter=args.lbfgs_max_iter, gauss_newton_steps=args.gauss_newton_steps, seed=args.seed, workers=args.workers, scheduler=args.scheduler,
        cache_dir=args.cache_dir, allow_untrustworthy=args.allow_untrustworthy, progress=False if args.no_progress else None,
    )
