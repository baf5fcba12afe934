"""Retraining ground truth for any :class:`~influencekit.torch_objective.TorchObjective`.

With ``L_i(theta) = l_i(theta) + (wd/2)||theta||^2`` the total loss of training
point i (README "Sign and scale conventions") the objective is
``R = (1/n) sum_i L_i`` and removing a group G of training points gives

    R_{-G}(theta) = (n R(theta) - sum_{i in G} L_i(theta)) / (n - |G|)
                  = (1/(n-|G|)) sum_{j not in G} l_j(theta) + (wd/2)||theta||^2,

(for G = {i} the softmax path's leave-one-out objective). Every refit starts
from the trained theta_hat. Three modes, reported separately:

``"true"`` (a)
    minimise R_{-G} to ||grad R_{-G}|| <= tol in float64 by chord (frozen-Hessian
    Newton) steps theta <- theta - (H + mu I)^{-1} grad R_{-G}(theta), H the explicit
    Hessian of R at theta_hat (mu = 0 when H is positive definite, otherwise the
    smallest shift making it so, plus a margin; the iteration then converges to the
    stationary point of R_{-G} near theta_hat). All refits of a batch share the one
    Cholesky factor of H + mu I, so a step of m refits is one triangular solve with
    m right-hand sides, and their gradients are one vmapped data pass. H differs
    from the Hessian of R_{-G} by O(|G|/n), so the gradient norm shrinks by about
    that factor per step. A refit whose gradient norm shrinks by less than 10x in a
    step (on the tanh MLP of the tests, points whose removal moves theta by ~0.6)
    starts again from theta_hat with its own matrix: the Hessian of R_{-G} at
    theta_hat, (n H - sum_G hess L_i) / (n - |G|) + mu I (p Hessian-vector products
    over the group only), refreshed at the current iterate (p HVPs over the data)
    whenever contraction is slow again (a frozen Hessian stalled there).
    The first gradient needs no data pass:
    grad R_{-G}(theta_hat) = (n grad R(theta_hat) - sum_G grad L_i(theta_hat)) / (n - |G|).
``"surrogate"`` (b)
    Koh & Liang's damped quadratic surrogate (their section 4.2): every L_i
    is replaced by
        L~_i(theta) = L_i(th) + grad L_i(th)^T D + 1/2 D^T (H_i + lambda I) D,  D = theta - th,
    H_i the Hessian of L_i at th = theta_hat, lambda = ``damping``. Since
    sum_i H_i = n H, the minimiser of R~_{-G} solves the linear system
        (n (H + lambda I) - B_G) D = sum_G grad L_i(th) - n grad R(th),
        B_G = sum_{i in G} H_i + |G| lambda I,
    solved exactly (one Cholesky factor per refit; sum_G H_i explicit from p
    Hessian-vector products over the group only). The stated gradient norm is
    that of R~_{-G}, ||(n (H + lambda I) - B_G) D - rhs|| / (n - |G|). Requires
    H + lambda I positive definite.
``"budget"`` (c)
    ``budget_steps`` full-batch gradient-descent steps of size ``budget_lr`` on
    R_{-G} from theta_hat, whatever gradient norm that reaches (Koh & Liang
    retrained their CNN for a fixed number of steps; this mode shows what such a
    budget gives).

All refits of a batch share each pass over the data: their gradients are one
``vmap`` over the stacked parameter vectors. Each refit reports
``gradient_norm`` (of its own objective), ``steps`` (Newton / fixed-point /
descent steps) and ``seconds`` (its batch's wall time divided by the batch
size: refits of a batch run together).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, vmap

from influencekit.data import Batch, batch_size, batch_tensors, index_batch
from influencekit.linalg import cholesky_solve
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache, fingerprint_of

__all__ = ["MODES", "RetrainingProblem", "retrain", "measurements_at", "positive_definite_shift"]

Mode = Literal["true", "surrogate", "budget"]
MODES: tuple[str, ...] = ("true", "surrogate", "budget")


def positive_definite_shift(min_eigenvalue: float, max_eigenvalue: float, margin: float = 1e-6) -> float:
    """Smallest mu >= 0 (with a relative ``margin``) such that H + mu I is positive definite.

    Args:
        min_eigenvalue, max_eigenvalue: extreme eigenvalues of the symmetric H.
        margin: mu is -min_eigenvalue + margin * max|eigenvalue| when H is indefinite
            or singular, so that the smallest eigenvalue of H + mu I is margin * ||H||.
    Returns:
        0.0 if min_eigenvalue > margin * max|eigenvalue| already.
    """
    floor = margin * max(abs(min_eigenvalue), abs(max_eigenvalue))
    return 0.0 if min_eigenvalue > floor else floor - min_eigenvalue


@dataclass
class RetrainingProblem:
    """What every worker needs for refits; sent once to each worker.

    Attributes:
        objective: the trained model's objective at theta_hat (float64 parameters).
        hessian: explicit Hessian of R at theta_hat, (p, p), float64.
        mode: "true", "surrogate" or "budget" (module docstring).
        groups: group k removes training indices ``groups[k]``; ``None``:
            leave-one-out, group k = [k].
        tol: gradient-norm tolerance of modes "true" and "surrogate".
        max_steps: steps allowed per refit in those modes.
        damping: lambda of the surrogate (mode "surrogate").
        newton_shift: mu of mode "true"; ``None``: :func:`positive_definite_shift` of H.
        budget_steps, budget_lr: mode "budget".
        rows_per_pass: examples x refits evaluated together in one vmapped chunk (memory bound).
        max_step_norm: trust radius of a Newton step of mode "true" (unsafeguarded steps
            diverged for a few of the most influential points of a small MLP).
    """

    objective: TorchObjective
    hessian: Tensor
    mode: Mode = "true"
    groups: list[list[int]] | None = None
    tol: float = 1e-10
    max_steps: int = 30
    damping: float = 0.0
    newton_shift: float | None = None
    budget_steps: int = 100
    budget_lr: float = 0.1
    rows_per_pass: int = 4096
    max_step_norm: float = 1.0
    factor: Tensor = field(init=False, repr=False)
    full_gradient: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.objective.dtype != torch.float64:
            raise ValueError(f"retraining runs in float64; call model.double() (got {self.objective.dtype})")
        p = self.objective.dim
        if self.hessian.shape != (p, p):
            raise ValueError(f"hessian must be ({p}, {p}), got {tuple(self.hessian.shape)}")
        self.hessian = self.hessian.to(torch.float64)
        self.full_gradient = self.objective.objective_gradient()
        eye = torch.eye(p, dtype=torch.float64)
        if self.mode == "true":
            if self.newton_shift is None:
                eigenvalues = torch.linalg.eigvalsh(self.hessian)
                self.newton_shift = positive_definite_shift(float(eigenvalues[0]), float(eigenvalues[-1]))
            matrix = self.hessian + self.newton_shift * eye
        elif self.mode == "surrogate":
            matrix = self.objective.n_train * (self.hessian + self.damping * eye)
        else:
            matrix = None
        if matrix is not None:
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:
                eigenvalues = torch.linalg.eigvalsh(self.hessian)
                needed = positive_definite_shift(float(eigenvalues[0]), float(eigenvalues[-1]))
                raise ValueError(
                    f"H + {self.damping if self.mode == 'surrogate' else self.newton_shift:g} I is not positive definite "
                    f"(smallest eigenvalue of H {float(eigenvalues[0]):.4g}); use damping >= {needed:.4g}"
                )
            self.factor = factor

    def group(self, k: int) -> list[int]:
        members = [k] if self.groups is None else list(self.groups[k])
        if not members or len(members) >= self.objective.n_train:
            raise ValueError(f"group {k} removes {len(members)} of {self.objective.n_train} points; need 1..n-1")
        return members

    def fingerprint(self) -> str:
        """Identifies the data, theta_hat and every setting that changes a refit's result."""
        data = batch_tensors(self.objective.train.materialize())
        settings: dict[str, Any] = {"mode": self.mode, "weight_decay": self.objective.weight_decay, "groups": self.groups,
                                    "model": type(self.objective.model).__name__}
        if self.mode == "true":
            settings.update(tol=self.tol, newton_shift=self.newton_shift)
        elif self.mode == "surrogate":
            settings.update(tol=self.tol, damping=self.damping)
        else:
            settings.update(budget_steps=self.budget_steps, budget_lr=self.budget_lr)
        return fingerprint_of(self.objective.theta, *data, **settings)

    # -- gradients of many refits at once ---------------------------------------
    def _group_batch(self, members: list[int]) -> Batch:
        obj = self.objective
        return obj._prepare(obj.train.gather(torch.as_tensor(members)))

    def _summed_loss_gradients(self, thetas: Tensor) -> Tensor:
        """sum_j grad l_j(theta_k) over all training data for every row theta_k: (m, p) -> (m, p)."""
        obj = self.objective
        m = thetas.shape[0]
        rows = max(1, self.rows_per_pass // m)
        total = torch.zeros_like(thetas)
        summed = vmap(grad(lambda t, b: obj.losses(t, b).sum()), in_dims=(0, None))
        for chunk in obj.train.chunks():
            chunk = obj._prepare(chunk)
            for start in range(0, batch_size(chunk), rows):
                total += summed(thetas, index_batch(chunk, slice(start, start + rows)))
        return total

    def _group_loss_gradients(self, thetas: Tensor, groups: list[list[int]]) -> Tensor:
        """sum_{i in G_k} grad l_i(theta_k) for every refit k: (m, p) -> (m, p)."""
        obj = self.objective
        return torch.stack([grad(lambda t: obj.losses(t, self._group_batch(g)).sum())(t) for t, g in zip(thetas, groups)])

    def _removed_gradients(self, thetas: Tensor, groups: list[list[int]], *, at_optimum: bool) -> Tensor:
        """grad R_{-G_k}(theta_k) for every refit: (m, p) -> (m, p); at theta_hat without a data pass."""
        n, wd = self.objective.n_train, self.objective.weight_decay
        sizes = torch.tensor([len(g) for g in groups], dtype=thetas.dtype).unsqueeze(1)
        own = self._group_loss_gradients(thetas, groups)
        if at_optimum:
            everything = n * (self.full_gradient - wd * self.objective.theta).expand_as(thetas)
        else:
            everything = self._summed_loss_gradients(thetas)
        return (everything - own) / (n - sizes) + wd * thetas

    # -- the three modes --------------------------------------------------------------
    def refit(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        """Refit without each group ``keys[k]``; per group ``theta`` (p,), ``gradient_norm``, ``steps``, ``seconds``."""
        start = time.perf_counter()
        groups = [self.group(int(k)) for k in keys]
        solve = {"true": self._true, "surrogate": self._surrogate, "budget": self._budget}[self.mode]
        thetas, norms, steps = solve(groups)
        seconds = (time.perf_counter() - start) / len(groups)
        converged = norms <= self.tol if self.mode != "budget" else torch.ones_like(norms, dtype=torch.bool)
        return [
            {"theta": thetas[k].clone(), "gradient_norm": float(norms[k]), "steps": int(steps[k]), "seconds": seconds,
             "converged": bool(converged[k]), "removed": groups[k], "mode": self.mode}
            for k in range(len(groups))
        ]

    def _true(self, groups: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        m = len(groups)
        thetas = self.objective.theta.expand(m, -1).clone()
        steps = torch.zeros(m, dtype=torch.long)
        norms = torch.full((m,), float("inf"), dtype=torch.float64)
        active = torch.arange(m)
        # per refit: None while it uses the shared factor of H(theta_hat) + mu I, else its own factor
        factors: list[Tensor | None] = [None] * m
        previous = torch.full((m,), float("inf"), dtype=torch.float64)
        theta_hat = self.objective.theta
        for step in range(self.max_steps + 1):
            gradients = self._removed_gradients(thetas[active], [groups[k] for k in active], at_optimum=step == 0)
            norms[active] = gradients.norm(dim=1)
            still = norms[active] > self.tol
            active, gradients = active[still], gradients[still]
            if len(active) == 0 or step == self.max_steps:
                break
            updates = cholesky_solve(self.factor, gradients)  # the shared chord step of every refit: one solve
            for j, k in enumerate(active.tolist()):
                if float(norms[k]) > 0.1 * float(previous[k]):
                    if factors[k] is None:
                        # the shared matrix contracts slowly: start again from theta_hat with this refit's
                        # own Hessian of R_{-G} there (its gradient there needs no data pass)
                        thetas[k] = theta_hat
                        gradients[j] = self._removed_gradients(theta_hat.unsqueeze(0), [groups[k]], at_optimum=True)[0]
                        factors[k] = self._removed_hessian_factor(groups[k], None)
                        norms[k] = gradients[j].norm()
                    else:  # slow again: the Hessian of R_{-G} at theta_k
                        factors[k] = self._removed_hessian_factor(groups[k], thetas[k])
                update = updates[j] if factors[k] is None else cholesky_solve(factors[k], gradients[j : j + 1])[0]
                thetas[k] -= update * min(1.0, self.max_step_norm / float(update.norm()))  # trust radius
            previous[active] = norms[active]
            steps[active] += 1
        return thetas, norms, steps

    def _group_hessian(self, members: list[int], theta: Tensor | None = None) -> Tensor:
        """sum_{i in G} hess l_i at ``theta`` (default theta_hat), explicit (p, p): p HVPs over the |G| examples."""
        return self._summed_hessian(self._group_batch(members), self.objective.theta if theta is None else theta)

    def _summed_hessian(self, batch: Batch, theta: Tensor) -> Tensor:
        """sum_{i in batch} hess l_i at ``theta``, explicit (p, p), by reverse-over-reverse.

        g = grad sum_i l_i is built once with its graph; each block of unit vectors E then gives
        the rows E H = grad <g, e_j> in one batched backward (``is_grads_batched``). On the
        reduced Figure 2 CNN (p = 312, 150 images) 13 s against 19-25 s for vmapped
        forward-over-reverse ``jvp(grad)``, which redoes the forward and backward pass per block.
        """
        obj = self.objective
        eye = torch.eye(obj.dim, dtype=torch.float64)
        block = max(1, self.rows_per_pass // batch_size(batch))
        leaf = theta.detach().requires_grad_()
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(obj.losses(leaf, batch).sum(), leaf, create_graph=True)
            own = torch.cat([
                torch.autograd.grad(gradient, leaf, eye[i : i + block], retain_graph=True, is_grads_batched=True)[0]
                for i in range(0, obj.dim, block)
            ])
        return 0.5 * (own + own.T)

    def _removed_hessian_factor(self, members: list[int], theta: Tensor | None) -> Tensor:
        """Cholesky factor of hess R_{-G} at ``theta`` (None: theta_hat, from H without a data pass), + mu I.

        hess R_{-G} = (sum_j hess l_j - sum_G hess l_i) / (n - |G|) + wd I. Where it is not
        positive definite, the smallest shift that makes it so (plus a margin) is added.
        """
        obj = self.objective
        n, wd, size = obj.n_train, obj.weight_decay, len(members)
        eye = torch.eye(obj.dim, dtype=torch.float64)
        if theta is None:
            summed = n * (self.hessian - wd * eye)
        else:
            summed = sum(self._summed_hessian(obj._prepare(chunk), theta) for chunk in obj.train.chunks())
        matrix = (summed - self._group_hessian(members, theta)) / (n - size) + wd * eye
        factor, info = torch.linalg.cholesky_ex(matrix + self.newton_shift * eye)
        if int(info):
            eigenvalues = torch.linalg.eigvalsh(matrix)
            factor = torch.linalg.cholesky(matrix + positive_definite_shift(float(eigenvalues[0]), float(eigenvalues[-1])) * eye)
        return factor

    def _surrogate(self, groups: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        obj = self.objective
        n, wd, lam = obj.n_train, obj.weight_decay, self.damping
        theta_hat = obj.theta
        eye = torch.eye(obj.dim, dtype=torch.float64)
        sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64).unsqueeze(1)
        # sum_G grad L_i(theta_hat) - n grad R(theta_hat)
        rhs = self._group_loss_gradients(theta_hat.expand(len(groups), -1), groups) + sizes * wd * theta_hat - n * self.full_gradient
        deltas, norms = torch.empty_like(rhs), torch.empty(len(groups), dtype=torch.float64)
        for k, members in enumerate(groups):
            # n (H + lambda I) - B_G, B_G = sum_G hess L_i + |G| lambda I
            matrix = n * (self.hessian + lam * eye) - self._group_hessian(members) - len(members) * (wd + lam) * eye
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info):
                raise ValueError(f"the damped surrogate without group {members} is not convex; increase damping above {lam:g}")
            deltas[k] = cholesky_solve(factor, rhs[k : k + 1])[0]
            norms[k] = (matrix @ deltas[k] - rhs[k]).norm() / (n - len(members))
        return theta_hat + deltas, norms, torch.ones(len(groups), dtype=torch.long)

    def _budget(self, groups: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        m = len(groups)
        thetas = self.objective.theta.expand(m, -1).clone()
        gradients = self._removed_gradients(thetas, groups, at_optimum=True)
        for _ in range(self.budget_steps):
            thetas -= self.budget_lr * gradients
            gradients = self._removed_gradients(thetas, groups, at_optimum=False)
        return thetas, gradients.norm(dim=1), torch.full((m,), self.budget_steps, dtype=torch.long)


def _refit_batch(problem: RetrainingProblem, keys: list[int]) -> list[dict[str, Any]]:
    return problem.refit(keys)


def retrain(
    objective: TorchObjective,
    keys: Iterable[int],
    *,
    mode: Mode = "true",
    groups: Sequence[Sequence[int]] | None = None,
    hessian: Tensor | None = None,
    tol: float = 1e-10,
    max_steps: int = 30,
    damping: float = 0.0,
    newton_shift: float | None = None,
    budget_steps: int = 100,
    budget_lr: float = 0.1,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    batch_size: int = 25,
    progress: bool = False,
) -> dict[int, dict[str, Any]]:
    """Retrain without each training point (or group) in ``keys``, from theta_hat; resumable.

    Args:
        objective: the trained model's objective (float64).
        keys: training indices to leave out (``groups is None``), or indices into ``groups``.
        mode: "true" (a), "surrogate" (b) or "budget" (c); see the module docstring.
        groups: training-index groups removed together (leave-a-group-out).
        hessian: explicit Hessian of R at theta_hat (default: ``objective.hessian()``).
        tol, max_steps, damping, newton_shift, budget_steps, budget_lr: see :class:`RetrainingProblem`.
        cache_dir: crash-safe refit cache root (default: a temporary directory, not kept).
        workers, scheduler, batch_size, progress: as :func:`~influencekit.validation.parallel.run_refits`.

    Returns:
        ``{key: {"theta": (p,) tensor, "gradient_norm", "steps", "seconds", "converged", "removed", "mode"}}``.
        A refit that did not reach ``tol`` within ``max_steps`` has ``converged`` False; callers report it.
    """
    problem = RetrainingProblem(
        objective, objective.hessian() if hessian is None else hessian, mode=mode,
        groups=None if groups is None else [[int(i) for i in g] for g in groups], tol=tol, max_steps=max_steps,
        damping=damping, newton_shift=newton_shift, budget_steps=budget_steps, budget_lr=budget_lr,
    )
    with contextlib.ExitStack() as stack:
        root = cache_dir if cache_dir is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="refits-"))
        cache = RefitCache(root, problem.fingerprint())
        results = run_refits(_refit_batch, keys, cache, shared=problem, workers=workers, scheduler_address=scheduler,
                             batch_size=batch_size, progress=progress)
    return {k: {**r, "theta": torch.as_tensor(r["theta"])} for k, r in results.items()}


def measurements_at(objective: TorchObjective, thetas: Tensor, batch: Batch) -> Tensor:
    """The measurement (default: the loss) of every example of ``batch`` at each parameter vector.

    Args:
        thetas: (m, p) or (p,) parameter vectors.
    Returns:
        (m, b) (or (b,) for one vector), no gradient.
    """
    batch = objective._prepare(batch)
    one = thetas.dim() == 1
    with torch.no_grad():
        values = torch.stack([objective.measurement(objective.outputs(t, batch), batch) for t in thetas.reshape(-1, objective.dim)])
    return values[0] if one else values
