"""``influencekit evaluate --workload mnist-mlp | mnist-cnn``: every method on a network trained by SGD from scratch.

Workload ``mnist-mlp`` (dattri's MNIST-10 MLP, :func:`~influencekit.models.mlp.dattri_mnist_mlp`):
784-128-64-10, ReLU, dropout 0.1, 109,386 parameters; SGD lr 0.01, momentum 0.9, batches
of 64, 50 epochs, no weight decay (dattri's schedule).

Workload ``mnist-cnn`` (Koh & Liang's all-convolutional network,
:func:`~influencekit.models.small_cnn.koh_liang_cnn`): five 3x3 tanh convolutions with 8
channels, a 1x1 convolution, global average pooling and a 10 x 10 linear layer, 2,616
parameters. Koh & Liang fit it to an optimum (Adam, then L-BFGS); here, as the protocol
requires, every model is trained from scratch by SGD: lr 0.02, momentum 0.9, batches of 64,
30 epochs, no weight decay. The schedule is the mnist-mlp one with the learning rate and the
number of epochs chosen on the real data: with seeds 0..3, 2,500 training images (a subset's
size) and 30 epochs, test accuracy 0.89-0.92 at lr 0.02 against 0.87-0.90 at lr 0.05 (higher
and noisier final loss) and 0.74-0.78 at lr 0.2 (10 epochs, all 5,000 images); 20 epochs reach
0.88-0.91; on all 5,000 images, 30 epochs reach 0.91-0.94 (seeds 0..2, the first 1,000 test
images). An epoch costs about 0.25 ms an image on one core (30 models trained together), so
the 60 halves at 30 epochs are about 1,100 core-seconds.

Both: pixels normalised with dattri's mean 0.1307 and std 0.3081; float32. Data as in
``mnist-lr``: the first ``train_size`` training images of Koh & Liang's split, the first
``test_size`` official test images, validation images for tuning.

* **LDS**: ``num_subsets`` random halves, each trained *from scratch with a fresh seed*
  (new initialisation, data order and dropout masks: the protocol of TRAK and dattri),
  by :class:`~influencekit.evaluation.sgd_training.SGDSubsetTrainer` through
  :func:`~influencekit.evaluation.retrain.subset_outputs` (Dask, cached, resumable);
  output = test cross-entropy in eval mode. ``lds_warm``: the same subsets trained
  ``warm_epochs`` epochs from theta_hat (same schedule).
* **Methods** (all on theta_hat, the model trained on all n points in eval mode):
  K-FAC, EK-FAC (``KFACSolver``; the GGN's Kronecker factors of the Linear and Conv2d
  layers), DataInf (one block per parameter tensor: each layer's weight, its bias),
  Arnoldi and the Nystrom sketch (top eigenpairs of the Gauss-Newton matrix: the Hessian
  of a model stopped by SGD is indefinite and the sketch needs a positive semi-definite
  operator), TracInCP (checkpoints of the training run, its learning
  rate), and ``ensemble-<method>``: the method's scores averaged over
  ``ensemble_size`` models trained on all the data from independent seeds (member 0
  is theta_hat), TRAK's remedy for the seed noise of non-convex training. ``trak``: TRAK
  (:mod:`influencekit.scores.trak`; projected margin gradients, Gaussian projection of
  dimension k, ridge lambda, both tuned), scores -tau (the sign of I_up,loss; the LDS
  against test losses equals TRAK's LDS against test margins, the loss being a decreasing
  function of the margin); ``ensemble-trak`` is TRAK over ``ensemble_size`` models (kernels and
  loss-to-output weights averaged apart, the paper's estimator), with ``trak``'s k and its ridge
  chosen again on the held-out data for the ensemble.
  Not run, and why: each workload's ``not_run`` (``NOT_RUN_MLP``, ``NOT_RUN_CNN``; recorded
  in results.json): exact influence, CG, block CG and LiSSA, whose Hessian products cost
  too much for the 30-minute budget on 2 cores.
  Scores are I_up,loss = -g_test^T (M + damping I)^{-1} g_i with the training gradients
  materialised once per model (n x p) so every method's scores are one GEMM.
* **mislabel detection**: 10% of the labels flipped, a model trained on them with the same
  schedule, points ranked by each method's self-influence. Not run for ensembles (they would
  need ``ensemble_size`` models on the flipped labels) nor, above 20,000 parameters (mnist-mlp),
  for K-FAC, EK-FAC and DataInf (n = 5,000 solves, or the n x n gradient Gram matrix);
  mnist-cnn's 2,616 parameters make those solves cheap, so every single-model method runs.
* **LOO**: not run (``loo_pearson`` null): removing one of 5,000 points changes an
  SGD-trained network's test loss far less than retraining with another seed does.

Hyperparameters are chosen by LDS on ``val_subsets`` other subsets and ``val_test_size``
validation images, never on the evaluation subsets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from influencekit.curvature import GaussNewtonOperator
from influencekit.curvature.kfac import KFACCurvature
from influencekit.evaluation import flip_labels, linear_datamodeling_score, mislabel_detection, subset_masks, subset_outputs
from influencekit.evaluation.sgd_training import SGDSettings, SGDSubsetTrainer, train_models, unstack_state
from influencekit.experiments.evaluate import (
    PeakMemory,
    Scorer,
    _load,
    _log,
    _plot,
    _save_scores,
    markdown_table,
    selected_methods,
    tune_on_held_out,
    with_workload_defaults,
)
from influencekit.linalg import check_directions
from influencekit.models.mlp import MNIST_MEAN, MNIST_STD, dattri_mnist_mlp
from influencekit.models.small_cnn import koh_liang_cnn
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.persistence import atomic_write, save_tensors
from influencekit.scores.influence import InfluenceFunction
from influencekit.scores.trak import TRAK, TRAKFeatures, TRAKScores, ensemble_scores, margin_objective
from influencekit.solvers import ArnoldiSolver, DataInfSolver, KFACSolver, NystromSketchSolver
from influencekit.solvers.arnoldi import ArnoldiEigenpairs, arnoldi_eigenpairs
from influencekit.solvers.nystrom import randomized_nystrom
from influencekit.validation.refit_cache import fingerprint_of

NUM_CLASSES = 10


@dataclass(frozen=True)
class NetworkWorkload:
    """A network and the SGD schedule that trains it (every model of the workload)."""

    model_fn: Callable[[], nn.Module]
    sgd: SGDSettings
    description: str
    not_run: dict[str, str]
    ensemble_size: int = 20  # models of the ensemble-<method> scores: TRAK's LDS on mnist-mlp passes 0.30 at 20 (RESULTS.md)
    retrain_batch_size: int = 30  # subsets trained by one vmapped SGD run


NOT_RUN_MLP = {
    "exact": "the 109,386 x 109,386 Hessian does not fit in memory",
    "cg, block-cg, lissa": "hundreds of Hessian-vector products with 600 right-hand sides each: beyond 30 minutes on 2 cores",
    "loo_pearson": "one removed point moves an SGD-trained network's test loss far less than the seed does",
}
NOT_RUN_CNN = {
    "exact": "the explicit 2,616 x 2,616 Hessian needs 2,616 Hessian-vector products over the 5,000 images: measured "
             "4.4-7.5 s for one and 166 s for a block of 20 on the shared 2-core machine, so 3-6 hours",
    "cg, block-cg, lissa": "hundreds of Hessian-vector products for each of 600 right-hand sides, at about 8 s per product "
                           "and right-hand side over the 5,000 images (measured, a block of 20 costs 20 single ones): "
                           "beyond 30 minutes on 2 cores",
    "loo_pearson": NOT_RUN_MLP["loo_pearson"],
}
WORKLOADS: dict[str, NetworkWorkload] = {
    "mnist-mlp": NetworkWorkload(dattri_mnist_mlp, SGDSettings(epochs=50, lr=0.01, momentum=0.9, batch_size=64),
                                 "dattri's MNIST MLP 784-128-64-10, ReLU, dropout 0.1 (109,386 parameters)", NOT_RUN_MLP),
    "mnist-cnn": NetworkWorkload(koh_liang_cnn, SGDSettings(epochs=30, lr=0.02, momentum=0.9, batch_size=64),
                                 "Koh & Liang's all-convolutional tanh CNN, 5 x (3x3 conv, 8 channels), 1x1 conv, global "
                                 "average pooling, 10 x 10 linear (2,616 parameters)", NOT_RUN_CNN, ensemble_size=3),
}


class GradientMatrixObjective(TorchObjective):
    """A :class:`TorchObjective` whose training gradients g_i = grad l_i + lambda theta are computed once,
    as an (n, p) matrix, so that ``train_gradient_dots`` (every method's scores) is one GEMM."""

    _matrix: Tensor | None = None

    def gradient_matrix(self, rows: int = 500) -> Tensor:
        if self._matrix is None:
            matrix = torch.empty(self.n_train, self.dim, dtype=self.dtype)
            for start in range(0, self.n_train, rows):
                matrix[start : start + rows] = self.train_gradients(torch.arange(start, min(start + rows, self.n_train)))
            self._matrix = matrix
        return self._matrix

    def train_gradient_dots(self, directions: Tensor) -> Tensor:
        return check_directions(directions, self.dim, "directions").to(self.dtype) @ self.gradient_matrix().T


class Network:
    """One trained network (eval mode) with its objective and the fits its methods share (K-FAC factors, eigenpairs)."""

    def __init__(self, workload: NetworkWorkload, params: dict[str, Tensor], x: Tensor, y: Tensor,
                 checkpoints: list[dict[str, Tensor]] | None = None):
        self.workload, self.params, self.x, self.y = workload, params, x, y
        self.checkpoints = checkpoints or []
        self.module = workload.model_fn().to(x.dtype)
        self.module.load_state_dict(params, strict=False)
        self.module.eval()
        self.objective = GradientMatrixObjective(self.module, "cross_entropy", (x, y), weight_decay=workload.sgd.weight_decay,
                                                 chunk_size=500, hvp_cache_mb=0)
        self.fits: dict[Any, Any] = {}

    @property
    def n(self) -> int:
        return len(self.y)

    def fit(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.fits:
            self.fits[key] = make()
        return self.fits[key]


class NetworkInfluenceScorer(Scorer):
    """I_up,loss through :class:`InfluenceFunction`; self-influence in blocks of rows (bounded memory)."""

    def __init__(self, network: Network, solver: Any):
        self.network, self.solver = network, solver
        self.function = InfluenceFunction(network.objective, solver)

    def scores(self, tests):
        return self.function.scores(tests).influence_on_loss.double().numpy()

    def self_scores(self, rows: int = 500):
        n = self.network.n
        return np.concatenate([(-self.function.self_influence(torch.arange(s, min(s + rows, n)))).double().numpy()
                               for s in range(0, n, rows)])


class NetworkTracInScorer(Scorer):
    """TracInCP over the training run's checkpoints, each weighted by the learning rate: -sum_c eta <g_test, g_i>."""

    def __init__(self, network: Network):
        from influencekit.tracin import TracInCP

        self.network = network

        def loss_fn(model_call, batch):
            return torch.nn.functional.cross_entropy(model_call(batch[0]), batch[1], reduction="none")

        lr = network.workload.sgd.lr
        self.tracin = TracInCP(network.module, network.checkpoints, [lr] * len(network.checkpoints), loss_fn, chunk_size=500)

    def scores(self, tests):
        return -self.tracin.scores(tests, (self.network.x, self.network.y)).double().numpy()

    def self_scores(self):
        return self.tracin.self_influence((self.network.x, self.network.y)).double().numpy()


class NetworkTRAKScorer(Scorer):
    """TRAK (:mod:`influencekit.scores.trak`) on one network: scores = -tau, the sign of I_up,loss.

    Features are fitted once per network, projection dimension k and projection dtype (a wider fit is
    narrowed, so the grid's largest k is the only one computed while tuning); every damping reuses their
    eigendecomposition. The grid projects in bfloat16 (``TRAKFeatures.compute``: 3.7x faster than float32 on
    CPUs with AVX512-BF16, an error far below the projection's own).
    """

    def __init__(self, network: Network, setting: dict[str, Any], config):
        k, dtype = setting["projection_dim"], setting["projection_dtype"]
        objective = network.fit("margin", lambda: margin_objective(network.module, (network.x, network.y)))
        features = network.fit(("trak", dtype, k), lambda: self._features(network, objective, k, dtype, config.seed))
        self.trak = TRAK(objective, features=features, relative_damping=setting["relative_damping"])

    @staticmethod
    def _features(network: Network, objective, k: int, dtype: str, seed: int) -> TRAKFeatures:
        wider = [key[2] for key in network.fits if isinstance(key, tuple) and key[:2] == ("trak", dtype) and key[2] > k]
        if wider:
            return network.fits[("trak", dtype, min(wider))].narrow(k)
        return TRAKFeatures.compute(objective, k, seed=seed, projection_dtype=getattr(torch, dtype))

    def scores(self, tests):
        return self.trak.scores(tests).loss_sign.numpy()

    def self_scores(self):
        """tau(z_i, i) = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i (1 - p_i) >= 0: how much z_i raises its own margin."""
        eigenvalues, _, rotated = self.trak.features.spectrum
        return ((rotated**2 / (eigenvalues + self.trak.damping)).sum(1) * self.trak.features.out_to_loss).numpy()


SELF_INFLUENCE_TOO_COSTLY = ("self-influence of all n points needs n solves (or the n x n gradient Gram matrix): beyond the "
                             "30-minute budget for p > 20,000 parameters")
SELF_INFLUENCE_MAX_DIM = 20_000


@dataclass
class NetworkMethod:
    """Hyperparameter grid (tuned on held-out data), builder, and why mislabel detection is skipped (None: it is run)."""

    grid: list[dict[str, Any]]
    build: Callable[[Network, dict[str, Any], Any], Scorer]
    mislabel_skipped: str | None = None


def _influence(make_solver):
    return lambda net, setting, config: NetworkInfluenceScorer(net, make_solver(net, setting, config))


def _kfac(correction: bool):
    def make(net: Network, setting, config):
        curvature = net.fit(("kfac", correction), lambda: KFACCurvature(net.objective, eigenvalue_correction=correction, chunk_size=500).fit())
        return KFACSolver(curvature, damping=setting["damping"])
    return make


def _ggn(net: Network) -> GaussNewtonOperator:
    return net.fit("ggn", lambda: GaussNewtonOperator(net.objective))


def _arnoldi(net: Network, setting, config):
    rank = setting["rank"]
    pairs = net.fit(("arnoldi", rank), lambda: ArnoldiEigenpairs(*arnoldi_eigenpairs(_ggn(net), rank, rank + 20, config.seed)))
    return ArnoldiSolver(None, rank=rank, damping=setting["damping"], eigenpairs=pairs, measure_residuals=False)


def _nystrom(net: Network, setting, config):
    rank = setting["rank"]
    approximation = net.fit(("nystrom", rank), lambda: randomized_nystrom(_ggn(net), rank, seed=config.seed))
    return NystromSketchSolver(None, rank=rank, damping=setting["damping"], approximation=approximation, measure_residuals=False)


def _datainf(net: Network, setting, config):
    return DataInfSolver(net.objective, damping=setting["damping"], blocks=net.objective.space.offsets(), measure_residuals=False)


DAMPINGS = (3e-3, 1e-2, 3e-2, 1e-1)
METHODS: dict[str, NetworkMethod] = {
    "kfac": NetworkMethod([{"damping": d} for d in DAMPINGS], _influence(_kfac(False)), SELF_INFLUENCE_TOO_COSTLY),
    "ekfac": NetworkMethod([{"damping": d} for d in DAMPINGS], _influence(_kfac(True)), SELF_INFLUENCE_TOO_COSTLY),
    "datainf": NetworkMethod([{"damping": d} for d in (None, 1e-2, 1e-1)], _influence(_datainf), SELF_INFLUENCE_TOO_COSTLY),
    "arnoldi": NetworkMethod([{"rank": 30, "damping": d} for d in DAMPINGS], _influence(_arnoldi)),
    "nystrom": NetworkMethod([{"rank": 60, "damping": d} for d in DAMPINGS], _influence(_nystrom)),
    "tracin": NetworkMethod([{"checkpoints": "epochs", "learning_rate": "sgd lr"}], lambda net, s, c: NetworkTracInScorer(net)),
    # largest k first: the smaller ones are narrowed from its features
    "trak": NetworkMethod([{"projection_dim": k, "projection_dtype": "bfloat16", "relative_damping": d}
                           for k in (1024, 512) for d in (0.0, 0.1, 0.3, 1.0, 3.0)],
                          NetworkTRAKScorer),
}
ENSEMBLES = ("ensemble-ekfac", "ensemble-kfac", "ensemble-nystrom", "ensemble-trak")
ALL_METHODS = (*METHODS, *ENSEMBLES)
# the other ensembles are left to --methods: over 20 models each costs 8 to 20 minutes on 2 cores (RESULTS.md)
DEFAULT_METHODS = ("kfac", "ekfac", "datainf", "arnoldi", "nystrom", "tracin", "trak", "ensemble-trak")


def _checkpoint_epochs(epochs: int, count: int = 3) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(epochs * (j + 1) / count)) for j in range(count)}))


def _prepare(config) -> tuple[NetworkWorkload, Tensor, Tensor, tuple, tuple]:
    workload = WORKLOADS[config.workload]
    if config.epochs is not None:
        workload = dataclasses.replace(workload, sgd=dataclasses.replace(workload.sgd, epochs=config.epochs))
    x, y, tests, val_tests = _load(config)
    norm = lambda images: ((images - MNIST_MEAN) / MNIST_STD).float()  # noqa: E731
    return workload, norm(x), y, (norm(tests[0]), tests[1]), (norm(val_tests[0]), val_tests[1])


def _train_full(workload: NetworkWorkload, x, y, seeds: list[int]) -> list[Network]:
    """Networks trained on all the data, one per seed (one batched run), with TracIn checkpoints."""
    everything = np.arange(len(y))
    params, checkpoints = train_models(workload.model_fn, x, y, [everything] * len(seeds), seeds, workload.sgd,
                                       checkpoint_epochs=_checkpoint_epochs(workload.sgd.epochs))
    return [Network(workload, unstack_state(params, j), x, y, [unstack_state(c, j) for c in checkpoints]) for j in range(len(seeds))]


def evaluate_network(config) -> dict:
    """The evaluation of a network workload; writes results.json, results.md, lds.png, scores/, subsets.npz and
    model/ (theta_hat, the model every single-model method scores: :func:`~influencekit.persistence.load_tensors`)
    into ``config.out``."""
    workload = WORKLOADS[config.workload]
    config = with_workload_defaults(config, ensemble_size=workload.ensemble_size, retrain_batch_size=workload.retrain_batch_size)
    methods = selected_methods(config, ALL_METHODS, DEFAULT_METHODS)
    start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    workload, x, y, tests, val_tests = _prepare(config)
    n, m = len(y), len(tests[1])

    t = time.perf_counter()
    members = _train_full(workload, x, y, [config.seed + 1000 + j for j in range(max(1, config.ensemble_size))])
    network = members[0]
    train_seconds = time.perf_counter() - t
    accuracy = float((network.module(tests[0]).argmax(1) == tests[1]).float().mean())
    save_tensors(config.out / "model", network.params, {"workload": config.workload, "dim": network.objective.dim,
                                                         "sgd": workload.sgd.as_dict(), "seed": config.seed + 1000})
    _log(f"{config.workload}: n = {n}, m = {m}, p = {network.objective.dim}, {len(members)} full models in {train_seconds:.0f} s, "
         f"test accuracy {accuracy:.3f}")

    masks = subset_masks(n, config.num_subsets, config.fraction, seed=config.seed)
    val_masks = subset_masks(n, config.val_subsets, config.fraction, seed=config.seed + 1)
    all_tests = (torch.cat([tests[0], val_tests[0]]), torch.cat([tests[1], val_tests[1]]))
    scratch, scratch_seconds = _retrain(config, workload, x, y, all_tests, np.concatenate([masks, val_masks]), "scratch", None)
    actual, actual_val = scratch[:m, : len(masks)], scratch[m:, len(masks):]
    warm = None
    warm_seconds = 0.0
    if config.warm_epochs > 0:
        warm, warm_seconds = _retrain(config, workload, x, y, tests, masks, "warm", network.params)
    _save_arrays(config.out / "subsets.npz", masks=masks, val_masks=val_masks, actual=actual, actual_val=actual_val,
                 **({} if warm is None else {"actual_warm": warm}))
    _log(f"retraining: {len(masks) + len(val_masks)} subsets from scratch in {scratch_seconds:.0f} s, "
         f"{len(masks) if warm is not None else 0} warm-started in {warm_seconds:.0f} s")

    noisy_labels, flipped = flip_labels(y.numpy(), config.mislabel_fraction, NUM_CLASSES, seed=config.seed + 3)
    noisy = _train_full(workload, x, torch.from_numpy(noisy_labels), [config.seed + 2000])[0]
    with torch.no_grad():
        noisy_losses = torch.nn.functional.cross_entropy(noisy.module(x), noisy.y, reduction="none").double().numpy()
    baseline = mislabel_detection(noisy_losses, flipped).as_dict()
    _log(f"mislabel baseline (training loss): AUC {baseline['mislabel_auc']:.3f}")

    results: dict[str, Any] = {}
    context = {"train_seconds": train_seconds, "scratch_seconds": scratch_seconds, "warm_seconds": warm_seconds,
               "test_accuracy": accuracy, "parameters": network.objective.dim, "start": start}
    for name in methods:
        _log(f"{name}: tuning and scoring")
        results[name] = _evaluate_method(name, config, members, noisy, tests, val_tests, masks, val_masks, actual, warm,
                                         actual_val, flipped, results)
        r = results[name]
        _log(f"{name}: LDS {r['lds']:.3f} [{r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}], AUC "
             f"{r['mislabel_auc'] if r['mislabel_auc'] is None else round(r['mislabel_auc'], 3)}, {r['seconds']:.1f} s")
        _write(config, workload, results, baseline, context)
    return _write(config, workload, results, baseline, context, final=True)


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """The subsets and the retrained models' outputs (evaluation and held-out), so any scores can be re-evaluated."""
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            np.savez(stream, **arrays)

    atomic_write(path, write)


def _retrain(config, workload: NetworkWorkload, x, y, tests, masks, name: str, initial) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    sgd = workload.sgd if initial is None else dataclasses.replace(workload.sgd, epochs=config.warm_epochs)
    trainer = SGDSubsetTrainer(workload.model_fn, x, y, tests[0], tests[1], sgd, seed=config.seed, initial=initial)
    setting = json.dumps({"workload": config.workload, "n": len(y), "sgd": sgd.as_dict(), "test_size": config.test_size,
                          "val_test_size": config.val_test_size, "start": name, "seed": config.seed,
                          **({} if initial is None else {"initial": fingerprint_of(*initial.values())})})
    outputs = subset_outputs(trainer, masks, cache_dir=config.out / "cache" / name, fingerprint=setting, workers=config.workers,
                             scheduler_address=config.scheduler, batch_size=config.retrain_batch_size, progress=config.progress)
    return outputs, time.perf_counter() - start


def _evaluate_method(name, config, members, noisy, tests, val_tests, masks, val_masks, actual, warm, actual_val, flipped,
                     done: dict) -> dict:
    ensemble = name.startswith("ensemble-")
    base = name.removeprefix("ensemble-")
    method = METHODS[base]
    network = members[0]
    t = time.perf_counter()
    if ensemble and base in done:  # the base method's choice, made on held-out data
        chosen, tuning = done[base]["settings"], []
    else:
        chosen, tuning = tune_on_held_out(method, network, config, val_tests, val_masks, actual_val)
    tuning_seconds = time.perf_counter() - t  # includes the fits (K-FAC factors, eigenpairs) that scoring reuses
    with PeakMemory() as memory:
        t = time.perf_counter()
        if ensemble and base == "trak":
            scores, chosen, tuning = _ensemble_trak(members, chosen, config, tests, val_tests, val_masks, actual_val)
        elif ensemble:
            total = None
            for member in members:  # one member's gradient matrix in memory at a time
                part = method.build(member, chosen, config).scores(tests)
                total = part if total is None else total + part
                if member is not network:
                    member.objective._matrix, member.fits = None, {}
            scores = total / len(members)
        else:
            scores = method.build(network, chosen, config).scores(tests)
        seconds = time.perf_counter() - t
    _save_scores(config.out / "scores" / f"{name}.npy", scores)
    lds = linear_datamodeling_score(scores, masks, actual, n_bootstrap=config.n_bootstrap, seed=config.seed)
    lds_warm = None if warm is None else linear_datamodeling_score(scores, masks, warm, n_bootstrap=0).lds
    mislabel: dict[str, Any] = {"mislabel_auc": None}
    if ensemble:
        mislabel["mislabel_skipped"] = "ensembles: would need ensemble_size models trained on the flipped labels"
    elif method.mislabel_skipped is not None and network.objective.dim > SELF_INFLUENCE_MAX_DIM:
        mislabel["mislabel_skipped"] = method.mislabel_skipped
    else:
        t = time.perf_counter()
        mislabel = mislabel_detection(method.build(noisy, chosen, config).self_scores(), flipped).as_dict()
        mislabel["mislabel_seconds"] = time.perf_counter() - t
        noisy.objective._matrix, noisy.fits = None, {}
    settings = dict(chosen)
    if ensemble:
        settings.update(members=len(members), method=base)
    return {**lds.as_dict(), "lds_warm": lds_warm, "loo_pearson": None, **mislabel, "seconds": seconds,
            "peak_mb": memory.mb, "settings": settings, "tuning": tuning, "tuning_seconds": tuning_seconds}


def _ensemble_trak(members: list[Network], chosen: dict, config, tests, val_tests, val_masks, actual_val):
    """TRAK over the members (kernels and Q averaged apart), its ridge chosen on held-out data *for the ensemble*.

    A single model's held-out LDS (about 0.1) cannot tell the dampings apart; the ensemble's can, and
    each member's eigendecomposition serves every damping of the grid, so the choice costs only the
    held-out scores. k is the base method's choice. Returns (scores, setting, tuning records).
    """
    dampings = sorted({s["relative_damping"] for s in METHODS["trak"].grid})
    parts: dict[float, dict[str, list[TRAKScores]]] = {d: {"test": [], "val": []} for d in dampings}
    failed: dict[float, str] = {}
    for member in members:  # one member's features in memory at a time
        scorer = NetworkTRAKScorer(member, chosen, config)
        phi = {"test": scorer.trak.test_features(tests), "val": scorer.trak.test_features(val_tests)}  # shared by every damping
        for d in dampings:
            if d in failed:
                continue
            try:
                trak = TRAK(scorer.trak.objective, features=scorer.trak.features, relative_damping=d)
            except ValueError as error:
                failed[d] = str(error).splitlines()[0]
                continue
            for split in ("test", "val"):
                parts[d][split].append(trak.scores_of_features(phi[split]))
        if member is not members[0]:
            member.objective._matrix, member.fits = None, {}
    tuning = [{"setting": {**chosen, "relative_damping": d}, "val_lds": None, "error": failed[d]} if d in failed else
              {"setting": {**chosen, "relative_damping": d}, "members": len(members),
               "val_lds": linear_datamodeling_score(ensemble_scores(parts[d]["val"]).loss_sign.numpy(), val_masks, actual_val,
                                                    n_bootstrap=0).lds}
              for d in dampings]
    scored = [t for t in tuning if t["val_lds"] is not None]
    if not scored:
        raise ValueError(f"every damping failed for ensemble-trak: {failed}")
    best = max(scored, key=lambda t: t["val_lds"])["setting"]
    return ensemble_scores(parts[best["relative_damping"]]["test"]).loss_sign.numpy(), best, tuning


def _write(config, workload: NetworkWorkload, results, baseline, context, final=False) -> dict:
    document = {
        "workload": config.workload,
        "model": workload.description,
        "methods": results,
        "baseline_training_loss": baseline,
        "output_function": "test cross-entropy loss in eval mode (what the model minimises and influence functions linearise)",
        "retrain": {"protocol": "each subset trained from scratch with a fresh seed (initialisation, data order, dropout: "
                                "TRAK/dattri); lds_warm: the same subsets trained warm_epochs epochs from theta_hat",
                    "sgd": workload.sgd.as_dict(), "warm_epochs": config.warm_epochs,
                    "scratch_seconds": context["scratch_seconds"], "warm_seconds": context["warm_seconds"],
                    "full_models_seconds": context["train_seconds"]},
        "test_accuracy": context["test_accuracy"],
        "parameters": context["parameters"],
        "not_run": workload.not_run,
        "sign_convention": "scores = I_up,loss = effect of including a training point on the test loss",
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in asdict(config).items()},
        "total_seconds": time.perf_counter() - context["start"],
        "complete": final,
    }
    atomic_write(config.out / "results.json", json.dumps(document, indent=2))
    atomic_write(config.out / "results.md", markdown_table(document))
    if final:
        _plot(config.out / "lds.png", document)
    return document
