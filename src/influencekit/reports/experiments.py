"""``report.html`` for the CLI's experiments, from the data each already has (one call at the end of each run)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
import importlib
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencekit.reports.html import (
    Example,
    ExampleGroup,
    Report,
    Scatter,
    SolverEvidence,
    influence_groups,
    report_from_scores,
    write_report,
)

__all__ = ["command_line", "write_fastif_recall_report", "write_koh_liang_fig2_report", "write_tracin_mnist_report"]


def command_line(*command_and_args: Any) -> str:
    """The ``influencekit GROUP NAME ...`` (or ``influencekit NAME ...``) command that reruns a command with ``args``:
    ``command_line(group, name, args)`` or ``command_line(name, args)``.

    Options equal to their defaults are left out; lists are joined by commas;
    flags (``store_true``) appear when set.
    """
    from influencekit.cli import COMMANDS

    *words, args = command_and_args
    entry = COMMANDS[words[0]]
    module = entry[0] if isinstance(entry, tuple) else entry[words[1]][0]
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    parser = argparse.ArgumentParser()
    importlib.import_module(module).configure(parser)
    words = ["influencekit", *words]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest not in values:
            continue
        value, flag = values[action.dest], action.option_strings[-1]
        if action.nargs == 0:  # a flag
            if value and value != action.default:
                words.append(flag)
        elif value != action.default or action.required:
            if isinstance(value, (list, tuple)):
                words += [flag, *map(str, value)] if action.nargs in ("+", "*") else [flag, ",".join(map(str, value))]
            else:
                words += [flag, str(value)]
    return shlex.join(words)


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in settings.items() if key != "module"}


def write_koh_liang_fig2_report(
    config: Any,
    results: dict,
    per_test: list[dict],
    predicted: dict[str, np.ndarray],
    train: tuple[Tensor, Tensor],
    tests: tuple[Tensor, Tensor],
    weights: Tensor,
    k: int = 10,
) -> Path:
    """``config.out/report.html`` of :func:`influencekit.experiments.koh_liang_fig2.reproduce` (first test point).

    The helpful / harmful examples are ranked by the exact solver's scores (else the
    first solver's); the actual change is shown for those among the retrained points.
    """
    x, y = train
    n = results["n_train"]
    primary = per_test[0]
    reference = "exact" if "exact" in predicted else next(iter(predicted))
    influence = -n * predicted[reference][0]  # I_up,loss = -n * predicted removal effect
    actual = dict(zip(primary["points"], (float(a) for a in primary["actual"])))
    logits = tests[0][0] @ weights.T
    test = Example(tests[0][0], f"MNIST test #{primary['test_index']}",
                   [f"label {primary['test_label']}", f"predicted {int(logits.argmax())}", f"loss {primary['test_loss']:.4g}"])
    solvers = [
        SolverEvidence(name, info["seconds"], info["iterations"], info["relative_residual"], True,
                       {"R vs retraining": info["pearson"], "ρ vs retraining": info["spearman"],
                        "R vs exact": info["correlation_with_exact"]})
        for name, info in results["solvers"].items()
    ]
    hessian = results["hessian"]
    spectrum = {
        "smallest eigenvalue (Lanczos, shift-inverted)": hessian["min_eig"],
        "largest eigenvalue (Lanczos)": hessian["max_eig"],
        "condition number": hessian["max_eig"] / hessian["min_eig"] if hessian["min_eig"] > 0 else float("inf"),
        "negative eigenvalues": hessian["negative"],
        "||grad R|| at the fit": results["model"]["train_grad_norm"],
        "max ||grad|| of the leave-one-out refits": results["retrain"]["max_grad_norm"],
    }
    cli = {**vars(config), **{f"lissa_{key}": value for key, value in asdict(config.lissa).items()},
           "test_index": ",".join(map(str, config.test_indices)), "no_progress": config.progress is False}
    report = Report(
        title=f"Koh & Liang Figure 2: MNIST test #{primary['test_index']}",
        test=test,
        groups=influence_groups(influence, n, x, k=k, train_labels=y, actual_changes=actual, noun="image",
                                what=f" ({reference} solver)"),
        scatters=[Scatter(name, primary["actual"], primary["predicted"][name], "actual change in test loss (retrained)",
                          "predicted, −(1/n) I_up,loss") for name in predicted],
        scatter_caption=f"Predicted against actual leave-one-out change of the test loss for the {len(primary['points'])} "
                        f"training points of largest |I_up,loss|, each retrained to the exact optimum.",
        solvers=solvers,
        spectrum=spectrum,
        warnings=list(results["untrustworthy_reasons"]),
        trustworthy=results["trustworthy"],
        settings=_jsonable(results["config"]),
        command=command_line("reproduce", "koh-liang-fig2", cli),
        summary=f"Softmax regression on {n:,} MNIST training images, test accuracy {results['model']['test_accuracy']:.4f}; "
                f"{results['retrain']['refits']} leave-one-out refits. Training indices are positions in Koh & Liang's "
                f"split (MNIST index − 5,000).",
    )
    return write_report(report, Path(config.out) / "report.html")


def write_tracin_mnist_report(
    args: argparse.Namespace,
    results: dict,
    helpfulness: dict[str, Tensor],
    train: tuple[Tensor, Tensor],
    subset: Tensor,
    test_image: Tensor,
    k: int | None = None,
) -> Path:
    """``args.out/report.html`` of ``experiment tracin-mnist``: the influence function's and TracIn's top examples."""
    x, y = train
    n = x.shape[0]
    k = k or args.k
    tp = results["test_point"]
    influence = -helpfulness["influence"]
    groups = influence_groups(influence, n, x, k=k, train_labels=y, train_ids=subset, noun="image",
                              what=f" (influence function, {args.curvature.upper()} + damping {args.damping:g})")
    titles = {"tracin_last_layer": "TracIn (last layer fc2)", "tracin_full": "TracInCP (all parameters)"}
    for name in [key for key in titles if key in helpfulness]:
        scores = helpfulness[name]
        for label, largest in (("proponents", True), ("opponents", False)):
            positions = torch.topk(scores, k, largest=largest).indices.tolist()
            examples = [Example(x[i], f"#{int(subset[i])} · label {int(y[i])}", [f"TracIn {float(scores[i]):+.4g}"])
                        for i in positions]
            groups.append(ExampleGroup(f"{titles[name]}: top {k} {label}", "TracIn orientation: positive = proponent "
                                       "(helpful), negative = opponent (harmful).", examples))
    scatters = [Scatter(titles[name], -influence.numpy(), helpfulness[name].numpy(), "−I_up,loss (helpfulness)",
                        titles[name], diagonal=False) for name in titles if name in helpfulness]
    info = results["influence"]
    warnings = []
    if not info["cg_converged"]:
        warnings.append(f"CG stopped at {info['cg_iterations']} iterations with relative residual "
                        f"{info['cg_relative_residual']:.3g} > --cg-rtol {args.cg_rtol:g}: raise --cg-maxiter or --damping")
    if info["cg_negative_curvature"]:
        warnings.append(f"CG met negative curvature: use --curvature ggn or raise --damping above {args.damping:g}")
    report = Report(
        title=f"TracIn vs influence functions: MNIST test #{tp['index']}",
        test=Example(test_image, f"MNIST test #{tp['index']}",
                     [f"label {tp['label']}", f"predicted {tp['predicted']}", f"p(label) {tp['probability_of_label']:.3f}",
                      f"loss {tp['loss']:.4g}"]),
        groups=groups,
        scatters=scatters,
        scatter_caption="TracIn against the influence function's helpfulness −I_up,loss over all training points "
                        "(no retraining in this experiment).",
        solvers=[SolverEvidence(f"CG on {info['curvature']}", results["timings_seconds"]["influence_solve"],
                                [info["cg_iterations"]], [info["cg_relative_residual"]], True,
                                {"converged": info["cg_converged"], "negative curvature": info["cg_negative_curvature"]})],
        warnings=warnings,
        trustworthy=not warnings,
        settings=_jsonable(results["config"]),
        command=command_line("experiment", "tracin-mnist", args),
        summary=f"A {args.hidden}-unit MLP trained with SGD on {n:,} MNIST images ({args.epochs} epochs), "
                f"test accuracy {results['accuracy']['test']:.4f}.",
    )
    return write_report(report, Path(args.out) / "report.html")


def write_fastif_recall_report(
    args: argparse.Namespace, results: dict, w1: Any, scores: Any, test_indices: list[int], k: int = 10
) -> Path:
    """``args.out/report.html`` of ``experiment fastif-recall``: the first test point's top examples and the recall figure."""
    index = test_indices[0]
    s_test = results["s_test"]
    relative = s_test["relative_residuals"]
    warnings = [f"CG relative residual {max(relative):.3g} > --cg-rtol {args.cg_rtol:g}: CG stopped before converging"
                ] if relative is not None and max(relative) > args.cg_rtol else []
    report = report_from_scores(
        scores, w1.x_train, w1.x_test[index], test=0, k=k, train_labels=w1.y_train, test_label=int(w1.y_test[index]),
        test_prediction=int((w1.x_test[index] @ w1.fit.weights.T).argmax()), test_id=index, relative_residuals=relative,
        solver_name="CG on the Hessian", warnings=warnings, trustworthy=not warnings,
        title=f"FastIF recall: MNIST test #{index}", settings=_jsonable(results["config"]),
        command=command_line("experiment", "fastif-recall", args),
        figures=[("Recall@m of the kNN pre-selection", (Path(args.out) / "figure.png").read_bytes())],
    )
    report.summary = (f"Koh & Liang's logistic regression on {w1.objective.n_train:,} MNIST images (||grad R|| = "
                      f"{results['model']['gradient_norm']:.2g}); {len(test_indices)} test points, the first shown.")
    return write_report(report, Path(args.out) / "report.html")


def write_evaluate_report(config: Any, document: dict, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                          measured: Mapping[int, float], k: int = 10) -> Path:
    """``config.out/report.html`` of ``influencekit evaluate``: the method table and LDS plot, and the best method's
    top examples for the first test point, with the leave-one-out change where it was measured (``measured``)."""
    methods = document["methods"]
    best = max(methods, key=lambda name: methods[name]["lds"])
    influence = np.load(Path(config.out) / "scores" / f"{best}.npy")[0]
    x, y = train
    n = x.shape[0]
    rows = [SolverEvidence(name, r["seconds"], None, None, False,
                           {"LDS": r["lds"], "LDS 95% CI": r["lds_ci"], "LDS warm": r["lds_warm"],
                            "LOO Pearson": r["loo_pearson"], "mislabel AUC": r["mislabel_auc"]})
            for name, r in methods.items()]
    report = Report(
        title=f"Which method to trust: {document['workload']}",
        test=Example(test[0][0], "evaluation test point #0", [f"label {int(test[1][0])}"]),
        groups=influence_groups(influence, n, x, k=k, train_labels=y, actual_changes=dict(measured), noun="image",
                                what=f" (best LDS: {best})"),
        solvers=rows,
        figures=[("LDS of every method (95% bootstrap interval)", (Path(config.out) / "lds.png").read_bytes())],
        trustworthy=None,
        settings=_jsonable(document["config"]),
        command=command_line("evaluate", {**vars(config), "methods": config.methods}),
        summary=f"{len(methods)} methods on {n:,} training points; LDS over {config.num_subsets} subsets of "
                f"{config.fraction:g} of the data retrained from scratch. Best LDS: {best} "
                f"({methods[best]['lds']:.3f}). Output function: {document['output_function']}.",
    )
    return write_report(report, Path(config.out) / "report.html")


def write_fragility_report(config: Any, results: dict, test_image: Tensor) -> Path:
    """``config.out/report.html`` of ``experiment fragility``: the heat map, every cell's scatter and evidence."""
    cells = [c for c in results["cells"] if c.get("pearson") is not None]
    warnings = []
    for c in results["cells"]:
        cell = f"{c['model']}, weight decay {c['weight_decay']:g}"
        if "error" in c:
            warnings.append(f"{cell}: failed: {c['error']}")
        elif not c["at_optimum"]:
            warnings.append(f"{cell}: not at a verified optimum (||grad R|| = {c['grad_norm']:.2g}, {c['negative_eigenvalues']} "
                            f"negative eigenvalues); H + λI is positive definite for λ > {c['damping_needed']:.3g}, "
                            f"CG used damping {c['damping_used']:.3g}"
                            + ("; not retrained" if c.get("pearson") is None else ""))
    solvers = [
        SolverEvidence(f"CG, {c['model']}, wd {c['weight_decay']:g}", c["seconds_by_stage"]["cg"], [c["cg_iterations"]],
                       [c["cg_relative_residual"]], True,
                       {"R vs retraining": c["pearson"], "ρ vs retraining": c["spearman"], "damping used": c["damping_used"],
                        "damping needed": c["damping_needed"], "negative eigenvalues": c["negative_eigenvalues"],
                        "||grad R||": c["grad_norm"], "refits not converged": c["refits_not_converged"]})
        for c in cells
    ]
    cli = {**vars(config), "models": ",".join(config.models), "weight_decays": ",".join(f"{w:g}" for w in config.weight_decays),
           "no_progress": config.progress is False}
    report = Report(
        title="Fragility of influence: model depth × weight decay",
        test=Example(test_image, f"MNIST test #{results['test_index']}", [f"label {results['test_label']}"]),
        groups=[],
        scatters=[Scatter(f"{c['model']}, wd {c['weight_decay']:g}", np.asarray(c["actual"]), np.asarray(c["predicted"]),
                          "actual change in test loss (retrained)", "predicted, −(1/n) I_up,loss") for c in cells],
        scatter_caption=f"Predicted against actual leave-one-out change of the test loss for the {results['num_points']} "
                        "training points of largest |I_up,loss| in each cell, retrained on the true objective.",
        solvers=solvers,
        figures=[("Pearson R of CG influence against retraining", (Path(config.out) / "heatmap.png").read_bytes())],
        warnings=warnings,
        trustworthy=not warnings,
        settings=_jsonable(results["config"]),
        command=command_line("experiment", "fragility", cli),
        summary=f"{len(results['cells'])} cells on {results['sizes']['n_train']:,} MNIST training images: "
                + "; ".join(f"{m}: {s}" for m, s in results["sizes"]["models"].items()) + ".",
    )
    return write_report(report, Path(config.out) / "report.html")
