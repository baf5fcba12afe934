"""Exact leave-one-out refits of softmax regression, many at once.

For each removed index i the refit minimises
    R_{-i}(W) = (1/(n-1)) sum_{j != i} CE_j(W) + (lambda/2) ||W||^2
to ||grad R_{-i}|| <= tol (float64), starting from the full-data optimum W_hat.
The steps are Newton steps with the *fixed* Hessian H of the full objective at
W_hat (its Cholesky factor is computed once). H differs from the Hessian of
R_{-i} at its optimum by the removed point's own curvature and by how far the
optimum moves, both O(1/n): on MNIST each step gains 2-3 digits and 3-4 steps
reach 1e-10. Stopping is decided on the true gradient of R_{-i}, never
on the step, so the reported gradient norm is what every refit achieved.

All refits of a batch share each pass over the data: the logits of m refits are
one product X [W_1; ...; W_m]^T (a GEMM with m C columns), as are their gradients.
The first gradient needs no pass at all: at W_hat,
    grad R_{-i}(W_hat) = (S - r_i x_i^T) / (n - 1) + lambda W_hat,
with S = sum_j r_j x_j^T the summed cross-entropy gradient (computed once per
problem) and r_i = softmax(W_hat x_i) - e_{y_i}.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from influencekit.linalg import cholesky_solve, matmul


@dataclass
class SoftmaxRefitProblem:
    """Everything a worker needs to refit; scattered once to every worker.

    Attributes:
        inputs: X, shape (n, d), float64.
        targets: class indices, shape (n,).
        weight_decay: lambda.
        optimum: W_hat, shape (C, d), the full-data optimum.
        hessian_cholesky: lower Cholesky factor of the full Hessian at W_hat, (C d, C d).
        tol: required ||grad R_{-i}||.
        max_steps: Newton steps allowed per refit before giving up.
        loss_gradient_sum: S = sum_j grad CE_j(W_hat), shape (C, d); derived
            from the fields above, not set by the caller.
    """

    inputs: Tensor
    targets: Tensor
    weight_decay: float
    optimum: Tensor
    hessian_cholesky: Tensor
    tol: float = 1e-10
    max_steps: int = 20
    loss_gradient_sum: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.loss_gradient_sum = _residuals(self.inputs, self.targets, self.optimum).T @ self.inputs

    def save_mapped(self, directory: str | Path) -> "MappedRefitProblem":
        """Write the tensors as raw files in ``directory``; returns the handle that opens them.

        Workers on this machine then map the same pages (no copy per worker, no
        pickling of the ~1 GB of data and Cholesky factor on W1).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"weight_decay": self.weight_decay, "tol": self.tol, "max_steps": self.max_steps, "tensors": {}}
        for name in _MAPPED_TENSORS:
            tensor = getattr(self, name).detach().contiguous()
            tensor.numpy().tofile(directory / f"{name}.bin")
            meta["tensors"][name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        (directory / "problem.json").write_text(json.dumps(meta))
        return MappedRefitProblem(str(directory))


_MAPPED_TENSORS = ("inputs", "targets", "optimum", "hessian_cholesky")


@dataclass(frozen=True)
class MappedRefitProblem:
    """A :class:`SoftmaxRefitProblem` saved by ``save_mapped``: a path, cheap to send to workers."""

    directory: str

    def load(self) -> SoftmaxRefitProblem:
        """The problem with its tensors memory-mapped (copy-on-write; opened once per process)."""
        return _open_mapped(self.directory)


@functools.lru_cache(maxsize=2)
def _open_mapped(directory: str) -> SoftmaxRefitProblem:
    meta = json.loads((Path(directory) / "problem.json").read_text())
    tensors = {}
    for name, spec in meta["tensors"].items():
        size = int(np.prod(spec["shape"]))
        dtype = getattr(torch, spec["dtype"])
        tensors[name] = torch.from_file(str(Path(directory) / f"{name}.bin"), shared=False, size=size, dtype=dtype).reshape(spec["shape"])
    return SoftmaxRefitProblem(weight_decay=meta["weight_decay"], tol=meta["tol"], max_steps=meta["max_steps"], **tensors)


def _residuals(inputs: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """softmax(W x_j) - e_{y_j} for every row of ``inputs``: (n, d) -> (n, C)."""
    residuals = torch.softmax(inputs @ weights.T, dim=1)
    residuals[torch.arange(len(targets)), targets] -= 1.0
    return residuals


def _loo_gradients_at_optimum(problem: SoftmaxRefitProblem, removed: Tensor) -> Tensor:
    """grad R_{-i}(W_hat) for every removed index, without a pass over the data: (m,) -> (m, C, d)."""
    x = problem.inputs[removed]
    own = _residuals(x, problem.targets[removed], problem.optimum)  # (m, C)
    n = problem.inputs.shape[0]
    return (problem.loss_gradient_sum - own.unsqueeze(2) * x.unsqueeze(1)) / (n - 1) + problem.weight_decay * problem.optimum


def _loo_gradients(problem: SoftmaxRefitProblem, weights: Tensor, removed: Tensor) -> Tensor:
    """grad R_{-i}(W_i) for a batch of refits: weights (m, C, d), removed (m,) -> (m, C, d)."""
    x, y = problem.inputs, problem.targets
    m, c, d = weights.shape
    n = x.shape[0]
    logits = matmul(x, weights.reshape(m * c, d).T).reshape(n, m, c)
    residuals = torch.softmax(logits, dim=2)
    residuals[torch.arange(n), :, y] -= 1.0
    summed = matmul(residuals.reshape(n, m * c).T, x).reshape(m, c, d)
    own = residuals[removed, torch.arange(m)]  # (m, C): residual of the removed point under its refit
    summed -= own.unsqueeze(2) * x[removed].unsqueeze(1)
    return summed / (n - 1) + problem.weight_decay * weights


def refit_leave_one_out(problem: SoftmaxRefitProblem, removed_indices: list[int]) -> list[dict]:
    """Refit without each index; returns per index ``weights`` (C, d), ``gradient_norm``, ``steps``.

    Raises RuntimeError if a refit does not reach ``problem.tol`` within ``max_steps``.
    """
    removed = torch.as_tensor(removed_indices, dtype=torch.long)
    m = len(removed)
    c, d = problem.optimum.shape
    weights = problem.optimum.expand(m, c, d).clone()
    steps = torch.zeros(m, dtype=torch.long)
    norms = torch.full((m,), float("inf"), dtype=weights.dtype)
    active = torch.arange(m)
    gradients = _loo_gradients_at_optimum(problem, removed)
    for step in range(problem.max_steps + 1):
        if step > 0:
            gradients = _loo_gradients(problem, weights[active], removed[active])
        norms[active] = gradients.reshape(len(active), -1).norm(dim=1)
        still = norms[active] > problem.tol
        active, gradients = active[still], gradients[still]
        if len(active) == 0:
            break
        newton_step = cholesky_solve(problem.hessian_cholesky, gradients.reshape(len(active), -1))
        weights[active] -= newton_step.reshape(len(active), c, d)
        steps[active] += 1
    if len(active):
        worst = float(norms[active].max())
        raise RuntimeError(f"{len(active)} refit(s) stopped at ||grad|| = {worst:.3g} > tol = {problem.tol:g}")
    return [
        {"weights": weights[j].clone(), "gradient_norm": float(norms[j]), "steps": int(steps[j]), "removed": int(removed[j])}
        for j in range(m)
    ]


def softmax_test_losses(weights: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of test examples under W: weights (C, d) or (m, C, d) -> (m_test,) or (m, m_test)."""
    logits = inputs @ weights.transpose(-1, -2)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -log_probs[..., torch.arange(len(targets)), targets]


def as_numpy(result: dict) -> dict:
    """A refit result with tensors as numpy arrays (what the refit cache stores)."""
    return {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in result.items()}


def as_weights(result: dict) -> Tensor:
    weights = result["weights"]
    return weights if isinstance(weights, Tensor) else torch.from_numpy(np.asarray(weights))
