"""LiSSA: stochastic Neumann-series estimate of inverse-Hessian-vector products.

Recursion (Agarwal et al. 2017; Koh & Liang 2017), for each repeat and
right-hand side v, with mini-batch curvature H_B (including weight decay):

    h_0 = v,   h_{j+1} = v + (1 - damping / scale) h_j - H_B h_j / scale,

converging to scale (H + damping I)^{-1} v; the estimate is h_J / scale,
averaged over the repeats. Here ``damping`` is added to H, as in every solver
of this library; Koh & Liang's damping d (in ``v + (1 - d) h - ...``) is
``damping = d * scale``.

Convergence needs every H_B + damping I to have eigenvalues in (0, 2 scale);
with scale >= lambda_max, ||h_j|| <= (j + 1) ||v||. A norm beyond ten times
that bound (or a non-finite one) means divergence: :class:`LiSSADivergenceError`
is raised, naming a safe scale, instead of returning inf or NaN.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from influencekit.curvature.hessian import HessianOperator
from influencekit.linalg import check_directions
from influencekit.solvers.base import SolveResult, Solver


class LiSSADivergenceError(RuntimeError):
    """LiSSA's iterates grew beyond what a convergent recursion allows."""

    def __init__(self, step: int, norm: float, bound: float, scale: float, suggested_scale: float):
        self.step, self.norm, self.scale, self.suggested_scale = step, norm, scale, suggested_scale
        super().__init__(
            f"LiSSA diverged at step {step}: iterate norm {norm:.3g} exceeds the bound {bound:.3g} of a "
            f"convergent recursion. scale={scale:g} is too small for the mini-batch curvature; the largest "
            f"sampled mini-batch eigenvalue suggests scale >= {suggested_scale:.3g} (or use scale='auto')."
        )


def estimate_max_batch_eigenvalue(
    curvature: HessianOperator,
    batch_size: int,
    damping: float = 0.0,
    num_batches: int = 64,
    iterations: int = 30,
    seed: int = 0,
) -> float:
    """Largest eigenvalue of H_B + damping I over ``num_batches`` random mini-batches (power iteration).

    A lower bound on the maximum over all mini-batches; LiSSA's ``auto`` scale
    takes 1.1 times it.
    """
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(curvature.n_train, (num_batches, batch_size), generator=gen)
    v = torch.randn(num_batches, curvature.dim, generator=gen, dtype=curvature.dtype)
    v /= v.norm(dim=1, keepdim=True)
    eig = torch.zeros(num_batches, dtype=curvature.dtype)
    for _ in range(iterations):
        hv = curvature.sampled_matvec(indices, v) + damping * v
        eig = (v * hv).sum(dim=1)
        v = hv / hv.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return float(eig.max())


@dataclass(frozen=True)
class LiSSASettings:
    """LiSSA's settings, written once and shared by :class:`LiSSASolver`, the parallel solver,
    the Figure 2 configuration and the command line.

    Attributes:
        scale: divides the curvature; must exceed the largest mini-batch eigenvalue
            (roughly). ``"auto"`` = 1.1 x a power-iteration estimate.
        damping: added to the curvature (see the module docstring for Koh & Liang's).
        depth: recursion depth J.
        repeats: independent repeats T, averaged.
        batch_size: mini-batch size B of each step.
        seed: repeat r draws its mini-batches from stream r of
            ``numpy.random.SeedSequence(seed)``.
    """

    scale: float | Literal["auto"] = "auto"
    damping: float = 0.0
    depth: int = 5000
    repeats: int = 10
    batch_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1 or self.repeats < 1 or self.batch_size < 1:
            raise ValueError(
                f"LiSSA's depth, repeats and batch_size must be >= 1, got {self.depth}, {self.repeats}, {self.batch_size}"
            )
        if self.scale != "auto" and not float(self.scale) > 0:
            raise ValueError(f"LiSSA's scale must be positive or 'auto', got {self.scale}")

    @classmethod
    def koh_liang(cls) -> LiSSASettings:
        """Koh & Liang's Figure 2 (middle panel): scale 25, depth 5,000, 10 repeats, batch 1, damping 0."""
        return cls(scale=25.0, damping=0.0, depth=5000, repeats=10, batch_size=1, seed=0)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, defaults: LiSSASettings | None = None) -> None:
        """The settings as command-line options ``--lissa-scale`` ... ``--lissa-seed`` (defaults: ``defaults``)."""
        d = defaults or LiSSASettings()
        parser.add_argument("--lissa-scale", type=_scale, default=d.scale, help=f"divides H (a number or auto; default {d.scale})")
        parser.add_argument("--lissa-damping", type=float, default=d.damping,
                            help=f"added to H; Koh & Liang's d corresponds to d * scale (default {d.damping:g})")
        parser.add_argument("--lissa-depth", type=int, default=d.depth, help=f"recursion depth J (default {d.depth})")
        parser.add_argument("--lissa-repeats", type=int, default=d.repeats, help=f"repeats T, averaged (default {d.repeats})")
        parser.add_argument("--lissa-batch-size", type=int, default=d.batch_size, help=f"mini-batch B (default {d.batch_size})")
        parser.add_argument("--lissa-seed", type=int, default=d.seed, help=f"seed of the mini-batches (default {d.seed})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LiSSASettings:
        """The settings given by the options of :meth:`add_arguments`."""
        return cls(args.lissa_scale, args.lissa_damping, args.lissa_depth, args.lissa_repeats, args.lissa_batch_size,
                   args.lissa_seed)

    def resolved(self, curvature: HessianOperator) -> LiSSASettings:
        """These settings with ``scale="auto"`` replaced by its estimate for ``curvature``."""
        if self.scale != "auto":
            return replace(self, scale=float(self.scale))
        estimate = estimate_max_batch_eigenvalue(curvature, self.batch_size, self.damping, seed=self.seed)
        return replace(self, scale=1.1 * estimate)


def _scale(text: str) -> float | Literal["auto"]:
    return "auto" if text == "auto" else float(text)


class LiSSASolver(Solver):
    """LiSSA iHVP estimate, vectorised over repeats and right-hand sides.

    Args:
        curvature: a curvature with ``sampled_matvec`` (mini-batch products).
        damping, scale, depth, repeats, batch_size, seed: see :class:`LiSSASettings`
            (:meth:`from_settings` takes them as one object).
        first_repeat: index of the first repeat this solver runs, so any subset of
            repeats can be recomputed elsewhere with identical numbers.
        measure_residuals: compute ||(H + damping I) x - b|| with one full pass.
        progress: tqdm bar over steps (None: only on a terminal).

    Attributes:
        settings: the :class:`LiSSASettings`, with the scale resolved to a number.
    """

    def __init__(
        self,
        curvature: HessianOperator,
        *,
        damping: float = 0.0,
        scale: float | Literal["auto"] = "auto",
        depth: int = 5000,
        repeats: int = 10,
        batch_size: int = 1,
        seed: int = 0,
        first_repeat: int = 0,
        measure_residuals: bool = True,
        progress: bool | None = None,
    ):
        if not hasattr(curvature, "sampled_matvec"):
            raise TypeError(f"LiSSA needs mini-batch curvature products; {type(curvature).__name__} has no sampled_matvec")
        start = time.perf_counter()
        settings = LiSSASettings(scale, damping, depth, repeats, batch_size, seed).resolved(curvature)
        super().__init__(curvature, damping=settings.damping, measure_residuals=measure_residuals)
        self.settings = settings
        self.first_repeat = first_repeat
        self.progress = progress
        self.setup_seconds = time.perf_counter() - start

    @classmethod
    def from_settings(cls, curvature: HessianOperator, settings: LiSSASettings, **options: Any) -> Any:
        """A solver with ``settings``; ``options``: the constructor's other keyword arguments."""
        return cls(curvature, **asdict(settings), **options)

    @property
    def scale(self) -> float:
        """The resolved scale (a number, also when ``"auto"`` was asked for)."""
        return float(self.settings.scale)

    def sample_indices(self) -> Tensor:
        """Mini-batch indices of every repeat and step, shape (repeats, depth, batch_size)."""
        streams = np.random.SeedSequence(self.settings.seed).spawn(self.first_repeat + self.settings.repeats)[self.first_repeat :]
        draws = [
            np.random.default_rng(stream).integers(0, self.curvature.n_train, size=(self.settings.depth, self.settings.batch_size))
            for stream in streams
        ]
        return torch.as_tensor(np.stack(draws), dtype=torch.long)

    def solve(self, rhs: Tensor) -> SolveResult:
        start = time.perf_counter()
        b = check_directions(rhs, self.curvature.dim, "rhs").to(self.curvature.dtype)
        k, t = b.shape[0], self.settings.repeats
        indices = self.sample_indices()  # (T, J, B)
        v = b.repeat(t, 1)  # row r * k + j: repeat r, right-hand side j
        v_norm = v.norm(dim=1)
        h = v.clone()
        keep = 1.0 - self.damping / self.scale
        trace = torch.empty(self.settings.depth, k, dtype=b.dtype)
        for step in tqdm(range(self.settings.depth), desc="LiSSA", disable=None if self.progress is None else not self.progress):
            # rows r k .. r k + k - 1 (repeat r) share repeat r's mini-batch: one (T, B) index block;
            # the product is a new tensor, so the recursion updates it in place
            h = self.curvature.sampled_matvec(indices[:, step], h).mul_(-1.0 / self.scale).add_(h, alpha=keep).add_(v)
            norms = h.norm(dim=1)
            trace[step] = norms.reshape(t, k).mean(dim=0)
            bound = 10.0 * (step + 2) * v_norm
            if not bool(torch.isfinite(norms).all()) or bool((norms > bound).any()):
                worst = int(torch.argmax(torch.nan_to_num(norms / bound, nan=float("inf"))))
                suggested = 1.1 * estimate_max_batch_eigenvalue(self.curvature, self.settings.batch_size, self.damping, seed=self.settings.seed)
                raise LiSSADivergenceError(step + 1, float(norms[worst]), float(bound[worst]), self.scale, suggested)
        solution = (h / self.scale).reshape(t, k, -1).mean(dim=0)
        seconds = time.perf_counter() - start
        residuals = self.residual_norms(solution, b)
        info = {"norm_trace": trace, "scale": self.scale, "seconds_without_residual": seconds}
        return SolveResult(solution, residuals, torch.full((k,), self.settings.depth * t), time.perf_counter() - start, info)
