"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") for classifiers.

For one trained model with parameters theta (p of them) and n training points:

* output function: the classification margin f(z) = log p_y(z) - log(1 - p_y(z))
  = z_y - logsumexp_{c != y} z_c (logits z, label y), TRAK's choice for classification
  (:func:`classification_margin`); the cross-entropy is l = log(1 + exp(-f)), a strictly
  decreasing function of f.
* features: per-example margin gradients projected by a seeded Gaussian matrix
  P (p, k) with entries N(0, 1/k), so <P^T g, P^T g'> ~= <g, g'> (Johnson-Lindenstrauss):
  phi(z) = P^T grad_theta f(z) (k,), Phi (n, k) the training features. P is built in
  tiles of ``PROJECTION_TILE`` (rows, columns), tile (r, c) from its own generator seeded
  by (seed, r, c), so P depends only on (p, seed) and each column on nothing but its
  index: the first k columns of a wider projection, times sqrt(k' / k), are the
  k-projection (:meth:`TRAKFeatures.narrow`). Gradients are projected ``rows`` examples at
  a time: the (n, p) gradient matrix is never formed; P (p x k floats) is.
* loss-to-output weights: Q = diag(1 - p_{y_i}(z_i)) = diag(sigmoid(-f_i)), -dl/df at z_i.
* scores (TRAK's estimator, eq. 15 of the paper, with a ridge term):

      tau(z, i) = phi(z)^T (Phi^T Phi + lambda I)^{-1} phi_i (1 - p_i),      (m, n)

  lambda = ``relative_damping`` * tr(Phi^T Phi) / k (a fraction of the mean eigenvalue, so the
  same setting means the same thing at every k, model and gradient scale).

Sign and scale. tau(z, i) is the one-Newton-step prediction of how much *including* z_i
raises the test margin f(z) of the linearised model trained with the logistic loss in f,
with the Gauss-Newton matrix sum_i p_i(1 - p_i) grad f_i grad f_i^T replaced by Phi^T Phi
(TRAK drops the weights): training gradient g_i = -(1 - p_i) grad f_i, so
tau(z, i) = -grad f(z)^T H^{-1} g_i with H = Phi^T Phi (a sum, not a mean). Positive tau =
helpful (raises the margin). In the library's convention, I_up = -g_test^T H_mean^{-1} g_i,
H_mean = H / n: tau = -(1/n) I_up,margin = the predicted effect on the margin of including z_i
(minus its predicted removal effect). For the test *loss*, which decreases strictly with the
margin, :attr:`TRAKScores.loss_sign` = -tau has the sign of I_up,loss (negative = helpful),
and the linear datamodeling score (per-test Spearman over subsets) of -tau against retrained
test losses equals that of tau against retrained test margins exactly, since ranks survive
a strictly decreasing map.

TRAK over an ensemble of M independently trained models (:func:`ensemble_scores`, the
paper's estimator): the mean over models of phi_m(z)^T (Phi_m^T Phi_m + lambda I)^{-1} Phi_m^T,
times the mean of the Q_m (``ensemble-trak`` of ``influencekit evaluate``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from influencekit.data import Batch, batch_size, index_batch
from influencekit.losses import batch_targets
from influencekit.objectives.torch_objective import TorchObjective

#: (parameter rows, feature columns) of each independently seeded tile of the projection.
PROJECTION_TILE = (4096, 256)


def classification_margin(outputs: Tensor, batch: Batch) -> Tensor:
    """f = log p_y - log(1 - p_y) = z_y - logsumexp_{c != y} z_c per example: logits (B, C) -> (B,)."""
    targets = batch_targets(batch)
    classes = torch.arange(outputs.shape[-1], device=outputs.device)
    correct = classes[None, :] == targets[:, None]
    others = torch.where(correct, torch.full_like(outputs, float("-inf")), outputs)
    return (outputs * correct).sum(dim=1) - torch.logsumexp(others, dim=1)


def gaussian_projection(dim: int, k: int, *, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """P (dim, k) with independent N(0, 1/k) entries, tile by tile (see the module docstring).

    Deterministic in (dim, seed); column j does not depend on k: ``gaussian_projection(p, k, seed=s)``
    equals ``gaussian_projection(p, K, seed=s)[:, :k] * sqrt(K / k)`` for k <= K.
    """
    if dim < 1 or k < 1:
        raise ValueError(f"need dim >= 1 and k >= 1, got dim = {dim}, k = {k}")
    tile_rows, tile_columns = PROJECTION_TILE
    drawn = torch.float64 if dtype == torch.float64 else torch.float32  # half precisions: drawn in float32, rounded once
    matrix = torch.empty(dim, k, dtype=dtype)
    for r, row in enumerate(range(0, dim, tile_rows)):
        for c, column in enumerate(range(0, k, tile_columns)):
            state = np.random.SeedSequence((seed, r, c)).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
            tile = torch.empty(tile_rows, tile_columns, dtype=drawn).normal_(generator=generator).mul_(k**-0.5)
            block = matrix[row : row + tile_rows, column : column + tile_columns]
            block.copy_(tile[: block.shape[0], : block.shape[1]])
    return matrix


def margin_objective(model: nn.Module, train_data: Batch, *, chunk_size: int = 500) -> TorchObjective:
    """The model's objective (cross-entropy) with the margin as its measurement: what TRAK differentiates."""
    return TorchObjective(model, "cross_entropy", train_data, measurement=classification_margin, chunk_size=chunk_size, hvp_cache_mb=0)


def project_margins(objective: TorchObjective, batch: Batch, projection: Tensor, *, rows: int = 500) -> tuple[Tensor, Tensor]:
    """(phi (B, k) float64, margins f (B,) float64) of a batch: margin gradients times P, ``rows`` at a time.

    The product is taken in P's dtype (the gradients are rounded to it), e.g. bfloat16 (see :meth:`TRAKFeatures.compute`).
    """
    n = batch_size(batch)
    features = torch.empty(n, projection.shape[1], dtype=torch.float64)
    for start in range(0, n, rows):
        chunk = index_batch(batch, slice(start, start + rows))
        features[start : start + rows] = (objective.measurement_gradients(chunk).to(projection.dtype) @ projection).double()
    return features, objective.measurement_values(batch).double()


@dataclass(frozen=True)
class TRAKFeatures:
    """One model's training features, its projection, and the eigendecomposition TRAK solves with.

    Attributes:
        train: Phi, projected training margin gradients, (n, k) float64.
        out_to_loss: 1 - p_{y_i} = sigmoid(-f_i), (n,) float64: the diagonal of Q.
        projection: P, (p, k), in the projection dtype (the model's unless chosen).
        seed: the projection's seed.
        seconds: time to compute ``train``.
    """

    train: Tensor
    out_to_loss: Tensor
    projection: Tensor = field(repr=False)
    seed: int
    seconds: float

    @classmethod
    def compute(cls, objective: TorchObjective, k: int, *, seed: int = 0, rows: int = 500,
                projection_dtype: torch.dtype | None = None) -> "TRAKFeatures":
        """Project the margin gradients of every training point of ``objective`` (see :func:`margin_objective`).

        ``projection_dtype``: the dtype of P and of the product G P (None: the model's). ``torch.bfloat16``
        rounds each entry of P and of the gradients to 8 significant bits (relative error <= 2^-8) and
        accumulates in float32: an error far below the projection's own distortion of about 1 / sqrt(k), as
        in TRAK's implementation, which projects in float16. Where the CPU multiplies bfloat16 natively
        (AVX512-BF16 or AMX) the product, TRAK's largest cost, is about 3.7x faster than in float32.
        """
        if objective.measurement is not classification_margin:
            raise ValueError("TRAK needs the margin as the objective's measurement: build it with margin_objective(model, data)")
        start = time.perf_counter()
        projection = gaussian_projection(objective.dim, k, seed=seed, dtype=projection_dtype or objective.dtype)
        train, margins = project_margins(objective, objective.train.materialize(), projection, rows=rows)
        return cls(train, torch.sigmoid(-margins), projection, seed, time.perf_counter() - start)

    @property
    def k(self) -> int:
        return self.train.shape[1]

    def narrow(self, k: int) -> "TRAKFeatures":
        """The features of the k-column projection with the same seed (k <= self.k), without recomputing gradients."""
        if not 1 <= k <= self.k:
            raise ValueError(f"can narrow {self.k} features to 1..{self.k}, not {k}")
        scale = (self.k / k) ** 0.5
        return TRAKFeatures(self.train[:, :k] * scale, self.out_to_loss, self.projection[:, :k] * scale, self.seed, self.seconds)

    @functools.cached_property
    def spectrum(self) -> tuple[Tensor, Tensor, Tensor]:
        """Phi^T Phi = V diag(e) V^T (float64): e (k,) ascending, V (k, k), Phi V (n, k); shared by every damping."""
        eigenvalues, vectors = torch.linalg.eigh(self.train.T @ self.train)
        return eigenvalues, vectors, self.train @ vectors


@dataclass(frozen=True)
class TRAKScores:
    """TRAK scores of m test points against n training points.

    Attributes:
        kernel: phi(z)^T (Phi^T Phi + lambda I)^-1 phi_i, (m, n) float64.
        out_to_loss: Q's diagonal 1 - p_i, (n,) float64.
        damping: the absolute lambda added to Phi^T Phi (nan for an ensemble: one per model).
        seconds: time to form the scores from the test features.
    """

    kernel: Tensor
    out_to_loss: Tensor
    damping: float
    seconds: float

    @property
    def margin_effect(self) -> Tensor:
        """tau = kernel Q (m, n): predicted rise of the test margin from including z_i (TRAK's sign: positive = helpful)."""
        return self.kernel * self.out_to_loss[None, :]

    @property
    def loss_sign(self) -> Tensor:
        """-tau: the sign of I_up,loss (negative = helpful), what :func:`linear_datamodeling_score` of test losses takes."""
        return -self.margin_effect


def ensemble_scores(members: Sequence[TRAKScores]) -> TRAKScores:
    """TRAK over M models (eq. 17 of the paper): tau = (1/M sum_m kernel_m) (1/M sum_m Q_m).

    The kernels and the loss-to-output weights are averaged separately, not their products: on
    mnist-mlp (10 models, benchmarks/RESULTS.md) this gave LDS 0.286 against 0.237 for the mean of the per-model tau.
    """
    if not members:
        raise ValueError("need at least one model's TRAKScores")
    kernel = torch.stack([m.kernel for m in members]).mean(0)
    weights = torch.stack([m.out_to_loss for m in members]).mean(0)
    damping = members[0].damping if len(members) == 1 else float("nan")
    return TRAKScores(kernel, weights, damping, sum(m.seconds for m in members))


class TRAK:
    """TRAK on one trained classifier (see the module docstring for the maths and the sign).

    Args:
        objective: from :func:`margin_objective` (model in eval mode, its training data).
        projection_dim: k.
        seed: of the projection.
        relative_damping: lambda / (tr(Phi^T Phi) / k); 0 is TRAK's default and needs Phi of rank k.
        rows: examples per projected block of gradients (memory: rows x p floats).
        projection_dtype: of P and the product G P (None: the model's; see :meth:`TRAKFeatures.compute`).
        features: precomputed :class:`TRAKFeatures` of this objective (then ``projection_dim`` and
            ``seed`` are theirs).
    """

    def __init__(self, objective: TorchObjective, *, projection_dim: int = 2048, seed: int = 0, relative_damping: float = 0.0,
                 rows: int = 500, projection_dtype: torch.dtype | None = None, features: TRAKFeatures | None = None):
        if relative_damping < 0:
            raise ValueError(f"relative_damping must be >= 0, got {relative_damping}")
        self.objective, self.rows = objective, rows
        self.features = features if features is not None else TRAKFeatures.compute(
            objective, projection_dim, seed=seed, rows=rows, projection_dtype=projection_dtype)
        eigenvalues = self.features.spectrum[0]
        mean = float(eigenvalues.sum()) / self.features.k
        self.damping = relative_damping * mean
        smallest = float(eigenvalues[0]) + self.damping
        if smallest <= 1e-12 * float(eigenvalues[-1]):
            suggested = max(1e-6, 2 * abs(float(eigenvalues[0])) / mean)
            raise ValueError(
                f"Phi^T Phi + lambda I is singular (smallest eigenvalue {smallest:.3g}, largest {float(eigenvalues[-1]):.3g}): "
                f"the {self.features.train.shape[0]} training features do not span k = {self.features.k} dimensions; "
                f"pass relative_damping >= {suggested:.1g} or a projection_dim <= the rank of Phi")

    def scores(self, tests: Batch) -> TRAKScores:
        """tau (m, n) for a batch of m test points (their margin gradients projected by the same P)."""
        return self.scores_of_features(self.test_features(tests))

    def test_features(self, tests: Batch) -> Tensor:
        """phi (m, k) float64: the tests' margin gradients projected by this model's P (reusable across dampings)."""
        return project_margins(self.objective, tests, self.features.projection, rows=self.rows)[0]

    def scores_of_features(self, phi: Tensor) -> TRAKScores:
        """tau (m, n) for test features phi (m, k) from :meth:`test_features` of a TRAK on the same features."""
        start = time.perf_counter()
        eigenvalues, vectors, rotated = self.features.spectrum
        coefficients = (phi @ vectors) / (eigenvalues + self.damping)  # phi^T V diag(1 / (e + lambda))
        return TRAKScores(coefficients @ rotated.T, self.features.out_to_loss, self.damping, time.perf_counter() - start)
