"""Multinomial logistic regression without bias, with every quantity in closed form.

Model: logits = x W^T with W of shape (C, d), theta = W.reshape(-1) (row-major,
the layout of ``nn.Linear(d, C, bias=False).weight``). Loss: cross-entropy.
Objective R(W) = (1/n) sum_i CE(x_i W^T, y_i) + (lambda/2) ||W||^2.

With p_i = softmax(x_i W^T) and e_y the one-hot target:
  per-example gradient   (p_i - e_{y_i}) x_i^T                          (C, d)
  per-example Hessian    (diag(p_i) - p_i p_i^T) kron x_i x_i^T
  Hessian-vector product for V (C, d):  u_i = V x_i,  r_i = p_i * u_i - p_i (p_i . u_i),
                                        H V = (1/n) sum_i r_i x_i^T + lambda V.
These match :class:`influencekit.objectives.TorchObjective` on
``nn.Linear(d, C, bias=False)`` with cross-entropy (tested), and are far faster:
full-data passes are GEMMs, and many vectors go through one pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg.blas
import torch
from torch import Tensor

from influencekit.checks import check_finite_batch, check_labels, check_not_empty
from influencekit.data import Batch
from influencekit.linalg import check_directions, check_mini_batches, matmul, transposed_product
from influencekit.losses import batch_inputs, batch_targets


class SoftmaxRegressionObjective:
    """Closed-form :class:`~influencekit.objectives.Objective` for softmax regression.

    Args:
        weights: W, shape (C, d).
        inputs: training inputs X, shape (n, d), same dtype as W.
        targets: class indices, shape (n,).
        weight_decay: lambda of (lambda/2)||W||^2.
        chunk_size: rows per chunk of full-data passes (bounds temporary memory).
    """

    def __init__(self, weights: Tensor, inputs: Tensor, targets: Tensor, weight_decay: float, chunk_size: int = 1024):
        if weights.dim() != 2 or inputs.dim() != 2 or inputs.shape[1] != weights.shape[1]:
            raise ValueError(f"need W (C, d) and X (n, d), got {tuple(weights.shape)} and {tuple(inputs.shape)}")
        if targets.shape != (inputs.shape[0],):
            raise ValueError(f"targets must have shape ({inputs.shape[0]},), got {tuple(targets.shape)}")
        check_not_empty(inputs.shape[0], "training data")
        check_finite_batch((inputs, targets), "training data")
        check_labels(targets, weights.shape[0], "training data", 0)
        self.weights = weights.detach()
        self.inputs = inputs.to(weights.dtype)
        self.targets = targets.long()
        self.weight_decay = float(weight_decay)
        self.n_train = inputs.shape[0]
        self.num_classes, self.num_features = weights.shape
        self.chunk_size = chunk_size
        self._probs: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.weights.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    def parameters_vector(self) -> Tensor:
        return self.weights.reshape(-1)

    @property
    def probs(self) -> Tensor:
        """Softmax probabilities of the training set, shape (n, C) (cached)."""
        if self._probs is None:
            self._probs = torch.softmax(matmul(self.inputs, self.weights.T), dim=1)
        return self._probs

    def _residuals(self, rows: slice | Tensor) -> Tensor:
        probs = self.probs[rows].clone()
        probs[torch.arange(probs.shape[0]), self.targets[rows]] -= 1.0
        return probs

    def _as_matrices(self, vectors: Tensor) -> Tensor:
        return check_directions(vectors, self.dim).to(self.dtype).reshape(-1, self.num_classes, self.num_features)

    def _chunks(self):
        for start in range(0, self.n_train, self.chunk_size):
            yield slice(start, start + self.chunk_size)

    def objective_value(self) -> float:
        log_probs = torch.log_softmax(matmul(self.inputs, self.weights.T), dim=1)
        ce = -log_probs[torch.arange(self.n_train), self.targets].mean()
        return float(ce) + 0.5 * self.weight_decay * float((self.weights**2).sum())

    def objective_gradient(self) -> Tensor:
        grad_w = matmul(self._residuals(slice(None)).T, self.inputs) / self.n_train + self.weight_decay * self.weights
        return grad_w.reshape(-1)

    def train_gradients(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1)
        res = self._residuals(indices)
        grads = res.unsqueeze(2) * self.inputs[indices].unsqueeze(1)
        return grads.reshape(len(indices), -1) + self.weight_decay * self.parameters_vector()

    def train_gradient_dots(self, directions: Tensor) -> Tensor:
        v = self._as_matrices(directions)  # (k, C, d)
        k = v.shape[0]
        out = torch.empty(k, self.n_train, dtype=self.dtype)
        flat = v.reshape(k * self.num_classes, self.num_features)
        for rows in self._chunks():
            projected = matmul(self.inputs[rows], flat.T).reshape(-1, k, self.num_classes)  # (m, k, C): V_j x_i
            out[:, rows] = torch.einsum("mkc,mc->km", projected, self._residuals(rows))
        return out + self.weight_decay * (v.reshape(k, -1) @ self.parameters_vector()).unsqueeze(1)

    def measurement_gradients(self, batch: Batch) -> Tensor:
        x = batch_inputs(batch).to(self.dtype).reshape(-1, self.num_features)
        y = batch_targets(batch).long()
        res = torch.softmax(x @ self.weights.T, dim=1)
        res[torch.arange(len(y)), y] -= 1.0
        return (res.unsqueeze(2) * x.unsqueeze(1)).reshape(len(y), -1)

    def measurement_values(self, batch: Batch) -> Tensor:
        x = batch_inputs(batch).to(self.dtype).reshape(-1, self.num_features)
        y = batch_targets(batch).long()
        return -torch.log_softmax(x @ self.weights.T, dim=1)[torch.arange(len(y)), y]

    @staticmethod
    def _curvature_apply(probs, projected):
        """r = p * u - p (p . u) for u = projected (..., C) and p = probs broadcast (tensors or numpy arrays)."""
        weighted = probs * projected
        return weighted - probs * weighted.sum(-1)[..., None]

    def hvp(self, vectors: Tensor) -> Tensor:
        # The loop stays in numpy: OpenBLAS is faster here than torch's MKL
        # (influencekit.linalg), and torch ops between the products would make
        # the two libraries' thread pools spin against each other.
        v = self._as_matrices(vectors)
        k, c = v.shape[0], self.num_classes
        flat = v.reshape(k * c, self.num_features).numpy()
        inputs, probs = self.inputs.numpy(), self.probs.numpy()
        total = np.zeros((k * c, self.num_features), dtype=inputs.dtype)
        for rows in self._chunks():
            x = inputs[rows]
            r = self._curvature_apply(probs[rows][:, None, :], (x @ flat.T).reshape(-1, k, c))
            total += transposed_product(r.reshape(-1, k * c), x)
        hv = torch.from_numpy(total).reshape(k, -1) / self.n_train
        return hv + self.weight_decay * v.reshape(k, -1)

    def sampled_hvp(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Rows (H_{B_j} + lambda I) v_j, H_B = (1/B) sum_{i in B} hess l_i; vectors (k, p) -> (k, p).

        ``indices`` (g, B) (see :func:`~influencekit.linalg.check_mini_batches`): the m = k / g
        rows of group a share the mini-batch indices[a] = {x_i}, so each group is two GEMMs,
        U = X_B [V_1; ...; V_m]^T ((B, m C): u_ij = V_j x_i) and (1/B) R^T X_B with
        r_ij = p_i * u_ij - p_i (p_i . u_ij), about 4 B d k C flops in all. One batch for many
        rows (LiSSA with many right-hand sides) thus never copies the inputs per row. In numpy
        between the OpenBLAS products, as in :meth:`hvp`.
        """
        v = self._as_matrices(vectors)  # (k, C, d)
        k, c, d = v.shape
        batches = check_mini_batches(indices, k, expand=False).numpy()  # (g, B)
        g, b = batches.shape
        x = self.inputs.numpy()[batches]  # (g, B, d)
        projected = (x @ v.reshape(g, -1, d).numpy().transpose(0, 2, 1)).reshape(g, b, -1, c)  # (g, B, m, C)
        r = self._curvature_apply(self.probs.numpy()[batches][:, :, None, :], projected) / b
        hv = torch.from_numpy(r.reshape(g, b, -1).transpose(0, 2, 1) @ x)  # (g, m C, d)
        # the (k, p) block is the large operand: add lambda v in place, one pass
        return hv.reshape(k, -1).add_(v.reshape(k, -1), alpha=self.weight_decay)

    def hessian(self, chunk_size: int = 4096) -> Tensor:
        """Explicit Hessian (p, p), p = C d.

        Block (a, b) (rows a d .. (a+1) d) is X^T diag(w_ab) X / n + lambda [a = b] I with
        w_aa = p_a (1 - p_a) and w_ab = -p_a p_b. Each of the C (C - 1) / 2 off-diagonal
        blocks is one symmetric rank-n update (BLAS syrk) of the rows of X scaled by
        sqrt(p_a p_b): half the work of a general product. The diagonal blocks need no
        pass: since sum_b p_b = 1, sum_b w_ab = 0, so block (a, a) = -sum_{b != a} block (a, b).
        Cost O(n d^2 C^2 / 4).
        """
        c, d = self.num_classes, self.num_features
        syrk = scipy.linalg.blas.dsyrk if self.dtype == torch.float64 else scipy.linalg.blas.ssyrk
        h = np.zeros((c * d, c * d), dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        x_all, p_all = self.inputs.numpy(), self.probs.numpy()

        def block(a: int, b: int) -> tuple[slice, slice]:
            return np.s_[a * d : (a + 1) * d, b * d : (b + 1) * d]

        for a in range(c):
            for b in range(a + 1, c):
                upper = np.zeros((d, d), dtype=h.dtype, order="F")
                for start in range(0, self.n_train, chunk_size):
                    p = p_all[start : start + chunk_size]
                    scaled = x_all[start : start + chunk_size] * np.sqrt(p[:, a] * p[:, b])[:, None]
                    # a C-ordered (m, d) array is the F-ordered (d, m) transpose: syrk gives scaled^T scaled
                    upper = syrk(1.0, scaled.T, beta=1.0, c=upper, trans=0, lower=0, overwrite_c=1)
                off_diagonal = -(np.triu(upper) + np.triu(upper, 1).T) / self.n_train
                h[block(a, b)] = off_diagonal
                h[block(b, a)] = off_diagonal
                h[block(a, a)] -= off_diagonal
                h[block(b, b)] -= off_diagonal
        h[np.diag_indices_from(h)] += self.weight_decay
        return torch.from_numpy(h)


@dataclass(frozen=True)
class SoftmaxFit:
    """A fitted softmax regression and the evidence that it is at the optimum.

    Attributes:
        weights: W, shape (C, d).
        gradient_norm: ||grad R(W)|| at the returned W.
        newton_steps: outer Newton iterations.
        cg_iterations: total inner CG iterations (each one Hessian-vector pass).
        seconds: wall time.
    """

    weights: Tensor
    gradient_norm: float
    newton_steps: int
    cg_iterations: int
    seconds: float


def fit_softmax_regression(
    inputs: Tensor,
    targets: Tensor,
    weight_decay: float,
    num_classes: int | None = None,
    *,
    tol: float = 1e-10,
    initial: Tensor | None = None,
    max_newton_steps: int = 100,
    strict: bool = True,
) -> SoftmaxFit:
    """Minimise R(W) = mean CE + (lambda/2)||W||^2 to ||grad R|| <= ``tol`` by Newton-CG.

    Each Newton step solves H s = -g with conjugate gradient (relative tolerance
    min(0.1, sqrt ||g||): superlinear convergence) and backtracks on R.

    With ``strict`` (the default) weight_decay must be > 0 (otherwise the optimum
    may not exist) and RuntimeError is raised if ``tol`` is not reached within
    ``max_newton_steps``. With ``strict=False`` any weight_decay is accepted and
    the iterate where the budget ran out is returned (``max_newton_steps=0``:
    W = 0, or ``initial``); its ``gradient_norm`` says how far from an optimum
    it is, and the caller must check it.
    """
    from influencekit.curvature.hessian import HessianOperator
    from influencekit.solvers.cg import CGSolver

    if strict and weight_decay <= 0:
        raise ValueError("weight_decay must be > 0 for a unique optimum")
    start = time.perf_counter()
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    weights = torch.zeros(num_classes, inputs.shape[1], dtype=inputs.dtype) if initial is None else initial.clone()
    cg_total = 0
    for step in range(max_newton_steps + 1):
        objective = SoftmaxRegressionObjective(weights, inputs, targets, weight_decay)
        gradient = objective.objective_gradient()
        gradient_norm = float(gradient.norm())
        if gradient_norm <= tol:
            return SoftmaxFit(weights, gradient_norm, step, cg_total, time.perf_counter() - start)
        if step == max_newton_steps:
            if not strict:
                return SoftmaxFit(weights, gradient_norm, step, cg_total, time.perf_counter() - start)
            break
        cg = CGSolver(HessianOperator(objective), rtol=min(0.1, gradient_norm**0.5), maxiter=500)
        solve = cg.solve(gradient)
        cg_total += int(solve.iterations[0])
        direction = -solve.solution[0].reshape(weights.shape)
        value, slope, alpha = objective.objective_value(), float(gradient @ direction.reshape(-1)), 1.0
        while alpha > 1e-10:
            candidate = weights + alpha * direction
            trial = SoftmaxRegressionObjective(candidate, inputs, targets, weight_decay).objective_value()
            if trial <= value + 1e-4 * alpha * slope or gradient_norm < 1e-6:
                break  # near the optimum R changes below rounding: take the full Newton step
            alpha /= 2
        weights = weights + alpha * direction
    raise RuntimeError(f"Newton-CG stopped at ||grad R|| = {gradient_norm:.3g} > tol = {tol:g} after {max_newton_steps} steps")
