"""FastIF on Koh & Liang's MNIST logistic regression: recall@m of kNN pre-selection and its speed-up.

``influencekit experiment fastif-recall --data-dir DIR --out DIR``

The model (W1) is Koh & Liang's (2017): multinomial logistic regression without
bias on the 55,000 training images 5,000..59,999 of MNIST (pixels / 255),
objective mean cross-entropy + (0.01 / 2) ||W||^2, fitted in float64 by
Newton-CG to ||grad R|| <= 1e-10. s_test = H^{-1} grad L(z_test) is solved by
CG on the exact Hessian. For each test point:

* ground truth: I_up,loss of all n training points (:meth:`InfluenceFunction.scores`);
* FastIF: the k nearest training points by L2 distance between the inputs x
  (the features of a linear model), from an exact FAISS ``IndexFlatL2`` or
  (``--knn-index hnsw``) an approximate ``IndexHNSWFlat`` whose neighbour
  recall against the exact index is reported, scored exactly from the same
  s_test (:mod:`influencekit.scores.fastif`);
* recall@m of FastIF's top-m among the k candidates against the true top-m,
  for the most helpful (most negative I_up,loss), most harmful (most positive)
  and most influential (largest |I_up,loss|) points, averaged over test points;
* timings, from the prepared s_test, of the top-m search (all three rankings)
  with ``--speedup-k`` candidates against scoring all n points with the
  objective's full pass (``train_gradient_dots``, as
  :meth:`InfluenceFunction.scores` does); medians over ``--timing-repeats``
  runs per test point, then over test points. The kNN search time is reported
  separately and in a second speed-up. For the first test point, the same
  comparison with FastIF's generic per-example-gradient scoring on k and on n
  points (the cost model of a network, where gradients dominate);
* the same timed search with an approximate kNN index (``--timed-index``,
  default IVF with ``--ivf-nprobe`` 24 lists probed), the kNN search included,
  with the recall of the exact k nearest neighbours and FastIF's recall@m.

Outputs ``OUT/results.json`` and ``OUT/figure.png`` (recall against k, one
panel per ranking, one curve per m). ``--train-size`` restricts the training
set to its first N points (a different model) for quick runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from influencekit.curvature.hessian import HessianOperator
from influencekit.datasets.mnist import add_data_arguments, koh_liang_split, load_or_download_mnist
from influencekit.scores.fastif import (
    RECALL_KINDS,
    RecallTable,
    ScoringMethod,
    fastif_recall_table,
    fastif_top_m,
)
from influencekit.objectives.softmax_regression import SoftmaxFit, SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.reports.experiments import write_fastif_recall_report
from influencekit.scores.influence import InfluenceFunction, InfluenceScores
from influencekit.search import KNNCandidateSelector
from influencekit.solvers.base import SolveResult
from influencekit.solvers.cg import CGSolver

__all__ = ["KOH_LIANG_WEIGHT_DECAY", "W1", "configure", "default_test_indices", "fit_w1", "run"]

KOH_LIANG_WEIGHT_DECAY = 0.01
"""lambda of Koh & Liang's MNIST logistic regression: objective mean CE + (lambda/2)||W||^2."""


@dataclass(frozen=True)
class W1:
    """Koh & Liang's MNIST logistic regression, fitted, with its data (float64).

    Attributes:
        x_train, y_train: training inputs (n, 784) in [0, 1] and labels (n,).
        x_test, y_test: the 10,000 test inputs and labels.
        fit: the Newton-CG fit (weights W of shape (10, 784), final gradient norm, time).
        objective: the closed-form objective at W.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    fit: SoftmaxFit
    objective: SoftmaxRegressionObjective

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Fraction of rows of x whose arg-max logit is the label."""
        return float(((x @ self.fit.weights.T).argmax(dim=1) == y).double().mean())


def fit_w1(
    data_dir: str | os.PathLike[str] | None,
    train_size: int | None = None,
    weight_decay: float = KOH_LIANG_WEIGHT_DECAY,
    tol: float = 1e-10,
    *,
    download: bool = True,
) -> W1:
    """Load MNIST, take Koh & Liang's split and fit their logistic regression in float64.

    Args:
        data_dir: directory with the MNIST IDX files (see :func:`load_or_download_mnist`).
        train_size: use only the first ``train_size`` training points (None: all 55,000).
        weight_decay: lambda of the L2 term.
        tol: Newton-CG stops at ||grad R|| <= tol.
        download: download MNIST into the data directory if it is absent.
    """
    split = koh_liang_split(load_or_download_mnist(data_dir, torch.float64, download=download))
    n = split.x_train.shape[0] if train_size is None else train_size
    if not 1 <= n <= split.x_train.shape[0]:
        raise ValueError(f"train_size must lie in [1, {split.x_train.shape[0]}], got {train_size}")
    # compact copies: a view would drag the whole MNIST storage along when pickled (e.g. to Dask workers)
    x, y = split.x_train[:n].clone(), split.y_train[:n].clone()
    fit = fit_softmax_regression(x, y, weight_decay, num_classes=10, tol=tol)
    objective = SoftmaxRegressionObjective(fit.weights, x, y, weight_decay)
    return W1(x, y, split.x_test, split.y_test, fit, objective)


def default_test_indices(num_test: int, n_test: int = 10_000, seed: int = 0) -> list[int]:
    """Koh & Liang's test image 8 followed by ``num_test - 1`` other test indices drawn without replacement (seeded)."""
    if not 1 <= num_test <= n_test:
        raise ValueError(f"num_test must lie in [1, {n_test}], got {num_test}")
    others = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))
    return [8] + [int(i) for i in others if int(i) != 8][: num_test - 1]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options to ``parser``."""
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory for results.json and figure.png")
    parser.add_argument("--test-indices", type=_int_list, default=None, help="comma-separated test indices (default: 8 and --num-test - 1 seeded random others)")
    parser.add_argument("--num-test", type=int, default=10, help="number of test points when --test-indices is not given (default 10)")
    parser.add_argument("--train-size", type=int, default=None, help="use the first N training points only (default: all 55,000)")
    parser.add_argument("--ms", type=_int_list, default=[10, 100], help="top-m sizes of the recall table (default 10,100)")
    parser.add_argument("--ks", type=_int_list, default=[100, 1000, 10000], help="candidate counts k (default 100,1000,10000)")
    parser.add_argument("--speedup-k", type=int, default=1000, help="candidates of the timed FastIF search (default 1000)")
    parser.add_argument("--speedup-m", type=int, default=10, help="top-m of the timed search (default 10)")
    parser.add_argument("--timing-repeats", type=int, default=20, help="timed runs per test point; medians are reported (default 20)")
    parser.add_argument("--cg-rtol", type=float, default=1e-10, help="relative residual of the CG solve of s_test (default 1e-10)")
    parser.add_argument("--knn-index", choices=["flat", "hnsw"], default="flat",
                        help="kNN index over the inputs: exact IndexFlatL2 (default) or approximate IndexHNSWFlat "
                             "(its neighbour recall against the exact index is reported)")
    parser.add_argument("--timed-index", choices=["ivf", "hnsw", "none"], default="ivf",
                        help="also time the search with this approximate kNN index over the inputs, kNN search included "
                             "(default ivf; none: skip)")
    parser.add_argument("--ivf-nprobe", type=int, default=24,
                        help="IVF lists probed per query in the timed search (default 24 of 4 sqrt(n) lists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the default test indices")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _full_top_m(objective: SoftmaxRegressionObjective, s_test: Tensor, m: int) -> None:
    """Top-m helpful, harmful and |.| from I_up,loss of all n points via the objective's full pass."""
    influence = -objective.train_gradient_dots(s_test)
    torch.topk(influence, m, dim=1, largest=False)
    torch.topk(influence, m, dim=1, largest=True)
    torch.topk(influence.abs(), m, dim=1)


def time_speedup(
    w1: W1,
    scores: InfluenceScores,
    selector: KNNCandidateSelector,
    test_indices: list[int],
    k: int,
    m: int,
    repeats: int,
    progress: bool | None = None,
) -> dict[str, float | int]:
    """Median times (s) of the top-m search (all three rankings) per test point from a prepared s_test.

    Returns:
        Medians over ``repeats`` runs, then over test points:
        ``full_seconds`` (I_up,loss of all n points by the objective's full
        pass, as :meth:`InfluenceFunction.scores`), ``fastif_seconds``
        (:func:`fastif_top_m` on the k nearest candidates, default method),
        ``knn_seconds`` (the kNN search), ``speedup`` = full / fastif and
        ``speedup_including_knn`` = full / (fastif + knn). For the first test
        point only, the same search with FastIF's generic per-example-gradient
        method (``method="gradients"``) on k candidates and on all n points:
        ``gradients_k_seconds``, ``gradients_n_seconds``, ``speedup_gradients``.
    """
    if not 1 <= m <= k <= w1.objective.n_train:
        raise ValueError(f"need 1 <= m <= k <= n_train = {w1.objective.n_train}, got m = {m}, k = {k}")
    n = w1.objective.n_train
    per_point: dict[str, list[float]] = {"full": [], "fastif": [], "knn": []}
    generic: dict[str, float] = {}
    for j, index in enumerate(tqdm(test_indices, desc="timing", disable=None if progress is None else not progress)):
        s_test = scores.inverse_hvp.solution[j : j + 1]
        prepared = SolveResult(s_test, None, None, 0.0)
        query = w1.x_test[index : index + 1]
        test_batch = (query, w1.y_test[index : index + 1])
        candidates = selector.candidates(query, k)

        def search(cands: Tensor, method: ScoringMethod) -> None:
            fastif_top_m(w1.objective, None, test_batch, cands, m, inverse_hvp=prepared, method=method, progress=False)

        per_point["knn"].append(_median_seconds(lambda: selector.candidates(query, k), repeats))
        per_point["fastif"].append(_median_seconds(lambda: search(candidates, "auto"), repeats))
        per_point["full"].append(_median_seconds(lambda: _full_top_m(w1.objective, s_test, m), repeats))
        if j == 0:
            everyone = torch.arange(n).unsqueeze(0)
            generic["k"] = _median_seconds(lambda: search(candidates, "gradients"), repeats)
            generic["n"] = _median_seconds(lambda: search(everyone, "gradients"), repeats)
    med = {name: statistics.median(values) for name, values in per_point.items()}
    return {
        "k": k,
        "m": m,
        "n_train": n,
        "repeats": repeats,
        "full_seconds": med["full"],
        "fastif_seconds": med["fastif"],
        "knn_seconds": med["knn"],
        "speedup": med["full"] / med["fastif"],
        "speedup_including_knn": med["full"] / (med["fastif"] + med["knn"]),
        "gradients_k_seconds": generic["k"],
        "gradients_n_seconds": generic["n"],
        "speedup_gradients": generic["n"] / generic["k"],
    }


def recall_figure(table: RecallTable, n_train: int, path: Path) -> None:
    """Mean recall@m against k (log scale), one panel per ranking, one curve per m, min-max band over test points.

    The dashed line k/n is the expected recall of k random candidates.
    """
    fig = Figure(figsize=(4.2 * len(RECALL_KINDS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(RECALL_KINDS), sharey=True)
    ks = np.array(table.ks)
    for a, (ax, kind) in enumerate(zip(axes, RECALL_KINDS)):
        for i, m in enumerate(table.ms):
            per_test = table.recall[a, i].numpy()  # (len(ks), m_test)
            line = ax.plot(ks, per_test.mean(axis=1), marker="o", label=f"m = {m}")[0]
            ax.fill_between(ks, per_test.min(axis=1), per_test.max(axis=1), color=line.get_color(), alpha=0.15)
        ax.plot(ks, ks / n_train, linestyle="--", color="grey", label="random k (k/n)")
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel(f"k (kNN candidates of n = {n_train:,})")
        ax.set_title(f"most {kind}" if kind != "influential" else "most influential (|I|)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@m")
    axes[-1].legend(loc="lower right")
    fig.suptitle(f"FastIF kNN pre-selection on MNIST logistic regression ({table.recall.shape[-1]} test points)")
    fig.savefig(path, dpi=120)


def timed_approximate_search(
    w1: W1,
    scores: InfluenceScores,
    solver: CGSolver,
    exact: KNNCandidateSelector,
    test_batch: tuple[Tensor, Tensor],
    test_indices: list[int],
    args: argparse.Namespace,
    progress: bool | None,
) -> dict[str, object]:
    """The timed top-m search with the approximate ``--timed-index``: speed-up with the kNN search, and what it costs.

    Returns the index settings and build time, the recall of the exact k nearest
    neighbours (against the flat selector ``exact``), :func:`time_speedup`'s medians and FastIF's recall@m (per ranking,
    mean over test points) with these candidates, for k = ``--speedup-k`` and
    m = ``--speedup-m``.
    """
    k, m = args.speedup_k, args.speedup_m
    options = {"nprobe": args.ivf_nprobe} if args.timed_index == "ivf" else {}
    selector = KNNCandidateSelector(w1.x_train, args.timed_index, **options)
    neighbour_recall = selector.recall_vs(exact, test_batch[0], k)
    speed = time_speedup(w1, scores, selector, test_indices, k, m, args.timing_repeats, progress)
    table = fastif_recall_table(w1.objective, solver, test_batch, selector, test_batch[0], (m,), (k,), scores=scores, progress=progress)
    recall = {kind: float(table.mean()[a, 0, 0]) for a, kind in enumerate(RECALL_KINDS)}
    settings = {"nlist": selector.nlist, "nprobe": selector.nprobe} if args.timed_index == "ivf" else {"ef_search": selector.ef_search}
    print(
        f"with the {args.timed_index} index ({', '.join(f'{key} {value}' for key, value in settings.items())}): kNN "
        f"{speed['knn_seconds'] * 1e3:.2f} ms + search {speed['fastif_seconds'] * 1e3:.2f} ms vs {speed['full_seconds'] * 1e3:.2f} ms: "
        f"speed-up {speed['speedup_including_knn']:.1f}x including the kNN search; it finds {neighbour_recall:.3f} of the exact "
        f"{k} nearest; recall@{m} " + ", ".join(f"{kind} {value:.3f}" for kind, value in recall.items()),
        flush=True,
    )
    return {"kind": args.timed_index, **settings, "build_seconds": selector.build_seconds,
            "neighbour_recall": neighbour_recall, "recall_at_m": recall, **speed}


def run(args: argparse.Namespace) -> int:
    """Fit W1, compute the recall table and the speed-up, write results.json and figure.png."""
    progress = None if not args.no_progress else False
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("fitting the logistic regression (Newton-CG, float64) ...", flush=True)
    w1 = fit_w1(args.data_dir, args.train_size, download=not args.no_download)
    n = w1.objective.n_train
    test_indices = args.test_indices if args.test_indices is not None else default_test_indices(args.num_test, seed=args.seed)
    if not all(0 <= i < w1.x_test.shape[0] for i in test_indices):
        raise ValueError(f"test indices must lie in [0, {w1.x_test.shape[0]}), got {test_indices}")
    test_batch = (w1.x_test[test_indices], w1.y_test[test_indices])
    print(f"fitted in {w1.fit.seconds:.1f} s (||grad R|| = {w1.fit.gradient_norm:.2e}); solving s_test and scoring all {n:,} points ...", flush=True)

    solver = CGSolver(HessianOperator(w1.objective), rtol=args.cg_rtol, maxiter=2000)
    begin = time.perf_counter()
    scores = InfluenceFunction(w1.objective, solver).scores(test_batch)
    full_seconds = time.perf_counter() - begin
    selector = KNNCandidateSelector(w1.x_train, args.knn_index)
    knn_index = {"kind": args.knn_index, "features": "inputs x (784)", "build_seconds": selector.build_seconds}
    exact = selector if args.knn_index == "flat" else KNNCandidateSelector(w1.x_train)
    if args.knn_index != "flat":
        knn_index["neighbour_recall_vs_flat"] = {
            str(k): selector.recall_vs(exact, test_batch[0], k) for k in sorted({*args.ks, args.speedup_k})
        }
        print(f"{args.knn_index} index built in {selector.build_seconds:.1f} s; recall of the k nearest against the exact "
              f"index: " + ", ".join(f"k = {k}: {r:.3f}" for k, r in knn_index["neighbour_recall_vs_flat"].items()), flush=True)
    table = fastif_recall_table(
        w1.objective, solver, test_batch, selector, test_batch[0], args.ms, args.ks, scores=scores, progress=progress
    )
    print(table.format(), flush=True)
    speedup = time_speedup(w1, scores, selector, test_indices, args.speedup_k, args.speedup_m, args.timing_repeats, progress)
    print(
        f"top-{args.speedup_m} search with k = {args.speedup_k}: {speedup['fastif_seconds'] * 1e3:.2f} ms vs "
        f"{speedup['full_seconds'] * 1e3:.2f} ms for all {n:,} points: speed-up {speedup['speedup']:.1f}x "
        f"({speedup['speedup_including_knn']:.1f}x including the kNN search)",
        flush=True,
    )

    approximate = None
    if args.timed_index != "none":
        approximate = timed_approximate_search(w1, scores, solver, exact, test_batch, test_indices, args, progress)

    solve = scores.inverse_hvp
    relative = solve.relative_residuals(w1.objective.measurement_gradients(test_batch))
    results = {
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key != "module"},
        "model": {
            "n_train": n,
            "weight_decay": w1.objective.weight_decay,
            "gradient_norm": w1.fit.gradient_norm,
            "newton_steps": w1.fit.newton_steps,
            "fit_seconds": w1.fit.seconds,
            "train_accuracy": w1.accuracy(w1.x_train, w1.y_train),
            "test_accuracy": w1.accuracy(w1.x_test, w1.y_test),
        },
        "test_indices": test_indices,
        "s_test": {
            "solver": "cg",
            "rtol": args.cg_rtol,
            "iterations": solve.iterations.tolist(),
            "relative_residuals": relative.tolist() if relative is not None else None,
            "solve_and_full_scoring_seconds": full_seconds,
        },
        "knn_index": knn_index,
        "recall": table.as_dict(),
        "speedup": speedup,
        "speedup_approximate": approximate,
        "seconds_total": time.perf_counter() - start,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    recall_figure(table, n, args.out / "figure.png")
    write_fastif_recall_report(args, results, w1, scores, test_indices)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'figure.png'} and {args.out / 'report.html'}")
    return 0
