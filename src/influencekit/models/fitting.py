"""Train a small PyTorch model to a *verified* local optimum of R, in float64.

Influence functions assume grad R(theta_hat) = 0 and H positive definite. A model
stopped early by SGD is at neither (Koh & Liang reproductions report Hessians with
hundreds of negative eigenvalues and "random" scores), so this fit goes on until the
evidence says otherwise:

1. Adam in float32 on mini-batches (cheap progress from the initialisation);
2. L-BFGS in float64 on the full objective until ||grad R|| <= ``lbfgs_tol``;
3. Newton steps with the explicit Hessian H (p x p, float64) recomputed at
   every step (shifted to H + mu I, Levenberg style, where it is not positive
   definite or the step does not decrease R) until ||grad R|| <= ``tol`` with
   H positive definite. The last Hessian is the one at theta_hat. Each step
   costs p Hessian-vector products over the data: affordable for small p and n.

The result states ||grad R||, H's extreme eigenvalues and number of negative
eigenvalues, and the damping that would make H + lambda I positive definite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

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
        newton_steps, lbfgs_iterations, seconds: how it got there.
    """

    objective: TorchObjective
    hessian: Tensor
    gradient_norm: float
    spectrum: SpectrumSummary
    damping_for_positive_definite: float
    at_local_optimum: bool
    newton_steps: int = 0
    lbfgs_iterations: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    history: list[tuple[str, int, float]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "train_grad_norm": self.gradient_norm, "at_local_optimum": self.at_local_optimum,
            "newton_steps": self.newton_steps, "lbfgs_iterations": self.lbfgs_iterations,
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
    steps, shift = 0, 0.0
    value = objective.objective_value()
    while True:
        hessian = objective.hessian()
        hessian = 0.5 * (hessian + hessian.T)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        norm = float(gradient.norm())
        history.append(("newton", steps, norm))
        if (norm <= tol and float(eigenvalues[0]) > 0) or steps == max_newton_steps:
            break
        # Newton step, shifted (Levenberg) where H is not positive definite; the shift
        # grows until R decreases, and shrinks again once steps succeed.
        shift = max(positive_definite_shift(float(eigenvalues[0]), float(eigenvalues[-1])), shift / 10)
        eye = torch.eye(objective.dim, dtype=hessian.dtype)
        while True:
            step = torch.linalg.solve(hessian + shift * eye, gradient)
            candidate = _set_theta(objective, objective.theta - step)
            candidate_value = candidate.objective_value()
            if candidate_value <= value or shift > 1e6:
                break
            shift = max(10 * shift, 1e-6 * float(eigenvalues[-1]))
        objective, value = candidate, candidate_value
        gradient = objective.objective_gradient()
        steps += 1
        log(f"Newton step {steps}: ||grad R|| = {float(gradient.norm()):.3g}, shift {shift:.2g}")
    seconds["newton"] = time.perf_counter() - t
    spectrum = spectrum_summary(eigenvalues)
    shift = positive_definite_shift(spectrum.min, spectrum.max)
    log(f"Hessian at theta_hat: eigenvalues in [{spectrum.min:.4g}, {spectrum.max:.4g}], {spectrum.negative} negative")
    norm = float(gradient.norm())
    return LocalOptimum(
        objective=objective, hessian=hessian, gradient_norm=norm, spectrum=spectrum, damping_for_positive_definite=shift,
        at_local_optimum=norm <= tol and spectrum.negative == 0 and shift == 0.0,
        newton_steps=steps,
        lbfgs_iterations=lbfgs_iterations, seconds=seconds, history=history,
    )
