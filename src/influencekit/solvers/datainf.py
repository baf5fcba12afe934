"""DataInf: the inverse-harmonic-mean approximation of the damped empirical Fisher inverse (Kwon et al. 2023).

**What is approximated.** Not the Hessian: DataInf replaces it by the empirical
Fisher (Gauss-Newton with per-example gradients), block-diagonal over parameter
blocks l with per-block damping lambda_l,

    G_l = (1/n) sum_i g_il g_il^T + lambda_l I_{d_l},

where g_il is example i's loss gradient restricted to block l, and then swaps the
inverse of the mean for the mean of the inverses (Sherman-Morrison per example):

    G_l^{-1} ~ R_l = (1/n) sum_i (g_il g_il^T + lambda_l I)^{-1}
                   = (1/(n lambda_l)) sum_i (I - g_il g_il^T / (lambda_l + ||g_il||^2)) .

Applied to b (restricted to block l) without any d_l x d_l matrix:

    x_l = (1/lambda_l) (b_l - (1/n) sum_i g_il (g_il . b_l) / (lambda_l + ||g_il||^2)) .

The swap is exact for n = 1 and its relative error vanishes as lambda_l grows;
otherwise it errs (Kwon et al. bound the error by a term growing like d_l^2,
hence small blocks such as LoRA layers), so DataInf is a cheap approximation,
not a solver of any exact system. ``residual_norms`` report
how far x is from solving blockdiag(G_l) x = b exactly, which measures the
harmonic-mean error.

**Gradients.** g_i = grad l_i, the per-example loss gradient without the L2
term: ``objective.train_gradients`` (which returns grad l_i + lambda theta) minus
``objective.weight_decay * objective.parameters_vector()``, as in the paper's
G = (1/n) sum_i grad l_i grad l_i^T. ``include_weight_decay=True`` uses the
training gradients as they are.

**Default damping.** As in Kwon et al. (and their code), lambda_l = 0.1 x the mean
over examples and coordinates of the squared gradient entries,
0.1 (n d_l)^{-1} sum_i ||g_il||^2.

Each solve streams over the training set in chunks: one pass of per-example
gradients to apply R (and a second to measure residuals), O(n p k) work for k
right-hand sides, unless ``store_gradients`` keeps all gradients (n x p) in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.curvature.fisher import EmpiricalFisherOperator
from influencekit.linalg import check_directions
from influencekit.objectives.base import Objective
from influencekit.persistence import load_checked, save_tensors
from influencekit.solvers.base import SolveResult, Solver, damping_per_block

BlockName = int | str
DEFAULT_DAMPING_FACTOR = 0.1
#: Examples whose gradient norms are recomputed to check that a loaded fit matches its objective.
_VERIFY_EXAMPLES = 16


def _parse_blocks(blocks: Sequence[slice] | Mapping[str, slice] | None, dim: int) -> list[tuple[BlockName, slice]]:
    """(name, slice) per block, checking that the slices partition range(dim)."""
    if blocks is None:
        return [(0, slice(0, dim))]
    named: list[tuple[BlockName, slice]] = list(blocks.items()) if isinstance(blocks, Mapping) else list(enumerate(blocks))
    if not named:
        raise ValueError("blocks must not be empty")
    for name, block in named:
        if not isinstance(block, slice) or block.step not in (None, 1) or block.start is None or block.stop is None:
            raise ValueError(f"block {name!r} must be a slice(start, stop) with unit step, got {block!r}")
        if not 0 <= block.start < block.stop <= dim:
            raise ValueError(f"block {name!r} = {block!r} is empty or outside [0, {dim})")
    covered = 0
    for _, block in sorted(named, key=lambda item: item[1].start):
        if block.start != covered:
            raise ValueError(f"blocks must partition [0, {dim}) without gaps or overlaps; problem at index {covered}")
        covered = block.stop
    if covered != dim:
        raise ValueError(f"blocks cover [0, {covered}) but p = {dim}")
    return [(name, slice(block.start, block.stop)) for name, block in named]


def _parse_damping(
    damping: float | Sequence[float] | Mapping[BlockName, float] | None,
    names: list[BlockName],
    squared_norms: Tensor,
    sizes: list[int],
) -> list[float]:
    """One lambda_l > 0 per block from any accepted form (None: the paper's default from ``squared_norms`` (n, L))."""
    if damping is None:
        values = [DEFAULT_DAMPING_FACTOR * float(squared_norms[:, l].mean()) / size for l, size in enumerate(sizes)]
        for name, value in zip(names, values):
            if not value > 0:
                raise ValueError(
                    f"damping of block {name!r} is {value:g}; DataInf needs lambda_l > 0 (the default is zero "
                    "because every gradient in the block is zero: pass damping)"
                )
        return values
    return list(damping_per_block(damping, names, positive=True).values())


@dataclass(frozen=True)
class DataInfFit:
    """What DataInf fits: ||g_il||^2 (n, L), and all gradients (n, p) when they are kept."""

    squared_norms: Tensor
    gradients: Tensor | None = None


def _objective_of(curvature: Objective | CurvatureOperator | None) -> Objective | None:
    """The objective behind DataInf's curvature argument: an objective, or the empirical Fisher built on one."""
    if curvature is None or not isinstance(curvature, CurvatureOperator):
        return curvature
    if not isinstance(curvature, EmpiricalFisherOperator):
        raise TypeError(
            f"DataInf approximates the empirical Fisher; pass an EmpiricalFisherOperator or the objective itself, "
            f"not a {type(curvature).__name__}"
        )
    return curvature.objective


def _blocks_extent(blocks: Sequence[slice] | Mapping[str, slice] | None) -> int:
    if blocks is None:
        raise ValueError("a DataInf fit without an objective needs its blocks to know p")
    values = blocks.values() if isinstance(blocks, Mapping) else blocks
    return max(block.stop for block in values)


class DataInfSolver(Solver):
    """x_l = R_l b_l per block: DataInf's inverse harmonic mean (see the module docstring).

    Approximates the inverse of the damped, block-diagonal **empirical Fisher**,
    not of the Hessian; the damping is part of the approximation (per block) and
    no separate damping is added.

    Args:
        curvature: the objective whose per-example gradients (``train_gradients``)
            define the empirical Fisher, or an :class:`EmpiricalFisherOperator` of it;
            None only with ``fitted`` gradients.
        damping: lambda_l: one float for all blocks, a sequence (one per block, in
            order) or a mapping from block name; None: the paper's default
            0.1 (n d_l)^{-1} sum_i ||g_il||^2.
        blocks: slices partitioning range(p): a sequence (names 0, 1, ...) or a
            mapping name -> slice (e.g. ``ParameterSpace.offsets()`` for layer-wise
            blocks); None: one block.
        include_weight_decay: use grad l_i + weight_decay theta instead of grad l_i.
        chunk_size: examples per gradient chunk (memory O(chunk_size p)).
        store_gradients: keep all n gradients (n, p) in memory (and in ``save``):
            faster solves, no gradient passes, and a loaded solver needs no objective.
        measure_residuals: report ||blockdiag(G_l) x - b|| (an extra gradient pass).
        fitted: an earlier fit (what :meth:`load` passes): nothing is computed.

    Attributes:
        block_names, blocks: the blocks, in order.
        block_damping: lambda_l per block.
        squared_norms: ||g_il||^2, shape (n, L).
    """

    def __init__(
        self,
        curvature: Objective | CurvatureOperator | None,
        *,
        damping: float | Sequence[float] | Mapping[BlockName, float] | None = None,
        blocks: Sequence[slice] | Mapping[str, slice] | None = None,
        include_weight_decay: bool = False,
        chunk_size: int = 1024,
        store_gradients: bool = False,
        measure_residuals: bool = True,
        fitted: DataInfFit | None = None,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        start = time.perf_counter()
        self.objective = _objective_of(curvature)
        self.curvature = curvature if isinstance(curvature, CurvatureOperator) else None
        if fitted is None and self.objective is None:
            raise ValueError("DataInfSolver needs an objective (or its empirical Fisher) to fit, or an earlier fit")
        self.include_weight_decay, self.chunk_size = bool(include_weight_decay), int(chunk_size)
        self.measure_residuals = bool(measure_residuals)
        if fitted is not None:
            self.n_train = fitted.squared_norms.shape[0]
            self.dim = self.objective.dim if self.objective is not None else _blocks_extent(blocks)
        else:
            self.dim, self.n_train = self.objective.dim, self.objective.n_train
        named = _parse_blocks(blocks, self.dim)
        self.block_names = [name for name, _ in named]
        self.blocks = [block for _, block in named]
        if fitted is None:
            fitted = self._fit(store_gradients)
        self.squared_norms, self.gradients = fitted.squared_norms, fitted.gradients
        if self.objective is not None and self.gradients is None and self.objective.n_train != self.n_train:
            raise ValueError(f"the fit has n = {self.n_train} examples, the objective has {self.objective.n_train}")
        sizes = [block.stop - block.start for block in self.blocks]
        self.block_damping = _parse_damping(damping, self.block_names, self.squared_norms, sizes)
        self.setup_seconds = time.perf_counter() - start

    def _fit(self, store_gradients: bool) -> DataInfFit:
        norms, kept = [], []
        for chunk in self._computed_chunks():
            norms.append(self._block_squared_norms(chunk))
            if store_gradients:
                kept.append(chunk)
        return DataInfFit(torch.cat(norms), torch.cat(kept) if store_gradients else None)

    @property
    def damping(self) -> float:  # type: ignore[override]
        """The common lambda_l of all blocks (AttributeError when blocks differ: see ``block_damping``)."""
        if len(set(self.block_damping)) != 1:
            raise AttributeError(f"blocks have different dampings {self.block_damping}; read block_damping")
        return self.block_damping[0]

    # -- gradients -------------------------------------------------------------------
    def _gradients_of(self, objective: Objective, indices: Tensor) -> Tensor:
        grads = objective.train_gradients(indices)
        if not self.include_weight_decay:
            grads = grads - objective.weight_decay * objective.parameters_vector()
        return grads

    def _computed_chunks(self) -> Iterator[Tensor]:
        assert self.objective is not None, "load() requires an objective unless gradients were stored"
        for start in range(0, self.n_train, self.chunk_size):
            yield self._gradients_of(self.objective, torch.arange(start, min(start + self.chunk_size, self.n_train)))

    def _chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(gradients (m, p), squared norms (m, L)) over the training set, stored or recomputed."""
        if self.gradients is not None:
            yield self.gradients, self.squared_norms
            return
        start = 0
        for chunk in self._computed_chunks():
            yield chunk, self.squared_norms[start : start + chunk.shape[0]]
            start += chunk.shape[0]

    def _block_squared_norms(self, gradients: Tensor) -> Tensor:
        return torch.stack([(gradients[:, block] ** 2).sum(dim=1) for block in self.blocks], dim=1)

    # -- solving ---------------------------------------------------------------------
    def solve(self, rhs: Tensor) -> SolveResult:
        """X (k, p) with rows blockdiag(R_l) b_j; residuals against blockdiag(G_l) (see the module docstring)."""
        start = time.perf_counter()
        b = check_directions(rhs, self.dim, "rhs").to(self.squared_norms.dtype)
        correction = torch.zeros_like(b)  # sum_i g_il (g_il . b_l) / (lambda_l + ||g_il||^2), per block
        for grads, norms in self._chunks():
            for l, (block, lam) in enumerate(zip(self.blocks, self.block_damping)):
                g = grads[:, block]
                correction[:, block] += ((b[:, block] @ g.T) / (lam + norms[:, l])) @ g
        solution = torch.empty_like(b)
        for block, lam in zip(self.blocks, self.block_damping):
            solution[:, block] = (b[:, block] - correction[:, block] / self.n_train) / lam
        seconds = time.perf_counter() - start
        residuals = (self.fisher_matvec(solution) - b).norm(dim=1) if self.measure_residuals else None
        return SolveResult(solution, residuals, None, seconds, {"block_damping": list(self.block_damping)})

    def fisher_matvec(self, vectors: Tensor) -> Tensor:
        """blockdiag(G_l) V = rows ((1/n) sum_i g_il g_il^T + lambda_l I) v_l, for V (k, p): the approximated matrix."""
        v = check_directions(vectors, self.dim).to(self.squared_norms.dtype)
        out = torch.zeros_like(v)
        for grads, _ in self._chunks():
            for block in self.blocks:
                g = grads[:, block]
                out[:, block] += (v[:, block] @ g.T) @ g
        out /= self.n_train
        for block, lam in zip(self.blocks, self.block_damping):
            out[:, block] += lam * v[:, block]
        return out

    # -- persistence -----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write squared norms (and gradients if stored) as safetensors, blocks and dampings as JSON."""
        tensors = {"squared_norms": self.squared_norms}
        if self.gradients is not None:
            tensors["gradients"] = self.gradients
        blocks = [{"name": name, "start": block.start, "stop": block.stop} for name, block in zip(self.block_names, self.blocks)]
        return save_tensors(
            directory,
            tensors,
            {"class": type(self).__name__, "dim": self.dim, "n_train": self.n_train, "blocks": blocks,
             "block_damping": self.block_damping, "include_weight_decay": self.include_weight_decay,
             "chunk_size": self.chunk_size, "measure_residuals": self.measure_residuals},
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], objective: Objective | None = None) -> DataInfSolver:
        """Rebuild a saved fit. ``objective`` is required unless gradients were stored.

        A given objective must have the saved p and n, and the gradient norms of
        its first examples must match the saved ones (else ``ValueError``: the
        model or data changed since the fit).
        """
        tensors, arguments = load_checked(directory, cls.__name__, objective)
        if objective is not None and objective.n_train != arguments["n_train"]:
            raise ValueError(f"{directory} was fitted on n = {arguments['n_train']} examples, the objective has {objective.n_train}")
        if objective is None and "gradients" not in tensors:
            raise ValueError(f"{directory} stores no gradients: pass the objective to load it")
        blocks = {entry["name"]: slice(entry["start"], entry["stop"]) for entry in arguments["blocks"]}
        names = [entry["name"] for entry in arguments["blocks"]]
        solver = cls(
            objective,
            damping=dict(zip(names, arguments["block_damping"])),
            blocks=blocks,
            include_weight_decay=arguments["include_weight_decay"],
            chunk_size=arguments["chunk_size"],
            measure_residuals=arguments.get("measure_residuals", arguments.get("measure_residual", True)),
            fitted=DataInfFit(tensors["squared_norms"], tensors.get("gradients")),
        )
        if objective is not None:
            solver._verify(objective)
        return solver

    def _verify(self, objective: Objective) -> None:
        count = min(_VERIFY_EXAMPLES, self.n_train)
        fresh = self._block_squared_norms(self._gradients_of(objective, torch.arange(count)))
        if not torch.allclose(fresh, self.squared_norms[:count], rtol=1e-6, atol=1e-12):
            raise ValueError("the objective's gradients differ from the saved DataInf fit (model or data changed)")
