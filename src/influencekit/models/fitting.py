"""Train a small PyTorch model to a *verified* local optimum of R, in float64.

Influence functions assume grad R(theta_hat) = 0 and H positive definite. A model
stopped early by SGD is at neither (Koh & Liang reproductions report Hessians with
hundreds of negative eigenvalues and "random" scores), so this fit goes on until the
evidence says otherwise:

1. Adam in float32 on mini-batches (cheap progress from the initialisation);
2. L-BFGS in float64 on the full objective until ||grad R|| <= ``lbfgs_tol``;
3. Levenberg-Marquardt steps with the explicit generalised Gauss-Newton matrix
   G = (1/n) sum_i J_i^T H_out,i J_i + wd I (positive definite, so every step is a
   descent direction and the fit moves towards a minimum, not a saddle; J_i the
   (outputs x p) Jacobian of example i, one vmapped pass: far cheaper than p
   Hessian-vector products) until ||grad R|| <= ``gauss_newton_tol``;
4. Newton steps from the eigendecomposition of the explicit Hessian H (p x p,
   float64; p Hessian-vector products over the data), "saddle-free" where H is
   indefinite (|eigenvalues|, plus a move along the most negative curvature
   direction: a reduced run of the old Levenberg-shifted Newton stalled at
   ||grad R|| = 0.006 with 25 negative eigenvalues), with a line search so R never increases. One
   Hessian serves several (chord) steps while the gradient norm contracts at
   least 10x per step, until ||grad R|| <= ``tol`` with H positive definite. The
   last Hessian is the one at theta_hat.

The result states ||grad R||, H's extreme eigenvalues and number of negative
eigenvalues, and the damping that would make H + lambda I positive definite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

from influencekit.data import map_batch
from influencekit.curvature.spectrum import SpectrumSummary, spectrum_summary
from influencekit.objectives.torch_objective import TorchObjective
from influencekit.validation.retraining import positive_definite_shift


@dataclass
class LocalOptimum:
    """A model trained as far as :func:`fit_to_local_optimum` could, with its evidence.

    Attributes:
        objective: the float64 objective at the final theta_hat.
        hessian: explicit H of R at theta_hat, (p, p), float64.
        gradient_norm: ||grad R(theta_hat)||.
        spectrum: eigenvalue summary of ``hessian`` (negative count, extremes).
        damping_for_positive_definite: smallest lambda >= 0 making H + lambda I
            positive definite (0 when it already is).
        at_local_optimum: gradient_norm <= tol and H positive definite.
        gauss_newton_steps, newton_steps, hessians (explicit Hessians computed), negative_curvature_steps
            (moves along a negative eigenvector), lbfgs_iterations, seconds: how it got there.
    """

    objective: TorchObjective
    hessian: Tensor
    gradient_norm: float
    spectrum: SpectrumSummary
    damping_for_positive_definite: float
    at_local_optimum: bool
    newton_steps: int = 0
    hessians: int = 0
    gauss_newton_steps: int = 0
    negative_curvature_steps: int = 0
    lbfgs_iterations: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    history: list[tuple[str, int, float]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "train_grad_norm": self.gradient_norm, "at_local_optimum": self.at_local_optimum,
            "gauss_newton_steps": self.gauss_newton_steps, "newton_steps": self.newton_steps, "hessians": self.hessians,
            "negative_curvature_steps": self.negative_curvature_steps, "lbfgs_iterations": self.lbfgs_iterations,
            "seconds": self.seconds,
        }


def _adam(model: nn.Module, loss_fn, x: Tensor, y: Tensor, weight_decay: float, epochs: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            rows = order[start : start + batch]
            optimiser.zero_grad()
            penalty = 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters())
            (loss_fn(model(x[rows]), (x[rows], y[rows])).mean() + penalty).backward()
            optimiser.step()


def _set_theta(objective: TorchObjective, theta: Tensor) -> TorchObjective:
    """A new objective at ``theta`` (the model's parameters are overwritten)."""
    with torch.no_grad():
        for name, value in objective.space.unflatten(theta).items():
            dict(objective.model.named_parameters())[name].copy_(value)
    return TorchObjective(objective.model, objective.loss, objective.train, weight_decay=objective.weight_decay,
                          measurement=objective.measurement, forward=objective.forward, chunk_size=objective.chunk_size)


def fit_to_local_optimum(
    model: nn.Module,
    loss: str,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    *,
    tol: float = 1e-10,
    adam_epochs: int = 30,
    adam_batch: int = 100,
    adam_lr: float = 3e-3,
    lbfgs_tol: float = 1e-6,
    lbfgs_max_iter: int = 500,
    max_gauss_newton_steps: int = 100,
    gauss_newton_tol: float = 1e-6,
    max_newton_steps: int = 20,
    chunk_size: int = 1024,
    seed: int = 0,
    log=lambda message: None,
) -> LocalOptimum:
    """Fit ``model`` on (x, y) to ||grad R|| <= tol with R = mean loss + (weight_decay/2)||theta||^2.

    The model is modified in place and converted to float64. Never raises for a
    missed optimum: ``at_local_optimum`` and the spectrum say what was reached.
    """
    from influencekit.losses import resolve_loss

    seconds: dict[str, float] = {}
    history: list[tuple[str, int, float]] = []
    t = time.perf_counter()
    model.float()
    _adam(model, resolve_loss(loss), x.float(), y, weight_decay, adam_epochs, adam_batch, adam_lr, seed)
    seconds["adam"] = time.perf_counter() - t

    t = time.perf_counter()
    model.double()
    objective = TorchObjective(model, loss, (x.double(), y), weight_decay=weight_decay, chunk_size=chunk_size)
    params = [p for _, p in model.named_parameters()]
    optimiser = torch.optim.LBFGS(params, lr=1, max_iter=lbfgs_max_iter, tolerance_grad=lbfgs_tol / 10, tolerance_change=0,
                                  history_size=50, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        optimiser.zero_grad()
        value = objective.losses(objective.space.flatten(dict(model.named_parameters())), objective._prepare((x, y))).mean()
        value = value + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        value.backward()
        return value

    optimiser.step(closure)
    objective = _set_theta(objective, objective.space.flatten({n: p.detach() for n, p in model.named_parameters()}))
    gradient = objective.objective_gradient()
    lbfgs_iterations = int(optimiser.state[optimiser._params[0]].get("n_iter", 0))
    history.append(("lbfgs", evaluations, float(gradient.norm())))
    seconds["lbfgs"] = time.perf_counter() - t
    log(f"L-BFGS: {lbfgs_iterations} iterations, {evaluations} evaluations, ||grad R|| = {float(gradient.norm()):.3g}")

    t = time.perf_counter()
    objective, gradient, gauss_newton_steps = _levenberg_marquardt(objective, gradient, gauss_newton_tol, max_gauss_newton_steps, log)
    history.append(("gauss_newton", gauss_newton_steps, float(gradient.norm())))
    seconds["gauss_newton"] = time.perf_counter() - t

    t = time.perf_counter()
    steps, hessians, escapes = 0, 0, 0
    value = objective.objective_value()
    while True:
        hessian = objective.hessian()
        hessian = 0.5 * (hessian + hessian.T)
        hessians += 1
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        norm = float(gradient.norm())
        history.append(("newton", steps, norm))
        if (norm <= tol and float(eigenvalues[0]) > 0) or steps >= max_newton_steps:
            break
        # Chord steps with this eigendecomposition while the gradient norm contracts at least 10x
        # per step; then a fresh Hessian (the last one is always at the returned theta_hat).
        stuck, first = False, True
        while steps < max_newton_steps:
            before = objective
            objective, value, gradient, escaped = _saddle_free_newton_step(objective, value, gradient, eigenvalues, eigenvectors)
            steps, escapes = steps + 1, escapes + escaped
            if objective is before:  # no step lowered R (with a fresh Hessian: stuck; else get one)
                stuck = first
                break
            first = False
            previous, norm = norm, float(gradient.norm())
            log(f"Newton step {steps}: ||grad R|| = {norm:.3g}, R = {value:.10g}"
                f"{', along negative curvature' if escaped else ''}")
            if norm <= tol or norm > 0.1 * previous or escaped:
                break
        if stuck:
            log("Newton: no step lowers R; stopping here")
            break
    seconds["newton"] = time.perf_counter() - t
    spectrum = spectrum_summary(eigenvalues)
    shift = positive_definite_shift(spectrum.min, spectrum.max)
    log(f"Hessian at theta_hat: eigenvalues in [{spectrum.min:.4g}, {spectrum.max:.4g}], {spectrum.negative} negative")
    norm = float(gradient.norm())
    return LocalOptimum(
        objective=objective, hessian=hessian, gradient_norm=norm, spectrum=spectrum, damping_for_positive_definite=shift,
        at_local_optimum=norm <= tol and spectrum.negative == 0 and shift == 0.0,
        newton_steps=steps, hessians=hessians, gauss_newton_steps=gauss_newton_steps, negative_curvature_steps=escapes,
        lbfgs_iterations=lbfgs_iterations, seconds=seconds, history=history,
    )


def _saddle_free_newton_step(
    objective: TorchObjective, value: float, gradient: Tensor, eigenvalues: Tensor, eigenvectors: Tensor
) -> tuple[TorchObjective, float, Tensor, bool]:
    """One descent step from the eigendecomposition H = V diag(lambda) V^T (at theta or nearby).

    The step is -V diag(1 / max(|lambda|, floor)) V^T g ("saddle-free Newton", Dauphin et al. 2014):
    the Newton step where H is positive definite, a descent direction along negative curvature
    otherwise. Where H has a negative eigenvalue lambda_min with eigenvector v, the step also
    moves along -sign(g.v) v by |lambda_min| * (1, 1/3, ..., 0) times max(||theta||, 1) / ||H||: at a saddle
    g.v = 0 and the Newton part alone would not leave it. The candidate (step length 1, 1/2, ...)
    with the lowest R is taken, so R never increases (beyond float64 rounding of R).
    Returns the new objective, R there, its gradient and whether a negative-curvature move was taken.
    """
    scale = float(eigenvalues.abs().max())
    floor = max(1e-10 * scale, 1e-12)
    newton = eigenvectors @ ((eigenvectors.T @ gradient) / eigenvalues.abs().clamp_min(floor))
    escapes = [0.0]
    if float(eigenvalues[0]) < -floor:
        v = eigenvectors[:, 0]
        direction = -v if float(gradient @ v) > 0 else v
        reach = max(float(objective.theta.norm()), 1.0) * abs(float(eigenvalues[0])) / scale
        escapes = [reach * 3.0**-k for k in range(5)] + [0.0]
    else:
        direction = torch.zeros_like(gradient)
    # near the optimum R changes by ~||g||^2 / lambda, below float64 rounding of R: accept that much
    slack = 4 * torch.finfo(torch.float64).eps * abs(value)
    best = None
    for length in (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 1 / 256):
        for escape in escapes:
            candidate = _set_theta(objective, objective.theta - length * newton + escape * direction)
            candidate_value = candidate.objective_value()
            if best is None or candidate_value < best[1]:
                best = (candidate, candidate_value, escape > 0)
        if best[1] <= value + slack:
            break
    if best[1] > value + slack:  # no decrease at all: stay (the caller's next Hessian decides)
        return objective, value, gradient, False
    candidate, candidate_value, escaped = best
    return candidate, candidate_value, candidate.objective_gradient(), escaped


def gauss_newton_matrix(objective: TorchObjective) -> Tensor:
    """Explicit G = (1/n) sum_i J_i^T H_out,i J_i + wd I, (p, p), from per-example Jacobians.

    J_i = d f_i / d theta (k outputs x p) by a vmapped ``jacrev`` over the examples of each
    chunk, H_out,i = the (k, k) Hessian of l_i in the outputs (``torch.func.hessian``, any
    per-example loss); G accumulates one (chunk * k, p) GEMM per chunk.
    """
    theta = objective.theta
    total = torch.zeros(objective.dim, objective.dim, dtype=theta.dtype)

    def outputs_of(t: Tensor, example) -> Tensor:
        return objective.outputs(t, map_batch(lambda v: v.unsqueeze(0), example))[0]

    def loss_of(outputs: Tensor, example) -> Tensor:
        one = map_batch(lambda v: v.unsqueeze(0), example)
        return objective.loss(outputs.unsqueeze(0), one)[0]

    for chunk in objective._train_chunks():
        jacobians = vmap(jacrev(outputs_of), in_dims=(None, 0))(theta, chunk)  # (b, k, p)
        outputs = vmap(outputs_of, in_dims=(None, 0))(theta, chunk)
        curvature = vmap(hessian(loss_of))(outputs, chunk)  # (b, k, k)
        weighted = torch.bmm(curvature, jacobians)
        total += jacobians.reshape(-1, objective.dim).T @ weighted.reshape(-1, objective.dim)
    total = 0.5 * (total + total.T) / objective.n_train
    return total + objective.weight_decay * torch.eye(objective.dim, dtype=theta.dtype)


def _levenberg_marquardt(
    objective: TorchObjective, gradient: Tensor, tol: float, max_steps: int, log
) -> tuple[TorchObjective, Tensor, int]:
    """Steps -(G + mu I)^{-1} grad R with the explicit Gauss-Newton matrix G until ||grad R|| <= tol.

    mu shrinks 3x after a step that lowers R and grows 4x (same G) until one does.
    """
    value, mu, steps = objective.objective_value(), 1e-4, 0
    eye = torch.eye(objective.dim, dtype=objective.dtype)
    while steps < max_steps and float(gradient.norm()) > tol:
        matrix = gauss_newton_matrix(objective)
        while True:
            step = torch.linalg.solve(matrix + mu * eye, gradient)
            candidate = _set_theta(objective, objective.theta - step)
            candidate_value = candidate.objective_value()
            if candidate_value < value or mu > 1e8:
                break
            mu = max(4 * mu, 1e-8)
        steps += 1
        if candidate_value >= value:
            break
        objective, value, mu = candidate, candidate_value, mu / 3
        gradient = objective.objective_gradient()
        log(f"Gauss-Newton step {steps}: ||grad R|| = {float(gradient.norm()):.3g}, R = {value:.10g}, mu {mu:.2g}")
    return objective, gradient, steps
