"""``influencekit evaluate``: every attribution method on one workload, at the field's standard.

(Network workloads, ``mnist-mlp`` and ``mnist-cnn``: :mod:`influencekit.experiments.evaluate_network`.)

Workload ``mnist-lr`` (dattri's MNIST-10 logistic regression): softmax regression
W (10 x 784, no bias, 7,840 parameters), R(W) = mean CE + (lambda/2)||W||^2,
lambda = 0.01, float64, fitted to ||grad R|| <= 1e-10 on the first ``train_size``
training images of Koh & Liang's split (images 5,000..); test points: the first
``test_size`` official test images.

For each method the run reports

* **LDS** (:mod:`influencekit.evaluation.lds`): ``num_subsets`` random subsets of
  fraction ``fraction`` (seeded), each retrained *from scratch* from its own random
  start (the protocol of TRAK and dattri); output = test cross-entropy. The loss is
  the output because it is what the model minimises and what influence functions
  linearise (I_up,loss), and it is the output of the independent check
  (LDS 0.98 for exact influence at lambda = 0.01). A second column ``lds_warm``
  uses the same subsets warm-started from W_hat: the objective is strictly convex,
  so both reach the same optimum (to the tolerance) and the columns agree;
  ``retrain.max_weight_difference`` shows by how much.
* **LOO correlation** (:mod:`influencekit.evaluation.loo`): ``loo_points`` random
  training points, each removed and refitted exactly (Newton with the full Hessian's
  Cholesky factor, :mod:`influencekit.validation.leave_one_out`); mean over test
  points of the Pearson correlation with the predicted removal effect.
* **mislabel detection** (:mod:`influencekit.evaluation.mislabel`): 10% of the
  training labels flipped, a model fitted on them, points ranked by self-influence
  g_i^T H^{-1} g_i (TracIn: ||g_i||^2); beside the baseline ranking by training loss.
  Methods whose self-influence needs n iterative solves (CG, block CG, LiSSA) are
  skipped there (``mislabel_auc: null``; the converged CG answer equals exact).
* **seconds / peak_mb**: building the method and scoring the test points (peak
  resident memory above the level before, sampled at 20 Hz).

Hyperparameters (damping, rank, ...) are chosen per method on held-out data:
``val_subsets`` other subsets (another seed) and ``val_test_size`` validation
images (Koh & Liang's validation images 0..4,999, disjoint from training and
test), by LDS; never on the evaluation subsets. Grids and choices are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from influencekit.curvature import HessianOperator
from influencekit.persistence import atomic_write
from influencekit.reports.experiments import write_evaluate_report
from influencekit.evaluation import linear_datamodeling_score, leave_one_out_correlation, mislabel_detection, flip_labels, subset_masks, subset_outputs
from influencekit.scores.influence import InfluenceFunction
from influencekit.objectives.softmax_batch import SoftmaxSubsetTrainer, fit_softmax_regression_subsets
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.solvers import (
    ArnoldiSolver,
    BlockCGSolver,
    CGSolver,
    DataInfSolver,
    DirectSolver,
    KFACSolver,
    LiSSASolver,
    NystromSketchSolver,
)
from influencekit.validation.leave_one_out import SoftmaxRefitProblem, refit_leave_one_out, softmax_test_losses

WORKLOADS = ("mnist-lr", "mnist-mlp", "mnist-cnn")  # the last two: evaluate_network.WORKLOADS
NUM_CLASSES = 10


@dataclass
class EvaluateConfig:
    """Settings of one evaluation run (defaults: dattri's MNIST-10 logistic regression)."""

    out: Path
    workload: str = "mnist-lr"
    data_dir: Path | None = None
    methods: list[str] | None = None
    train_size: int = 5000
    downsample: int = 1
    test_size: int = 500
    num_subsets: int = 50
    fraction: float = 0.5
    val_subsets: int = 10
    val_test_size: int = 100
    weight_decay: float = 0.01
    tol: float = 1e-10
    loo_points: int = 100
    mislabel_fraction: float = 0.1
    ensemble_size: int | None = None  # None: the workload's (mnist-lr 3; network workloads, see evaluate_network)
    lissa_depth: int = 1000
    lissa_batch_size: int = 50
    n_bootstrap: int = 1000
    seed: int = 0
    workers: int = 2
    scheduler: str | None = None
    retrain_batch_size: int | None = None  # subsets per retraining task; None: the workload's (mnist-lr 10)
    epochs: int | None = None  # network workloads: SGD epochs (None: the workload's, 50 for mnist-mlp, 30 for mnist-cnn)
    warm_epochs: int = 10  # network workloads: epochs of the warm-started retraining (0: skip it)
    progress: bool = False


def with_workload_defaults(config: EvaluateConfig, *, ensemble_size: int, retrain_batch_size: int) -> EvaluateConfig:
    """``config`` with the workload-dependent settings it leaves unset (None) filled in."""
    return dataclasses.replace(
        config,
        ensemble_size=ensemble_size if config.ensemble_size is None else config.ensemble_size,
        retrain_batch_size=retrain_batch_size if config.retrain_batch_size is None else config.retrain_batch_size,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- one fitted model and what the methods need of it ------------------------------------
@dataclass
class FittedModel:
    """A softmax regression at its optimum, with its closed-form objective and (lazily) its exact Hessian."""

    x: torch.Tensor
    y: torch.Tensor
    weight_decay: float
    weights: torch.Tensor
    objective: SoftmaxRegressionObjective = field(init=False)
    _direct: DirectSolver | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.objective = SoftmaxRegressionObjective(self.weights, self.x, self.y, self.weight_decay)

    @property
    def n(self) -> int:
        return len(self.y)

    def direct(self) -> DirectSolver:
        """Cholesky factor of the explicit Hessian (computed once; it proves positive definiteness)."""
        if self._direct is None:
            self._direct = DirectSolver(self.objective.hessian())
        return self._direct

    def curvature(self) -> HessianOperator:
        return HessianOperator(self.objective)

    def torch_objective(self):
        from influencekit.objectives.torch_objective import TorchObjective

        model = torch.nn.Linear(self.x.shape[1], NUM_CLASSES, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(self.weights)
        return TorchObjective(model, "cross_entropy", (self.x, self.y), weight_decay=self.weight_decay)


class Scorer:
    """Scores of one method on one model: ``scores(tests)`` (m, n) = effect of including each training
    point on each test loss (I_up,loss for influence functions), ``self_scores()`` (n,) = suspicion."""

    def scores(self, tests: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        raise NotImplementedError

    def self_scores(self) -> np.ndarray:
        raise NotImplementedError


class InfluenceScorer(Scorer):
    def __init__(self, model: FittedModel, solver: Any):
        self.model, self.solver = model, solver
        self.function = InfluenceFunction(model.objective, solver)

    def scores(self, tests):
        return self.function.scores(tests).influence_on_loss.numpy()

    def self_scores(self):
        self.solver.measure_residuals = False  # residuals of n right-hand sides would cost n Hessian products
        return (-self.function.self_influence(torch.arange(self.model.n))).numpy()


class TracInScorer(Scorer):
    """TracInCP with one checkpoint, the optimum W_hat, learning rate 1: <grad l(z_test), grad l(z_i)>."""

    def __init__(self, model: FittedModel):
        from influencekit.tracin import TracInCP

        self.model = model
        net = torch.nn.Linear(model.x.shape[1], NUM_CLASSES, bias=False).double().eval()

        def loss_fn(model_call, batch):
            return torch.nn.functional.cross_entropy(model_call(batch[0]), batch[1], reduction="none")

        self.tracin = TracInCP(net, [{"weight": model.weights}], [1.0], loss_fn, chunk_size=1000)

    def scores(self, tests):
        return -self.tracin.scores(tests, (self.model.x, self.model.y)).numpy()  # TracIn > 0 lowers the loss

    def self_scores(self):
        return self.tracin.self_influence((self.model.x, self.model.y)).numpy()


class EnsembleScorer(Scorer):
    """Mean of the scores of one method over models trained independently (each from its own random start)."""

    def __init__(self, members: list[Scorer]):
        self.members = members

    def scores(self, tests):
        return np.mean([m.scores(tests) for m in self.members], axis=0)

    def self_scores(self):
        return np.mean([m.self_scores() for m in self.members], axis=0)


@dataclass
class Method:
    """A method: hyperparameter grid (tuned on held-out data), builder, and whether n self-influence solves are affordable."""

    grid: list[dict[str, Any]]
    build: Callable[[FittedModel, dict[str, Any], "EvaluateConfig"], Scorer]
    self_influence: bool = True


def _influence(make_solver: Callable[[FittedModel, dict, EvaluateConfig], Any]):
    return lambda model, setting, config: InfluenceScorer(model, make_solver(model, setting, config))


def _exact(model, setting, config):
    return model.direct() if setting["damping"] == 0 else DirectSolver(model.direct().matrix, damping=setting["damping"])


METHODS: dict[str, Method] = {
    "exact": Method([{"damping": 0.0}], _influence(_exact)),
    "cg": Method([{"damping": 0.0, "rtol": 1e-8}], _influence(
        lambda m, s, c: CGSolver(m.curvature(), damping=s["damping"], rtol=s["rtol"], maxiter=2000)), False),
    "block-cg": Method([{"damping": 0.0, "rtol": 1e-8}], _influence(
        lambda m, s, c: BlockCGSolver(m.curvature(), damping=s["damping"], rtol=s["rtol"], maxiter=2000)), False),
    "lissa": Method([{"damping": d} for d in (0.0, 0.01)], _influence(
        lambda m, s, c: LiSSASolver(m.curvature(), scale="auto", damping=s["damping"], depth=c.lissa_depth, repeats=1,
                              batch_size=c.lissa_batch_size, seed=c.seed, progress=False)), False),
    "arnoldi": Method([{"rank": r, "damping": d} for r in (20, 100) for d in (1e-3, 1e-2)], _influence(
        lambda m, s, c: ArnoldiSolver(m.curvature(), rank=s["rank"], damping=s["damping"], seed=c.seed))),
    "nystrom": Method([{"rank": r, "damping": d} for r in (20, 100) for d in (1e-3, 1e-2)], _influence(
        lambda m, s, c: NystromSketchSolver(m.curvature(), rank=s["rank"], damping=s["damping"], seed=c.seed))),
    "kfac": Method([{"damping": d} for d in (0.0, 1e-3, 1e-2)], _influence(
        lambda m, s, c: KFACSolver(m.torch_objective(), damping=s["damping"]))),
    "ekfac": Method([{"damping": d} for d in (0.0, 1e-3, 1e-2)], _influence(
        lambda m, s, c: KFACSolver(m.torch_objective(), damping=s["damping"], eigenvalue_correction=True))),
    "datainf": Method([{"damping": d} for d in (None, 1e-2, 1e-1)], _influence(
        lambda m, s, c: DataInfSolver(m.objective, damping=s["damping"], include_weight_decay=True, measure_residuals=False))),
    "tracin": Method([{"checkpoints": "optimum", "learning_rate": 1.0}], lambda m, s, c: TracInScorer(m)),
}
ENSEMBLE = "ensemble-exact"  # exact influence averaged over ensemble_size independently trained models
ALL_METHODS = (*METHODS, ENSEMBLE)


# -- measurement helpers ------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory (MB) of this process above its level at entry, sampled at 20 Hz."""

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self._base = self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.mb = (self._peak - self._base) / 2**20


def _load(config: EvaluateConfig):
    from influencekit.datasets import koh_liang_split, koh_liang_validation, load_mnist

    mnist = load_mnist(config.data_dir)
    if config.downsample > 1:  # average-pool s x s blocks: fewer parameters, for quick runs and tests
        s = config.downsample
        pool = lambda images: torch.nn.functional.avg_pool2d(images.reshape(-1, 1, 28, 28), s).reshape(len(images), -1)  # noqa: E731
        mnist = type(mnist)(pool(mnist.train_images), mnist.train_labels, pool(mnist.test_images), mnist.test_labels)
    split = koh_liang_split(mnist)
    x_val, y_val = koh_liang_validation(mnist)
    if config.train_size > len(split.y_train) or config.test_size > len(split.y_test) or config.val_test_size > len(y_val):
        raise ValueError(f"train_size <= {len(split.y_train)}, test_size <= {len(split.y_test)} and val_test_size <= {len(y_val)} required")
    return (split.x_train[: config.train_size], split.y_train[: config.train_size],
            (split.x_test[: config.test_size], split.y_test[: config.test_size]),
            (x_val[: config.val_test_size], y_val[: config.val_test_size]))


def _fit(x, y, config: EvaluateConfig, initial: torch.Tensor | None = None) -> FittedModel:
    fit = fit_softmax_regression(x, y, config.weight_decay, NUM_CLASSES, tol=config.tol, initial=initial)
    return FittedModel(x, y, config.weight_decay, fit.weights)


def _retrain(config: EvaluateConfig, x, y, tests, masks: np.ndarray, name: str, initial) -> tuple[np.ndarray, float]:
    """Test losses (m_all, M) of the models retrained on ``masks``, cached under out/cache/name; and seconds."""
    start = time.perf_counter()
    trainer = SoftmaxSubsetTrainer(x, y, tests[0], tests[1], config.weight_decay, NUM_CLASSES, tol=config.tol, initial=initial)
    setting = json.dumps({"workload": config.workload, "n": len(y), "weight_decay": config.weight_decay, "tol": config.tol,
                          "test_size": config.test_size, "val_test_size": config.val_test_size, "start": name})
    outputs = subset_outputs(trainer, masks, cache_dir=config.out / "cache" / name, fingerprint=setting,
                             workers=config.workers, scheduler_address=config.scheduler,
                             batch_size=config.retrain_batch_size, progress=config.progress)
    return outputs, time.perf_counter() - start


def evaluate(config: EvaluateConfig) -> dict:
    """Run the evaluation; writes results.json, results.md, lds.png, report.html and scores/<method>.npy into
    ``config.out``; returns the results."""
    if config.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {config.workload!r}; choose from {', '.join(WORKLOADS)}")
    if config.workload != "mnist-lr":
        from influencekit.experiments.evaluate_network import evaluate_network

        return evaluate_network(config)
    config = with_workload_defaults(config, ensemble_size=3, retrain_batch_size=10)
    methods = selected_methods(config, ALL_METHODS, ALL_METHODS)
    start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    x, y, tests, val_tests = _load(config)
    n, m = len(y), len(tests[1])
    model = _fit(x, y, config)
    _log(f"mnist-lr: n = {n}, m = {m}, ||grad R|| = {float(model.objective.objective_gradient().norm()):.2g}")

    # retraining: evaluation and validation subsets in one pass (outputs on all test points)
    masks = subset_masks(n, config.num_subsets, config.fraction, seed=config.seed)
    val_masks = subset_masks(n, config.val_subsets, config.fraction, seed=config.seed + 1)
    all_tests = (torch.cat([tests[0], val_tests[0]]), torch.cat([tests[1], val_tests[1]]))
    all_masks = np.concatenate([masks, val_masks])
    scratch, scratch_seconds = _retrain(config, x, y, all_tests, all_masks, "scratch", None)
    warm, warm_seconds = _retrain(config, x, y, all_tests, masks, "warm", model.weights)
    actual, actual_warm = scratch[:m, : len(masks)], warm[:m]
    actual_val = scratch[m:, len(masks):]
    _log(f"retraining: {len(all_masks)} subsets from scratch in {scratch_seconds:.0f} s, {len(masks)} warm-started in {warm_seconds:.0f} s")

    # exact leave-one-out refits of random training points
    loo_points = np.sort(np.random.default_rng(config.seed + 2).choice(n, size=min(config.loo_points, n), replace=False))
    t = time.perf_counter()
    problem = SoftmaxRefitProblem(x, y, config.weight_decay, model.weights, model.direct().factor, tol=config.tol)
    refits = refit_leave_one_out(problem, loo_points.tolist())
    loo_actual = (softmax_test_losses(torch.stack([r["weights"] for r in refits]), *tests).numpy()
                  - softmax_test_losses(model.weights, *tests).numpy()).T  # (m, k)
    loo_seconds = time.perf_counter() - t

    # mislabel detection: a model on flipped labels
    noisy_labels, flipped = flip_labels(y.numpy(), config.mislabel_fraction, NUM_CLASSES, seed=config.seed + 3)
    noisy = _fit(x, torch.from_numpy(noisy_labels), config)
    noisy_losses = -torch.log_softmax(x @ noisy.weights.T, dim=1)[torch.arange(n), noisy.y].numpy()
    baseline = mislabel_detection(noisy_losses, flipped).as_dict()
    _log(f"mislabel baseline (training loss): AUC {baseline['mislabel_auc']:.3f}")

    results: dict[str, Any] = {}
    for name in methods:
        _log(f"{name}: tuning and scoring")
        results[name] = _evaluate_method(name, config, model, noisy, tests, val_tests, masks, val_masks, actual,
                                         actual_warm, actual_val, loo_points, loo_actual, flipped, x, y)
        r = results[name]
        _log(f"{name}: LDS {r['lds']:.3f} [{r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}], LOO {r['loo_pearson']:.3f}, "
             f"AUC {r['mislabel_auc'] if r['mislabel_auc'] is None else round(r['mislabel_auc'], 3)}, {r['seconds']:.1f} s")
        _write(config, results, baseline, scratch, warm, masks, loo_seconds, scratch_seconds, warm_seconds, start)
    document = _write(config, results, baseline, scratch, warm, masks, loo_seconds, scratch_seconds, warm_seconds, start, final=True)
    write_evaluate_report(config, document, (x, y), tests, dict(zip(loo_points.tolist(), loo_actual[0].tolist())))
    return document


def selected_methods(config, known: Sequence[str], default: Sequence[str]) -> list[str]:
    """``config.methods`` (or ``default`` when none are given), each checked against the workload's ``known`` methods."""
    methods = list(config.methods or default)
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown} for {config.workload}; choose from {', '.join(known)}")
    return methods


def tune_on_held_out(method, model, config, val_tests, val_masks, actual_val) -> tuple[dict, list[dict]]:
    """The setting of ``method.grid`` with the best LDS on the held-out subsets and validation tests
    (never the evaluation ones), and the record of every try. A setting that fails (e.g. not positive
    definite at its damping) is recorded with its error; a one-setting grid is taken as it is."""
    tuning = []
    for setting in method.grid if len(method.grid) > 1 else ():
        try:
            val_scores = method.build(model, setting, config).scores(val_tests)
            val_lds = linear_datamodeling_score(val_scores, val_masks, actual_val, n_bootstrap=0).lds
        except (ValueError, RuntimeError) as error:
            tuning.append({"setting": setting, "val_lds": None, "error": str(error).splitlines()[0]})
            continue
        tuning.append({"setting": setting, "val_lds": val_lds})
    scored = [t for t in tuning if t["val_lds"] is not None]
    return (max(scored, key=lambda t: t["val_lds"])["setting"] if scored else method.grid[0]), tuning


def _evaluate_method(name, config, model, noisy, tests, val_tests, masks, val_masks, actual, actual_warm, actual_val,
                     loo_points, loo_actual, flipped, x, y) -> dict:
    method = METHODS["exact"] if name == ENSEMBLE else METHODS[name]
    chosen, tuning = tune_on_held_out(method, model, config, val_tests, val_masks, actual_val)

    with PeakMemory() as memory:
        t = time.perf_counter()
        if name == ENSEMBLE:
            members = _ensemble_members(config, x, y, model)
            scorer: Scorer = EnsembleScorer([method.build(member, chosen, config) for member in members])
        else:
            scorer = method.build(model, chosen, config)
        scores = scorer.scores(tests)
        seconds = time.perf_counter() - t
    _save_scores(config.out / "scores" / f"{name}.npy", scores)
    lds = linear_datamodeling_score(scores, masks, actual, n_bootstrap=config.n_bootstrap, seed=config.seed)
    lds_warm = linear_datamodeling_score(scores, masks, actual_warm, n_bootstrap=0)
    loo = leave_one_out_correlation(-scores[:, loo_points] / model.n, loo_actual)
    mislabel: dict[str, Any] = {"mislabel_auc": None}
    settings: dict[str, Any] = dict(chosen)
    if method.self_influence:
        t = time.perf_counter()
        noisy_scorer = (EnsembleScorer([method.build(member, chosen, config) for member in _ensemble_members(config, x, noisy.y, noisy)])
                        if name == ENSEMBLE else method.build(noisy, chosen, config))
        mislabel = mislabel_detection(noisy_scorer.self_scores(), flipped).as_dict()
        mislabel["mislabel_seconds"] = time.perf_counter() - t
    else:
        mislabel["mislabel_skipped"] = "self-influence needs n = %d iterative solves" % model.n
    if name == ENSEMBLE:
        settings.update(members=config.ensemble_size, method="exact",
                        max_weight_difference=max(float((m.weights - model.weights).abs().max()) for m in members))
    return {**lds.as_dict(), "lds_warm": lds_warm.lds, **loo.as_dict(), **mislabel, "seconds": seconds,
            "peak_mb": memory.mb, "settings": settings, "tuning": tuning}


def _ensemble_members(config: EvaluateConfig, x, y, model: FittedModel) -> list[FittedModel]:
    """``ensemble_size`` models trained from independent random starts (one batched fit)."""
    generator = torch.Generator().manual_seed(config.seed + 4)
    starts = 0.01 * torch.randn(config.ensemble_size, *model.weights.shape, generator=generator, dtype=x.dtype)
    masks = torch.ones(config.ensemble_size, len(y), dtype=torch.bool)
    fit = fit_softmax_regression_subsets(x, y, config.weight_decay, masks, NUM_CLASSES, tol=config.tol, initial=starts)
    return [FittedModel(x, y, config.weight_decay, w) for w in fit.weights]


def _write(config, results, baseline, scratch, warm, masks, loo_seconds, scratch_seconds, warm_seconds, start, final=False):
    m, k = config.test_size, len(masks)
    document = {
        "workload": config.workload,
        "methods": results,
        "baseline_training_loss": baseline,
        "output_function": "test cross-entropy loss (what the model minimises and influence functions linearise)",
        "retrain": {"protocol": "each subset from scratch from its own seeded random start (TRAK/dattri); lds_warm: warm-started from W_hat",
                    "max_output_difference_scratch_vs_warm": float(np.abs(scratch[:m, :k] - warm[:m]).max()),
                    "scratch_seconds": scratch_seconds, "warm_seconds": warm_seconds, "loo_seconds": loo_seconds},
        "sign_convention": "scores = I_up,loss = effect of including a training point on the test loss; "
                           "LOO predicted = -(1/n) I_up,loss",
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in asdict(config).items()},
        "total_seconds": time.perf_counter() - start,
        "complete": final,
    }
    atomic_write(config.out / "results.json", json.dumps(document, indent=2))
    atomic_write(config.out / "results.md", markdown_table(document))
    if final:
        _plot(config.out / "lds.png", document)
    return document


def _save_scores(path: Path, scores: np.ndarray) -> None:
    """The method's test scores (m, n), so metrics can be recomputed without rescoring."""
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:  # a file object: np.save would append .npy to a path
            np.save(stream, scores)

    atomic_write(path, write)


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(document: dict) -> str:
    """The results as a markdown table, best LDS first."""
    rows = sorted(document["methods"].items(), key=lambda item: -item[1]["lds"])
    lines = [f"Workload `{document['workload']}`; output: {document['output_function']}.", "",
             "| method | LDS (95% CI) | LDS warm-start | LOO Pearson | mislabel AUC | found @10% | found @20% | seconds | peak MB | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['lds']:.3f} ({r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}) | {_number(r['lds_warm'])} | {_number(r['loo_pearson'])} | "
            f"{_number(r['mislabel_auc'])} | {_number(r.get('found_at_10pct'))} | {_number(r.get('found_at_20pct'))} | "
            f"{r['seconds']:.1f} | {r['peak_mb']:.0f} | {json.dumps({k: v for k, v in r['settings'].items()})} |")
    b = document["baseline_training_loss"]
    lines.append(f"| training loss (baseline) | | | | {b['mislabel_auc']:.3f} | {b['found_at_10pct']:.3f} | {b['found_at_20pct']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, document: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(document["methods"].items(), key=lambda item: -item[1]["lds"])
    names = [name for name, _ in rows]
    lds = np.array([r["lds"] for _, r in rows])
    errors = np.array([[r["lds"] - r["lds_ci"][0], r["lds_ci"][1] - r["lds"]] for _, r in rows]).T
    auc = [np.nan if r["mislabel_auc"] is None else r["mislabel_auc"] for _, r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, lds, yerr=np.nan_to_num(errors), capsize=3)
    left.set_ylabel("LDS (95% bootstrap CI)")
    right.bar(names, auc, color="tab:orange")
    right.axhline(document["baseline_training_loss"]["mislabel_auc"], color="k", ls="--", label="training loss")
    right.set_ylabel("mislabel detection AUC")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=60)
    figure.suptitle(f"{document['workload']}: every method on the same retrained subsets")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command line ---------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=WORKLOADS, default="mnist-lr")
    parser.add_argument("--data-dir", type=Path, default=None, help="directory with the MNIST IDX files")
    parser.add_argument("--out", type=Path, required=True, help="output directory (results.json, results.md, lds.png, cache/)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"mnist-lr: subset of {', '.join(ALL_METHODS)} (default: all); mnist-mlp, mnist-cnn: see evaluate_network.ALL_METHODS")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=2, help="local Dask worker processes for retraining (0: in-process)")
    where.add_argument("--scheduler", default=None, help="address of a Dask scheduler to retrain on")
    for name in ("train_size", "downsample", "test_size", "num_subsets", "val_subsets", "val_test_size", "loo_points", "ensemble_size",
                 "lissa_depth", "n_bootstrap", "seed", "retrain_batch_size", "warm_epochs"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(EvaluateConfig, name))
    parser.add_argument("--epochs", type=int, default=None, help="network workloads: SGD epochs (default: the workload's)")
    for name in ("fraction", "weight_decay", "mislabel_fraction"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(EvaluateConfig, name))


def run(args: argparse.Namespace) -> int:
    names = {f for f in EvaluateConfig.__dataclass_fields__} - {"progress"}
    config = EvaluateConfig(**{k: v for k, v in vars(args).items() if k in names}, progress=sys.stderr.isatty())
    try:
        evaluate(config)
    except ValueError as error:
        print(f"influencekit evaluate: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
