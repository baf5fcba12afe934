"""Many softmax regressions at once: one Newton-CG fit per training subset, sharing every pass over the data.

Model j minimises R_j(W_j) = sum_i w_ji CE(x_i W_j^T, y_i) + (lambda/2) ||W_j||^2
with sample weights w_ji = mask_ji / |S_j| (the mean cross-entropy over subset
S_j, the objective of :func:`~influencekit.objectives.softmax_regression.fit_softmax_regression`
on that subset). The logits of k models are one product X [W_1; ...; W_k]^T
(n x kC), and so are their gradients and Hessian-vector products
(see :mod:`influencekit.objectives.softmax_regression` for the formulas), so k fits
cost about as many GEMM passes as one fit, each with k C columns instead of C.

Each model runs its own Newton-CG: CG on H_j s = -g_j to relative tolerance
min(0.1, sqrt ||g_j||), an Armijo backtracking line search on R_j, and stops when
||grad R_j|| <= tol (RuntimeError when any model does not get there).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from influencekit.linalg import transposed_product
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective


@dataclass(frozen=True)
class SoftmaxBatchFit:
    """k fitted models: ``weights`` (k, C, d), ``gradient_norms`` (k,), ``newton_steps`` (k,), ``cg_iterations`` (k,)."""

    weights: Tensor
    gradient_norms: Tensor
    newton_steps: Tensor
    cg_iterations: Tensor


class _WeightedSoftmax:
    """Values, gradients and Hessian-vector products of k weighted softmax objectives."""

    def __init__(self, inputs: Tensor, targets: Tensor, sample_weights: Tensor, weight_decay: float):
        self.x, self.y, self.w, self.weight_decay = inputs, targets, sample_weights, weight_decay  # w: (n, k)
        self.rows = torch.arange(len(targets))

    def _logits(self, weights: np.ndarray) -> np.ndarray:
        """X [W_1; ...; W_k]^T as (n, k, C) for weights (k, C, d) (one OpenBLAS GEMM)."""
        k, c, d = weights.shape
        return (self.x.numpy() @ weights.reshape(k * c, d).T).reshape(-1, k, c)

    def _back(self, per_row: np.ndarray) -> np.ndarray:
        """sum_i per_row[i, j] x_i^T: (n, k, C) -> (k, C, d)."""
        n, k, c = per_row.shape
        return transposed_product(per_row.reshape(n, k * c), self.x.numpy()).reshape(k, c, -1)

    def values(self, weights: Tensor, models: Tensor) -> Tensor:
        log_probs = torch.log_softmax(torch.from_numpy(self._logits(weights.numpy())), dim=2)
        ce = -log_probs[self.rows, :, self.y]  # (n, k)
        return (self.w[:, models] * ce).sum(0) + 0.5 * self.weight_decay * (weights**2).sum((1, 2))

    def gradients(self, weights: Tensor, models: Tensor) -> tuple[Tensor, Tensor]:
        """(grad R_j (k, C, d), probabilities (n, k, C)) for the models ``models``."""
        probs = torch.softmax(torch.from_numpy(self._logits(weights.numpy())), dim=2)
        residuals = probs.clone()
        residuals[self.rows, :, self.y] -= 1.0
        return torch.from_numpy(self._back((residuals * self.w[:, models, None]).numpy())) + self.weight_decay * weights, probs

    def hvp(self, probs: np.ndarray, vectors: np.ndarray, models: np.ndarray) -> np.ndarray:
        """Rows H_j v_j, vectors (k, C, d), probabilities (n, k, C)."""
        curved = SoftmaxRegressionObjective._curvature_apply(probs, self._logits(vectors))
        curved *= self.w.numpy()[:, models, None]
        image = self._back(curved)
        image += self.weight_decay * vectors
        return image

    def cg(self, probs: Tensor, rhs: Tensor, models: Tensor, rtol: Tensor, maxiter: int) -> tuple[Tensor, Tensor]:
        """Solve H_j s_j = rhs_j for each model by CG (each to ||r_j|| <= rtol_j ||rhs_j||); returns (s, iterations).

        The loop runs in numpy: torch operations between the OpenBLAS products would make the two
        libraries' thread pools spin against each other (10 fits of MNIST halves: 58 s in torch, 23 s in
        numpy, on 2 shared cores).
        """
        probs_np, models_np = probs.numpy(), models.numpy()
        solution = np.zeros_like(rhs.numpy())
        residual, direction = rhs.numpy().copy(), rhs.numpy().copy()
        squared = (residual**2).sum((1, 2))
        target = (rtol.numpy() * np.sqrt(squared)) ** 2
        iterations = np.zeros(len(models_np), dtype=np.int64)
        for _ in range(maxiter):
            active = np.flatnonzero(squared > target)
            if len(active) == 0:
                break
            moving = direction[active]
            image = self.hvp(probs_np[:, active], moving, models_np[active])
            alpha = (squared[active] / (moving * image).sum((1, 2)))[:, None, None]
            solution[active] += alpha * moving
            residual[active] -= alpha * image
            new_squared = (residual[active] ** 2).sum((1, 2))
            direction[active] = residual[active] + (new_squared / squared[active])[:, None, None] * moving
            squared[active] = new_squared
            iterations[active] += 1
        return torch.from_numpy(solution), torch.from_numpy(iterations)


def fit_softmax_regression_subsets(
    inputs: Tensor,
    targets: Tensor,
    weight_decay: float,
    masks: Tensor,
    num_classes: int,
    *,
    tol: float = 1e-10,
    initial: Tensor | None = None,
    max_newton_steps: int = 100,
    cg_maxiter: int = 500,
) -> SoftmaxBatchFit:
    """Fit one softmax regression per row of ``masks`` (k, n) bool, each to ||grad R_j|| <= ``tol``.

    Args:
        inputs, targets: the full training set X (n, d) and labels (n,).
        weight_decay: lambda > 0.
        masks: training subsets, (k, n) bool, each non-empty.
        num_classes: C.
        initial: starting weights (k, C, d) or (C, d) for all; default zeros.
    """
    if weight_decay <= 0:
        raise ValueError("weight_decay must be > 0 for a unique optimum")
    masks = torch.as_tensor(masks, dtype=torch.bool)
    counts = masks.sum(1)
    if masks.dim() != 2 or masks.shape[1] != len(targets) or bool((counts == 0).any()):
        raise ValueError(f"masks must be (k, n = {len(targets)}) with no empty row, got shape {tuple(masks.shape)}")
    k = masks.shape[0]
    problem = _WeightedSoftmax(inputs, targets.long(), (masks.T.to(inputs.dtype) / counts.to(inputs.dtype)), weight_decay)
    shape = (k, num_classes, inputs.shape[1])
    weights = torch.zeros(shape, dtype=inputs.dtype) if initial is None else initial.to(inputs.dtype).expand(shape).clone()
    steps = torch.zeros(k, dtype=torch.long)
    cg_total = torch.zeros(k, dtype=torch.long)
    norms = torch.full((k,), float("inf"), dtype=inputs.dtype)
    everyone = torch.arange(k)
    for step in range(max_newton_steps + 1):
        gradients, probs = problem.gradients(weights, everyone)
        norms = gradients.reshape(k, -1).norm(dim=1)
        active = torch.nonzero(norms > tol).reshape(-1)
        if len(active) == 0 or step == max_newton_steps:
            break
        gradients, probs, active_norms = gradients[active], probs[:, active], norms[active]
        rtol = torch.clamp(active_norms.sqrt(), max=0.1)
        direction, iterations = problem.cg(probs, -gradients, active, rtol, cg_maxiter)
        cg_total[active] += iterations
        value = problem.values(weights[active], active)
        slope = (gradients * direction).sum((1, 2))
        alpha = torch.ones(len(active), dtype=inputs.dtype)
        pending = torch.arange(len(active))
        while len(pending):
            trial = problem.values(weights[active[pending]] + alpha[pending, None, None] * direction[pending], active[pending])
            accepted = (trial <= value[pending] + 1e-4 * alpha[pending] * slope[pending]) | (active_norms[pending] < 1e-6)
            accepted |= alpha[pending] <= 1e-10
            pending = pending[~accepted]
            alpha[pending] /= 2
        weights[active] += alpha[:, None, None] * direction
        steps[active] += 1
    if bool((norms > tol).any()):
        raise RuntimeError(
            f"{int((norms > tol).sum())} of {k} fits stopped at ||grad R|| up to {float(norms.max()):.3g} > tol = {tol:g} "
            f"after {max_newton_steps} Newton steps; raise max_newton_steps or tol"
        )
    return SoftmaxBatchFit(weights, norms, steps, cg_total)


class SoftmaxSubsetTrainer:
    """A :class:`~influencekit.evaluation.retrain.SubsetTrainer` for softmax regression: outputs = test losses.

    ``trainer(masks)`` fits one model per mask with :func:`fit_softmax_regression_subsets`
    and returns the cross-entropy of each test point under each model, shape (k, m).

    Protocol: ``initial=None`` trains *from scratch*: every subset starts from its own
    random W ~ N(0, 0.01^2) seeded by the subset's content (the field's fresh-seed
    protocol, reproducible). R_j is strictly convex (lambda > 0), so every start
    reaches the same optimum, to ``tol``. ``initial=W_hat`` warm-starts from the
    full-data optimum instead.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, test_inputs: Tensor, test_targets: Tensor, weight_decay: float,
                 num_classes: int, *, tol: float = 1e-10, initial: Tensor | None = None):
        self.inputs, self.targets = inputs, targets
        self.test_inputs, self.test_targets = test_inputs, test_targets
        self.weight_decay, self.num_classes, self.tol, self.initial = weight_decay, num_classes, tol, initial

    def _fresh_starts(self, masks: np.ndarray) -> Tensor:
        shape = (self.num_classes, self.inputs.shape[1])
        starts = []
        for mask in masks:
            entropy = int.from_bytes(hashlib.sha256(np.packbits(mask).tobytes()).digest()[:8], "little")
            generator = torch.Generator().manual_seed(entropy)
            starts.append(0.01 * torch.randn(shape, generator=generator, dtype=self.inputs.dtype))
        return torch.stack(starts)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        initial = self._fresh_starts(masks) if self.initial is None else self.initial
        fit = fit_softmax_regression_subsets(self.inputs, self.targets, self.weight_decay, torch.from_numpy(masks),
                                             self.num_classes, tol=self.tol, initial=initial)
        log_probs = torch.log_softmax(self.test_inputs @ fit.weights.transpose(1, 2), dim=2)  # (k, m, C)
        return (-log_probs[:, torch.arange(len(self.test_targets)), self.test_targets]).numpy()
