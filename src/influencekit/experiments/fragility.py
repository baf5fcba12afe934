"""Fragility of influence functions on deeper networks, and the role of weight decay (Basu et al. 2021).

For every (model, weight decay) cell of the sweep, on one MNIST subset and one test point:

 1. Fit the model in float64 to a verified local optimum of
    R(theta) = (1/n) sum_i CE(z_i; theta) + (wd/2)||theta||^2
    (:func:`~influencekit.models.fitting.fit_to_local_optimum`), within a fixed budget of
    Newton steps: a cell that does not get there says so (``at_optimum`` false), it is not retried.
 2. The explicit Hessian H (p x p, p is small here) gives the exact spectrum: ``negative_eigenvalues``,
    ``min_eigenvalue``, ``max_eigenvalue``; ``damping_needed`` = max(0, -lambda_min) is the damping
    above which H + lambda I is positive definite. The same number by Lanczos, matrix-free
    (:func:`~influencekit.curvature.spectrum.smallest_eigenvalue`, ARPACK), is ``min_eigenvalue_lanczos``.
 3. Influence I_up,loss = -g_test^T (H + d I)^-1 g_i by CG (``damping_used`` d = 0 where H is
    positive definite, else ``damping_needed + damping_margin``), predicted removal effect
    -(1/n) I_up,loss. Where H is not positive definite, an undamped CG solve is also tried, to
    record whether influencekit's solve check (:func:`~influencekit.solvers.convergence.check_solve`)
    catches the indefinite curvature and which damping it names (``undamped_cg``).
 4. The ``num_points`` training points of largest |I_up,loss| are retrained without each
    (:func:`~influencekit.validation.retraining.retrain`, mode "true": the true objective,
    warm-started from theta_hat, float64, to ||grad|| <= tol, on Dask, with the resumable refit
    cache); actual = L(z_test, theta_-i) - L(z_test, theta_hat). ``pearson`` / ``spearman`` compare
    predicted with actual.

Models (inputs are Koh & Liang's split, pixels / 255, the first ``train_size`` training images):
multinomial logistic regression, tanh MLPs with one and two hidden layers of ``hidden`` units (on
``28 / pool``-pixel average-pooled images), and :func:`~influencekit.models.small_cnn.koh_liang_cnn`
with ``cnn_channels`` channels on images resized to ``cnn_image_size`` pixels (its five 'valid'
convolutions need at least 21).

Each finished cell is written at once to ``OUT/cells/<model>_wd<wd>.json`` (its theta_hat, flat in
``named_parameters`` order, to ``OUT/cells/<model>_wd<wd>/``) and reused by a rerun with the same settings; ``results.json``, ``heatmap.png`` and ``report.html`` are written at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencekit.curvature import DenseOperator
from influencekit.curvature.spectrum import smallest_eigenvalue
from influencekit.datasets.mnist import add_data_arguments
from influencekit.errors import UnconvergedSolveError
from influencekit.experiments.koh_liang_fig2 import RetrainingRunConfig, _correlations, _load_data, _log
from influencekit.models.fitting import LocalOptimum, fit_to_local_optimum
from influencekit.models.mlp import tanh_mlp
from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.persistence import atomic_write, save_tensors
from influencekit.scores.influence import InfluenceFunction
from influencekit.solvers import CGSolver, IndefiniteCurvatureError
from influencekit.validation.retraining import measurements_at, retrain

MODELS = ("logistic", "mlp1", "mlp2", "cnn")
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
MODEL_TITLES = {"logistic": "logistic regression", "mlp1": "MLP, 1 hidden layer", "mlp2": "MLP, 2 hidden layers",
                "cnn": "small CNN"}


@dataclass
class FragilityConfig(RetrainingRunConfig):
    """Settings of the sweep (defaults: the whole sweep in about 15 minutes on 2 cores).

    Attributes:
        models, weight_decays: the grid.
        train_size, test_index: the first ``train_size`` training images; the test image.
        num_points: most influential points retrained per cell.
        pool: average-pooling factor of the logistic regression's and MLPs' inputs (4: 7 x 7 pixels).
        hidden: units per hidden layer of the MLPs.
        cnn_channels, cnn_image_size: the CNN's channels and input size (bilinear, antialiased resize).
        tol: ||grad R|| of the fit and of every refit.
        max_newton_steps, adam_epochs, lbfgs_max_iter: the fit's budget.
        refit_max_steps: Newton steps per refit.
        damping_margin: added to ``damping_needed`` where H is not positive definite.
        cg_rtol: CG's relative residual.
        retrain_off_optimum: retrain cells whose fit is not at a verified optimum too (by default they are
            reported without a correlation: their refits have no minimum near theta_hat to converge to).
        time_budget: seconds after which no new cell is started (the rest are reported as not run; a rerun
            resumes them). None: no limit.
    """

    models: list[str] = field(default_factory=lambda: list(MODELS))
    weight_decays: list[float] = field(default_factory=lambda: list(WEIGHT_DECAYS))
    train_size: int | None = 300
    test_index: int = 8
    num_points: int = 50
    pool: int = 4
    hidden: int = 8
    cnn_channels: int = 2
    cnn_image_size: int = 21
    tol: float = 1e-10
    max_newton_steps: int = 6
    adam_epochs: int = 30
    lbfgs_max_iter: int = 2000
    refit_max_steps: int = 20
    damping_margin: float = 1e-3
    cg_rtol: float = 1e-10
    retrain_off_optimum: bool = False
    time_budget: float | None = None
    seed: int = 0
    refit_batch_size: int = 5


def model_inputs(name: str, x: Tensor, config: FragilityConfig) -> Tensor:
    """Flat (n, 784) images in [0, 1] -> the inputs of model ``name``: (n, (28/pool)^2) or (n, cnn_image_size^2)."""
    images = x.reshape(-1, 1, 28, 28).to(torch.float64)
    if name == "cnn":
        size = config.cnn_image_size
        if size != 28:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    elif config.pool > 1:
        images = F.avg_pool2d(images, config.pool)
    return images.flatten(1)


def build_model(name: str, inputs: int, config: FragilityConfig) -> nn.Module:
    """The (untrained) model of a cell, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    if name == "cnn":
        return koh_liang_cnn(config.cnn_channels, image_size=config.cnn_image_size)
    depth = {"logistic": 0, "mlp1": 1, "mlp2": 2}[name]
    return tanh_mlp(inputs, [config.hidden] * depth)


def fit_cell(config: FragilityConfig, name: str, weight_decay: float, x: Tensor, y: Tensor) -> LocalOptimum:
    """Model ``name`` fitted on its inputs ``x`` (:func:`model_inputs`) within the cell's budget (deterministic in ``config.seed``)."""
    return fit_to_local_optimum(
        build_model(name, x.shape[1], config), "cross_entropy", x, y, weight_decay, tol=config.tol,
        adam_epochs=config.adam_epochs, lbfgs_max_iter=config.lbfgs_max_iter, max_newton_steps=config.max_newton_steps,
        seed=config.seed,
    )


def _cell_id(name: str, weight_decay: float) -> str:
    return f"{name}_wd{weight_decay:g}"


def _cell_settings(config: FragilityConfig, name: str, weight_decay: float) -> dict[str, Any]:
    """Everything that changes a cell's numbers (a saved cell is reused only when these match)."""
    keep = ("train_size", "test_index", "num_points", "tol", "max_newton_steps", "adam_epochs", "lbfgs_max_iter",
            "refit_max_steps", "damping_margin", "cg_rtol", "retrain_off_optimum", "seed")
    shape = {"cnn": ("cnn_channels", "cnn_image_size")}.get(name, ("pool", "hidden"))
    return {"model": name, "weight_decay": weight_decay, "data_dir": str(config.data_dir),
            **{key: getattr(config, key) for key in keep + shape}}


def run_cell(config: FragilityConfig, name: str, weight_decay: float, train: tuple[Tensor, Tensor],
             test: tuple[Tensor, Tensor], scheduler: str | None) -> dict[str, Any]:
    """Measure one cell (module docstring, steps 1-4); a failure is recorded in ``error``, not raised."""
    start = time.perf_counter()
    cell: dict[str, Any] = {"model": name, "weight_decay": weight_decay, "n_train": len(train[1])}
    try:
        _measure(config, name, weight_decay, train, test, scheduler, cell)
    except Exception as error:  # a cell that fails says why; the sweep goes on
        cell["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
        _log(f"[{_cell_id(name, weight_decay)}] failed: {cell['error']}")
    cell["seconds"] = time.perf_counter() - start
    return cell


def _measure(config: FragilityConfig, name: str, weight_decay: float, train: tuple[Tensor, Tensor],
             test: tuple[Tensor, Tensor], scheduler: str | None, cell: dict[str, Any]) -> None:
    label = f"[{_cell_id(name, weight_decay)}]"
    seconds: dict[str, float] = {}
    cell["seconds_by_stage"] = seconds
    x, y = model_inputs(name, train[0], config), train[1]
    test = (model_inputs(name, test[0], config), test[1])

    t = time.perf_counter()
    fit = fit_cell(config, name, weight_decay, x, y)
    seconds["fit"] = time.perf_counter() - t
    objective, hessian, spectrum = fit.objective, fit.hessian, fit.spectrum
    save_tensors(config.out / "cells" / _cell_id(name, weight_decay), {"theta": objective.theta},
                 {"model": name, "weight_decay": weight_decay, "parameters": objective.space.names})
    p = objective.dim
    positive_definite = spectrum.min > spectrum.zero_tolerance
    cell.update(
        p=p, grad_norm=fit.gradient_norm, at_optimum=fit.at_local_optimum, newton_steps=fit.newton_steps,
        negative_eigenvalues=spectrum.negative, zero_eigenvalues=spectrum.zero, min_eigenvalue=spectrum.min,
        max_eigenvalue=spectrum.max, positive_definite=positive_definite, damping_needed=max(0.0, -spectrum.min),
    )

    t = time.perf_counter()
    lanczos = smallest_eigenvalue(DenseOperator(hessian))
    seconds["lanczos"] = time.perf_counter() - t
    cell.update(min_eigenvalue_lanczos=lanczos.smallest, lanczos_matvecs=lanczos.matvecs, lanczos_converged=lanczos.converged)
    _log(f"{label} p = {p}, ||grad R|| = {fit.gradient_norm:.3g}, at optimum: {fit.at_local_optimum}; eigenvalues in "
         f"[{spectrum.min:.4g}, {spectrum.max:.4g}] (Lanczos {lanczos.smallest:.4g}), {spectrum.negative} negative")

    damping = 0.0 if positive_definite else cell["damping_needed"] + config.damping_margin
    cell["damping_used"] = damping
    solver = CGSolver(DenseOperator(hessian), damping=damping, rtol=config.cg_rtol, maxiter=20 * p)
    if not positive_definite:
        cell["undamped_cg"] = _undamped_probe(objective, hessian, test, config)
    t = time.perf_counter()
    scores = InfluenceFunction(objective, solver).scores(test)
    seconds["cg"] = time.perf_counter() - t
    cell["cg_iterations"] = int(scores.inverse_hvp.iterations[0])
    cell["cg_relative_residual"] = float(scores.inverse_hvp.relative_residuals(objective.measurement_gradients(test))[0])
    chosen = [int(i) for i in scores.most_influential(config.num_points)[0]]
    predicted = scores.predicted_loss_change[0][chosen].numpy()
    cell["test_loss"] = float(measurements_at(objective, objective.theta, test)[0])
    if not fit.at_local_optimum and not config.retrain_off_optimum:
        cell["retrain_skipped"] = (
            f"not at a verified local optimum (||grad R|| = {fit.gradient_norm:.3g} > {config.tol:g} or H not positive "
            f"definite): leave-one-out retraining has no nearby minimum to converge to; --retrain-off-optimum to try anyway")
        cell.update(pearson=None, spearman=None)
        _log(f"{label} damping {damping:.3g}; retraining skipped: {cell['retrain_skipped']}")
        return

    t = time.perf_counter()
    refits = retrain(
        objective, chosen, mode="true", hessian=hessian, tol=config.tol, max_steps=config.refit_max_steps,
        cache_dir=(config.cache_dir or config.out / "refits") / _cell_id(name, weight_decay),
        workers=config.workers, scheduler=scheduler, batch_size=config.refit_batch_size,
        progress=config.progress is not False,
    )
    seconds["retrain"] = time.perf_counter() - t
    thetas = torch.stack([refits[i]["theta"] for i in chosen])
    actual = (measurements_at(objective, thetas, test)[:, 0] - cell["test_loss"]).numpy()
    norms = [refits[i]["gradient_norm"] for i in chosen]
    cell.update(
        **_correlations(predicted, actual), num_points=len(chosen), refits_not_converged=sum(not refits[i]["converged"] for i in chosen),
        refit_max_grad_norm=max(norms), refit_max_steps=max(refits[i]["steps"] for i in chosen),
        points=chosen, predicted=predicted.tolist(), actual=actual.tolist(),
    )
    _log(f"{label} damping {damping:.3g}; {len(chosen)} refits in {seconds['retrain']:.1f} s "
         f"({cell['refits_not_converged']} not converged); Pearson {cell['pearson']:.3f}, Spearman {cell['spearman']:.3f}")


def _undamped_probe(objective: Any, hessian: Tensor, test: tuple[Tensor, Tensor], config: FragilityConfig) -> dict[str, Any]:
    """What influencekit's solve check says about an undamped CG solve on an indefinite or singular H."""
    solver = CGSolver(DenseOperator(hessian), damping=0.0, rtol=config.cg_rtol, maxiter=20 * objective.dim)
    try:
        solve = InfluenceFunction(objective, solver).inverse_hvp_of_test(test)
    except IndefiniteCurvatureError as error:
        return {"outcome": "IndefiniteCurvatureError", "suggested_damping": error.suggested_damping,
                "smallest_lanczos": error.smallest, "message": str(error)}
    except UnconvergedSolveError as error:
        return {"outcome": "UnconvergedSolveError", "message": str(error)}
    return {"outcome": "converged without a warning", "iterations": int(solve.iterations[0])}


@contextlib.contextmanager
def _scheduler(config: FragilityConfig) -> Iterator[str | None]:
    """One Dask cluster for the whole sweep: ``config.scheduler``, a local one of ``config.workers``, or None (in-process)."""
    if config.scheduler is not None or config.workers <= 0:
        yield config.scheduler
        return
    from influencekit.cluster import dask_client

    with dask_client(config.workers) as client:
        yield client.scheduler.address


def _peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest finished child (Linux: ru_maxrss in KiB)."""
    return {"this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def sweep(config: FragilityConfig) -> dict[str, Any]:
    """Run (or resume) every cell; writes and returns ``results.json``'s document."""
    unknown = set(config.models) - set(MODELS)
    if unknown or not config.models or not config.weight_decays:
        raise ValueError(f"models must come from {MODELS} (got {config.models}) and weight decays must not be empty")
    if any(wd < 0 for wd in config.weight_decays):
        raise ValueError(f"weight decays must be >= 0, got {config.weight_decays}")
    start = time.perf_counter()
    (config.out / "cells").mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = _load_data(config)
    test = (x_test[config.test_index : config.test_index + 1], y_test[config.test_index : config.test_index + 1])
    _log(f"data: n_train = {len(y)}, test index {config.test_index} (label {int(test[1][0])}); "
         f"{len(config.models)} models x {len(config.weight_decays)} weight decays")
    cells = []
    with _scheduler(config) as scheduler:
        for name in config.models:
            for weight_decay in config.weight_decays:
                if config.time_budget is not None and time.perf_counter() - start > config.time_budget:
                    cells.append(_cached_or_skipped(config, name, float(weight_decay), len(y)))
                    continue
                cells.append(_cached_or_run(config, name, float(weight_decay), (x, y), test, scheduler))
    results = {
        "sizes": _sizes(config, len(y), cells),
        "test_index": config.test_index,
        "test_label": int(test[1][0]),
        "num_points": config.num_points,
        "cells": cells,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "sign_convention": "predicted = -(1/n) I_up,loss = (1/n) g_test^T (H + damping_used I)^-1 g_i; "
                           "actual = L(z_test, theta_-i) - L(z_test, theta_hat), retrained on the true objective",
        "peak_memory_mb": _peak_memory_mb(),
        "total_seconds": time.perf_counter() - start,
    }
    atomic_write(config.out / "results.json", json.dumps(results, indent=2))
    plot_heatmap(config.out / "heatmap.png", results)
    from influencekit.reports.experiments import write_fragility_report

    write_fragility_report(config, results, test[0][0])
    _log(table(results))
    _log(f"total {results['total_seconds']:.1f} s; wrote {config.out / 'results.json'}, heatmap.png, report.html")
    return results


def _saved_cell(config: FragilityConfig, name: str, weight_decay: float) -> dict[str, Any] | None:
    """The cell saved by an earlier run with the same settings (a failed cell is not reused: it is tried again)."""
    path = config.out / "cells" / f"{_cell_id(name, weight_decay)}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == _cell_settings(config, name, weight_decay) and "error" not in saved["cell"]:
            _log(f"[{_cell_id(name, weight_decay)}] from {path}")
            return saved["cell"]
    return None


def _cached_or_skipped(config: FragilityConfig, name: str, weight_decay: float, n: int) -> dict[str, Any]:
    return _saved_cell(config, name, weight_decay) or {
        "model": name, "weight_decay": weight_decay, "n_train": n, "seconds": 0.0,
        "error": f"not run: the --time-budget of {config.time_budget:g} s was spent before this cell (rerun to resume)"}


def _cached_or_run(config: FragilityConfig, name: str, weight_decay: float, train: tuple[Tensor, Tensor],
                   test: tuple[Tensor, Tensor], scheduler: str | None) -> dict[str, Any]:
    saved = _saved_cell(config, name, weight_decay)
    if saved is not None:
        return saved
    path = config.out / "cells" / f"{_cell_id(name, weight_decay)}.json"
    settings = _cell_settings(config, name, weight_decay)
    cell = run_cell(config, name, weight_decay, train, test, scheduler)
    atomic_write(path, json.dumps({"settings": settings, "cell": cell}, indent=2))
    return cell


def _sizes(config: FragilityConfig, n: int, cells: list[dict[str, Any]]) -> dict[str, Any]:
    side = 28 // config.pool
    inputs = {"logistic": f"{side}x{side} (average pooling by {config.pool})",
              "mlp1": f"{side}x{side}, tanh, hidden {config.hidden}",
              "mlp2": f"{side}x{side}, tanh, hidden {config.hidden}-{config.hidden}",
              "cnn": f"{config.cnn_image_size}x{config.cnn_image_size} (bilinear resize), {config.cnn_channels} channels"}
    return {"n_train": n, "num_points": config.num_points,
            "models": {name: inputs[name] for name in config.models},
            "parameters": {c["model"]: c["p"] for c in cells if "p" in c}}


def table(results: dict[str, Any]) -> str:
    """The cells as a Markdown table (the benchmark record)."""
    lines = ["| model | wd | p | ‖∇R‖ | at optimum | neg. eig. | λ_min | λ_max | damping needed | damping used | Pearson | Spearman | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        if "error" in c and "p" not in c:
            lines.append(f"| {c['model']} | {c['weight_decay']:g} | | | | | | | | | {c['error']} | | {c['seconds']:.0f} |")
            continue
        if c.get("pearson") is not None:
            corr = f"{c['pearson']:.3f} | {c['spearman']:.3f}"
        else:
            corr = f"failed: {c['error']} |" if "error" in c else "not retrained (no optimum) |"
        lines.append(f"| {c['model']} | {c['weight_decay']:g} | {c['p']} | {c['grad_norm']:.2g} | {'yes' if c['at_optimum'] else 'no'} "
                     f"| {c['negative_eigenvalues']} | {c['min_eigenvalue']:.3g} | {c['max_eigenvalue']:.3g} | {c['damping_needed']:.3g} "
                     f"| {c.get('damping_used', float('nan')):.3g} | {corr} | {c['seconds']:.0f} |")
    return "\n".join(lines)


def plot_heatmap(path: Path, results: dict[str, Any]) -> None:
    """Pearson R (model x weight decay); '*' marks a cell not at a verified optimum (retrained anyway); cells
    without a number say why (no optimum: not retrained; failed: an error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in results["cells"]))
    decays = list(dict.fromkeys(c["weight_decay"] for c in results["cells"]))
    values = np.full((len(models), len(decays)), np.nan)
    fig, ax = plt.subplots(figsize=(1.6 * len(decays) + 2.5, 0.9 * len(models) + 1.6))
    for c in results["cells"]:
        r, k = models.index(c["model"]), decays.index(c["weight_decay"])
        if c.get("pearson") is not None:
            values[r, k] = c["pearson"]
            text = f"{c['pearson']:.2f}{'' if c['at_optimum'] else '*'}\n{c['negative_eigenvalues']} neg."
        elif "error" in c:
            text = "not run" if c["error"].startswith("not run") else "failed"
        else:
            text = f"no optimum\n‖∇R‖ {c['grad_norm']:.0e}"
        ax.text(k, r, text, ha="center", va="center", fontsize=9)
    image = ax.imshow(values, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(decays)), [f"{d:g}" for d in decays])
    ax.set_yticks(range(len(models)), [MODEL_TITLES[m] for m in models])
    ax.set_xlabel("weight decay")
    fig.colorbar(image, ax=ax, label="Pearson R, CG influence vs. retraining")
    ax.set_title(f"Influence vs. leave-one-out retraining, top {results['num_points']} points\n"
                 f"n = {results['sizes']['n_train']}; * not at a verified optimum", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config_or_args: FragilityConfig | argparse.Namespace) -> int:
    config = config_or_args if isinstance(config_or_args, FragilityConfig) else _config_from_args(config_or_args)
    sweep(config)
    return 0


def _list(text: str, kind: type) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    d = FragilityConfig(out=Path("out"))
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--models", default=",".join(d.models), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--weight-decays", default=",".join(f"{w:g}" for w in d.weight_decays),
                        help="comma-separated weight decays (default 0,1e-4,1e-3,1e-2)")
    parser.add_argument("--train-size", type=int, default=d.train_size, help="first N training images (default 300)")
    parser.add_argument("--test-index", type=int, default=d.test_index, help="MNIST test image (default 8)")
    parser.add_argument("--num-points", type=int, default=d.num_points, help="most influential points retrained per cell (default 50)")
    parser.add_argument("--pool", type=int, default=d.pool, help="average pooling of the MLPs' inputs (default 4: 7x7)")
    parser.add_argument("--hidden", type=int, default=d.hidden, help="units per hidden layer of the MLPs (default 8)")
    parser.add_argument("--cnn-channels", type=int, default=d.cnn_channels, help="channels of the CNN (default 2)")
    parser.add_argument("--cnn-image-size", type=int, default=d.cnn_image_size, help="CNN input size, >= 21 (default 21)")
    parser.add_argument("--tol", type=float, default=d.tol, help="||grad R|| of the fit and of every refit (default 1e-10)")
    parser.add_argument("--max-newton-steps", type=int, default=d.max_newton_steps, help="Newton budget of each fit (default 6)")
    parser.add_argument("--adam-epochs", type=int, default=d.adam_epochs)
    parser.add_argument("--lbfgs-max-iter", type=int, default=d.lbfgs_max_iter)
    parser.add_argument("--refit-max-steps", type=int, default=d.refit_max_steps, help="Newton steps per refit (default 20)")
    parser.add_argument("--damping-margin", type=float, default=d.damping_margin,
                        help="damping above damping_needed where H is not positive definite (default 1e-3)")
    parser.add_argument("--retrain-off-optimum", action="store_true",
                        help="retrain cells not at a verified optimum too (default: reported without a correlation)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which no new cell starts (they are reported as not run; rerun to resume)")
    parser.add_argument("--workers", type=int, default=d.workers, help="Dask LocalCluster workers (0: in-process)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (overrides --workers)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="refit cache (default OUT/refits); reruns resume from it")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-progress", action="store_true")


def _config_from_args(args: argparse.Namespace) -> FragilityConfig:
    return FragilityConfig(
        out=args.out, data_dir=args.data_dir, download=not args.no_download, models=_list(args.models, str),
        weight_decays=_list(args.weight_decays, float), train_size=args.train_size, test_index=args.test_index,
        num_points=args.num_points, pool=args.pool, hidden=args.hidden, cnn_channels=args.cnn_channels,
        cnn_image_size=args.cnn_image_size, tol=args.tol, max_newton_steps=args.max_newton_steps, adam_epochs=args.adam_epochs,
        lbfgs_max_iter=args.lbfgs_max_iter, refit_max_steps=args.refit_max_steps, damping_margin=args.damping_margin,
        retrain_off_optimum=args.retrain_off_optimum, time_budget=args.time_budget, workers=args.workers, scheduler=args.scheduler, cache_dir=args.cache_dir, seed=args.seed,
        progress=False if args.no_progress else None,
    )
