"""TracIn vs influence functions on an MLP trained with plain SGD on MNIST.

``influencekit experiment tracin-mnist --data-dir DIR --out DIR``

Set-up: a 784-128-10 tanh MLP (float64) is trained with plain SGD (fixed
learning rate, shuffled mini-batches, no momentum) on a seeded random subset
of ``--train-size`` points of Koh & Liang's training split (images
5,000..59,999), minimising R(theta) = mean cross-entropy + (lambda/2)||theta||^2
over all parameters (lambda = ``--weight-decay``, so that an influence function
is defined). The parameters are saved after every epoch
(``OUT/checkpoints/epoch_XX.safetensors``, the learning rate in the file's
metadata).

For one test point (default: Koh & Liang's test image 8) the training points
are scored by

* TracInCP over the epoch checkpoints, sum_c eta_c <grad l(w_c, z_test),
  grad l(w_c, z_i)> with l the cross-entropy: on the last layer ``fc2``
  (:class:`LastLayerTracIn`) and, unless ``--skip-full-tracin``, over all
  parameters (:class:`TracInCP`). Positive = proponent (helpful);
* the influence function at the final parameters, I_up,loss = -g_test^T
  (G + damping I)^{-1} g_i with G the generalised Gauss-Newton matrix of R
  (positive semi-definite although SGD stops short of a minimum; or the
  Hessian with ``--curvature hessian``), solved by CG. It is compared through
  -I_up,loss, positive = helpful, the orientation of TracIn.

Outputs ``OUT/results.json`` (accuracies, the test point, Pearson and
Spearman correlations between the scores, top-k overlaps of proponents and
opponents, the top-k lists, the CG solve, timings) and ``OUT/figure.png`` (the
test image and the top-k proponents and opponents of each method, with labels
and scores).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import save_file
from scipy.stats import pearsonr, spearmanr
from torch import Tensor, nn
from tqdm.auto import tqdm

from influencekit.curvature.base import CurvatureOperator
from influencekit.curvature.ggn import GaussNewtonOperator
from influencekit.curvature.hessian import HessianOperator
from influencekit.data import Batch
from influencekit.datasets.mnist import add_data_arguments, koh_liang_split, load_or_download_mnist
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.persistence import atomic_write
from influencekit.reports.experiments import write_tracin_mnist_report
from influencekit.scores.influence import InfluenceFunction
from influencekit.search import recall_at_k
from influencekit.solvers.cg import CGSolver
from influencekit.tracin import LastLayerTracIn, TracInCP

__all__ = ["MLP", "CheckpointRecord", "configure", "cross_entropy_losses", "run", "tracin_scores", "train_sgd"]


class MLP(nn.Module):
    """784 -> hidden (tanh) -> 10 logits; ``fc2`` is the last linear layer."""

    def __init__(self, hidden: int = 128, inputs: int = 784, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, classes) of inputs x (B, inputs)."""
        return self.fc2(self.act(self.fc1(x)))


@dataclass(frozen=True)
class CheckpointRecord:
    """A saved checkpoint: the parameters after ``epoch`` epochs and the learning rate that produced them."""

    epoch: int
    path: Path
    learning_rate: float


def cross_entropy_losses(model_call: Callable[..., Tensor], batch: Batch) -> Tensor:
    """TracIn loss: per-example cross-entropy (B,) of a batch ``(x, y)``, without the L2 term."""
    x, y = batch
    return F.cross_entropy(model_call(x), y, reduction="none")


def _l2(model: nn.Module) -> Tensor:
    return sum((p * p).sum() for p in model.parameters())  # type: ignore[return-value]


def train_sgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    checkpoint_dir: Path,
    progress: bool | None = None,
) -> list[CheckpointRecord]:
    """Plain SGD on mean CE + (weight_decay/2)||theta||^2, saving a safetensors checkpoint after each epoch.

    Each epoch visits a fresh seeded permutation of the n training points in
    mini-batches of ``batch_size`` (the last one smaller); each step is
    theta <- theta - learning_rate * grad of the mini-batch objective.

    Returns:
        One :class:`CheckpointRecord` per epoch, in order.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.0, weight_decay=0.0)
    records = []
    n = x.shape[0]
    steps = epochs * -(-n // batch_size)
    with tqdm(total=steps, desc="SGD", unit="step", disable=None if progress is None else not progress) as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                loss = F.cross_entropy(model(x[rows]), y[rows]) + 0.5 * weight_decay * _l2(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, refresh=False)
            path = checkpoint_dir / f"epoch_{epoch:02d}.safetensors"
            state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
            save_file(state, str(path), metadata={"epoch": str(epoch), "learning_rate": repr(learning_rate)})
            records.append(CheckpointRecord(epoch, path, learning_rate))
    return records


def tracin_scores(
    make_scorer: Callable[[list[Path], list[float]], LastLayerTracIn | TracInCP],
    checkpoints: Sequence[CheckpointRecord],
    test_batch: Batch,
    train_batch: Batch,
    desc: str,
    progress: bool | None = None,
) -> Tensor:
    """TracInCP scores (n_test, n_train), one checkpoint at a time (a progress step each).

    ``make_scorer(paths, learning_rates)`` builds the scorer; the sum over
    checkpoints of single-checkpoint scores is the multi-checkpoint score
    sum_c eta_c <grad l(w_c, z), grad l(w_c, z')>.
    """
    total: Tensor | None = None
    for record in tqdm(checkpoints, desc=desc, unit="checkpoint", disable=None if progress is None else not progress):
        scores = make_scorer([record.path], [record.learning_rate]).scores(test_batch, train_batch)
        total = scores if total is None else total + scores
    assert total is not None, "at least one checkpoint"
    return total


class _ProgressOperator(CurvatureOperator):
    """A curvature operator that advances a tqdm bar on every product (to follow CG)."""

    def __init__(self, inner: CurvatureOperator, bar: tqdm):
        self.inner, self.bar = inner, bar
        self.dim, self.dtype = inner.dim, inner.dtype

    def matvec(self, vectors: Tensor) -> Tensor:
        out = self.inner.matvec(vectors)
        self.bar.update(1)
        return out


def _correlation(a: Tensor, b: Tensor) -> dict[str, float]:
    x, y = a.double().numpy(), b.double().numpy()
    return {"pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0])}


def _top(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Positions of the k largest (proponents) and k smallest (opponents) of a 1-D helpfulness score."""
    return torch.topk(scores, k).indices, torch.topk(scores, k, largest=False).indices


def _listing(positions: Tensor, scores: Tensor, split_indices: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    return [
        {"train_index": int(split_indices[i]), "label": int(labels[i]), "score": float(scores[i])}
        for i in positions.tolist()
    ]


def _figure(
    path: Path,
    test_image: Tensor,
    test_title: str,
    rows: list[tuple[str, Tensor, Tensor]],
    images: Tensor,
    labels: Tensor,
    split_indices: Tensor,
) -> None:
    """The test image, and one row of k training images per (name, positions, scores) entry."""
    k = len(rows[0][1])
    fig = Figure(figsize=(1.25 * (k + 1.6), 1.45 * len(rows) + 0.4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.6, k])
    ax = left.subplots()
    ax.imshow(test_image.reshape(28, 28).numpy(), cmap="gray_r")
    ax.set_title(test_title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    grid = right.subplots(len(rows), k, squeeze=False)
    for r, (name, positions, scores) in enumerate(rows):
        for c, i in enumerate(positions.tolist()):
            cell = grid[r, c]
            cell.imshow(images[i].reshape(28, 28).numpy(), cmap="gray_r")
            cell.set_title(f"#{int(split_indices[i])} y={int(labels[i])}\n{float(scores[i]):+.3g}", fontsize=6)
            cell.set_xticks([])
            cell.set_yticks([])
        grid[r, 0].set_ylabel(name, fontsize=7)
    fig.savefig(path, dpi=110)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the experiment's options to ``parser``."""
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (results.json, figure.png, checkpoints/)")
    parser.add_argument("--train-size", type=int, default=10_000, help="random subset of Koh & Liang's 55,000 training points (default 10000)")
    parser.add_argument("--epochs", type=int, default=5, help="SGD epochs, one checkpoint each (default 5)")
    parser.add_argument("--test-index", type=int, default=8, help="MNIST test image to explain (default 8)")
    parser.add_argument("--k", type=int, default=10, help="proponents and opponents shown and compared (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, the initialisation and the shuffling")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="fixed SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="SGD mini-batch size (default 32)")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="lambda of (lambda/2)||theta||^2 in the loss (default 1e-3)")
    parser.add_argument("--curvature", choices=("ggn", "hessian"), default="ggn", help="curvature of the influence function (default ggn)")
    parser.add_argument("--damping", type=float, default=0.01, help="added to the curvature (default 0.01)")
    parser.add_argument("--cg-rtol", type=float, default=1e-6, help="CG relative residual tolerance (default 1e-6)")
    parser.add_argument("--cg-maxiter", type=int, default=300, help="CG iteration cap (default 300)")
    parser.add_argument("--skip-full-tracin", action="store_true", help="only the last-layer TracIn, not TracInCP over all parameters")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Train, score with TracIn and the influence function, write results.json, figure.png and report.html."""
    progress = False if args.no_progress else None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    x, y, subset, test_batch, x_test, y_test = _load_subset(args, progress)
    timings: dict[str, float] = {}
    model, checkpoints, model_info = _train(args, x, y, x_test, y_test, test_batch, timings, progress)
    helpfulness = _tracin_helpfulness(args, model, checkpoints, test_batch, (x, y), timings, progress)
    helpfulness["influence"], influence_info, test_loss = _influence_helpfulness(args, model, x, y, test_batch, timings, progress)

    names = list(helpfulness)
    tops = {name: _top(helpfulness[name], args.k) for name in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    results = {
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items() if key != "module"},
        "sign_convention": "scores are helpfulness: TracIn score and -I_up,loss; positive = proponent (helpful)",
        "accuracy": model_info["accuracy"],
        "test_point": {**model_info["test_point"], "index": args.test_index, "loss": test_loss},
        "influence": influence_info,
        "correlation": {f"{a}_vs_{b}": _correlation(helpfulness[a], helpfulness[b]) for a, b in pairs},
        "top_k_overlap": {
            f"{a}_vs_{b}": {
                "proponents": float(recall_at_k(tops[a][0], tops[b][0])),
                "opponents": float(recall_at_k(tops[a][1], tops[b][1])),
            }
            for a, b in pairs
        },
        "top_k": {
            name: {
                "proponents": _listing(tops[name][0], helpfulness[name], subset, y),
                "opponents": _listing(tops[name][1], helpfulness[name], subset, y),
            }
            for name in names
        },
        "timings_seconds": timings,
        "checkpoints": [
            {"epoch": r.epoch, "path": str(r.path.relative_to(out)), "learning_rate": r.learning_rate} for r in checkpoints
        ],
        "train_indices": subset.tolist(),
    }
    atomic_write(out / "results.json", json.dumps(results, indent=2))

    titles = {"tracin_last_layer": "TracIn fc2", "tracin_full": "TracIn all", "influence": "IF (-I_up,loss)"}
    rows = [
        (f"{titles[name]}\n{kind}", tops[name][i], helpfulness[name])
        for name in names
        for i, kind in enumerate(("proponents", "opponents"))
    ]
    point = results["test_point"]
    test_title = (
        f"test #{args.test_index}\nlabel {point['label']}, predicted {point['predicted']}\n"
        f"p(label) = {point['probability_of_label']:.3f}"
    )
    _figure(out / "figure.png", test_batch[0][0], test_title, rows, x, y, subset)
    write_tracin_mnist_report(args, results, helpfulness, (x, y), subset, test_batch[0][0])
    for pair, values in results["correlation"].items():
        print(f"{pair}: Pearson {values['pearson']:.3f}, Spearman {values['spearman']:.3f}")
    print(f"wrote {out / 'results.json'}, {out / 'figure.png'} and {out / 'report.html'}")
    return 0


def _load_subset(args: argparse.Namespace, progress: bool | None):
    """The seeded training subset of Koh & Liang's split (x, y, its MNIST positions) and the test point."""
    split = koh_liang_split(load_or_download_mnist(args.data_dir, torch.float64, download=not args.no_download, progress=progress))
    n_split = split.x_train.shape[0]
    if not 1 <= args.train_size <= n_split:
        raise ValueError(f"--train-size must lie in [1, {n_split}], got {args.train_size}")
    if not 0 <= args.test_index < split.x_test.shape[0]:
        raise ValueError(f"--test-index must lie in [0, {split.x_test.shape[0]}), got {args.test_index}")
    if not 1 <= args.k <= args.train_size:
        raise ValueError(f"--k must lie in [1, --train-size], got {args.k}")
    generator = torch.Generator().manual_seed(args.seed)
    subset = torch.randperm(n_split, generator=generator)[: args.train_size].sort().values
    test_batch = (split.x_test[args.test_index : args.test_index + 1], split.y_test[args.test_index : args.test_index + 1])
    return split.x_train[subset], split.y_train[subset], subset, test_batch, split.x_test, split.y_test


def _train(args, x, y, x_test, y_test, test_batch, timings: dict[str, float], progress: bool | None):
    """SGD with a checkpoint per epoch; the model in eval mode, its checkpoints, accuracies and the test prediction."""
    torch.manual_seed(args.seed)
    model = MLP(args.hidden).double()
    start = time.perf_counter()
    checkpoints = train_sgd(
        model, x, y, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        weight_decay=args.weight_decay, seed=args.seed, checkpoint_dir=args.out / "checkpoints", progress=progress,
    )  # fmt: skip
    timings["training"] = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_accuracy = float((model(x).argmax(1) == y).double().mean())
        test_accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
        test_logits = model(test_batch[0])[0]
    label = int(test_batch[1][0])
    info = {
        "accuracy": {"train": train_accuracy, "test": test_accuracy},
        "test_point": {"label": label, "predicted": int(test_logits.argmax()),
                       "probability_of_label": float(torch.softmax(test_logits, 0)[label])},
    }
    return model, checkpoints, info


def _tracin_helpfulness(args, model, checkpoints, test_batch, train, timings: dict[str, float],
                        progress: bool | None) -> dict[str, Tensor]:
    """TracIn scores of every training point (positive = proponent): last layer, and all parameters unless skipped."""
    helpfulness: dict[str, Tensor] = {}
    start = time.perf_counter()
    helpfulness["tracin_last_layer"] = tracin_scores(
        lambda paths, rates: LastLayerTracIn(model, paths, rates, cross_entropy_losses, layer="fc2", chunk_size=1024),
        checkpoints, test_batch, train, "TracIn (fc2)", progress,
    )[0]  # fmt: skip
    timings["tracin_last_layer"] = time.perf_counter() - start
    if not args.skip_full_tracin:
        start = time.perf_counter()
        helpfulness["tracin_full"] = tracin_scores(
            lambda paths, rates: TracInCP(model, paths, rates, cross_entropy_losses, chunk_size=256),
            checkpoints, test_batch, train, "TracIn (all params)", progress,
        )[0]  # fmt: skip
        timings["tracin_full"] = time.perf_counter() - start
    return helpfulness


def _influence_helpfulness(args, model, x, y, test_batch, timings: dict[str, float], progress: bool | None):
    """-I_up,loss at the final parameters (positive for helpful points), the CG solve's evidence and the test loss."""
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=args.weight_decay)
    curvature = GaussNewtonOperator(objective) if args.curvature == "ggn" else HessianOperator(objective)
    start = time.perf_counter()
    with tqdm(desc=f"CG on {args.curvature}", unit="product", disable=None if progress is None else not progress) as bar:
        solver = CGSolver(_ProgressOperator(curvature, bar), damping=args.damping, rtol=args.cg_rtol, maxiter=args.cg_maxiter)
        # the result records cg_converged / cg_negative_curvature, so an unconverged solve only warns
        scores = InfluenceFunction(objective, solver, allow_unconverged=True).scores(test_batch)
    timings["influence_total"] = time.perf_counter() - start
    timings["influence_solve"] = scores.inverse_hvp.seconds
    solve = scores.inverse_hvp
    relative_residual = solve.relative_residuals(objective.measurement_gradients(test_batch))
    info = {
        "curvature": args.curvature,
        "damping": args.damping,
        "weight_decay": args.weight_decay,
        "cg_iterations": int(solve.iterations[0]),
        "cg_relative_residual": float(relative_residual[0]) if relative_residual is not None else None,
        "cg_converged": bool(solve.info["converged"][0]),
        "cg_negative_curvature": bool(solve.info["negative_curvature"][0]),
    }
    return -scores.influence_on_loss[0], info, float(scores.test_measurements[0])
