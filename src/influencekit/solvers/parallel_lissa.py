"""Parallel s_test: independent LiSSA chains on Dask workers, averaged by one all-reduce.

LiSSA's estimate of s_test = (H + damping I)^{-1} b is the mean of T
independent chains (repeats), chain r drawing its mini-batches from stream r of
``numpy.random.SeedSequence(seed)`` (:class:`~influencekit.solvers.lissa.LiSSASolver`).
FastIF (Guo et al. 2021) runs the chains asynchronously on separate workers and
synchronises once, averaging them with an all-reduce. :class:`ParallelLiSSASolver`
does that on a Dask cluster:

1. the curvature (which holds the objective and its training data) is sent
   to every worker once (``scatter`` with ``broadcast=True``), not once per
   task, and, with a given ``client``, once per solver rather than per solve;
   the right-hand sides once per solve;
2. each task runs a block of ``chains_per_task`` consecutive chains,
   ``LiSSASolver(..., repeats=chains_per_task, first_repeat=r, seed=seed)``, and
   returns the *sum* of their solutions (h_J / scale per chain);
3. a binary tree of addition tasks, pairing blocks in repeat order, sums the T
   solutions on the workers; the client divides the total by T.

With the same settings and seed the result equals the sequential
``LiSSASolver(curvature, ..., repeats=T, seed=seed).solve(rhs)`` up to the order of
floating-point summation (relative difference ~1e-16 in float64; tested at
<= 1e-12). The scale ``"auto"`` is resolved once, on the client, exactly as
the sequential solver does.

Cost: with one chain per task each chain is a separate Python loop of
``depth`` small products, whereas the sequential solver vectorises all T chains
into one product per step; ``chains_per_task = T / workers`` keeps that
vectorisation within each worker.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from distributed import Client, Future, as_completed, get_worker
from torch import Tensor
from tqdm.auto import tqdm

from influencekit.curvature.hessian import HessianOperator
from influencekit.linalg import check_directions
from influencekit.cluster import dask_client
from influencekit.solvers.base import SolveResult
from influencekit.solvers.lissa import LiSSADivergenceError, LiSSASettings, LiSSASolver

__all__ = ["ChainDivergedError", "ChainTiming", "ParallelLiSSASolver"]


class ChainDivergedError(RuntimeError):
    """A block of LiSSA chains diverged on a worker (a picklable stand-in for :class:`LiSSADivergenceError`).

    Attributes:
        first_repeat: index of the first chain of the block that diverged.
        suggested_scale: the scale the divergence check suggests.
        detail: the message of the original :class:`LiSSADivergenceError`.
    """

    def __init__(self, first_repeat: int, suggested_scale: float, detail: str):
        self.first_repeat, self.suggested_scale, self.detail = first_repeat, suggested_scale, detail
        super().__init__(f"LiSSA chains from repeat {first_repeat}: {detail}")

    def __reduce__(self) -> tuple[type, tuple[int, float, str]]:
        return type(self), (self.first_repeat, self.suggested_scale, self.detail)


@dataclass(frozen=True)
class ChainTiming:
    """Where and how long one task's block of chains ran.

    Attributes:
        first_repeat: index r of the block's first chain.
        repeats: chains in the block (repeat indices r .. r + repeats - 1).
        seconds: wall time of the block on its worker (LiSSA recursion only).
        worker: address of the Dask worker, or ``"in-process"``.
    """

    first_repeat: int
    repeats: int
    seconds: float
    worker: str


_Partial = tuple[Tensor, list[ChainTiming]]
"""A partial sum of chain solutions (k, p) and the timings of the chains it includes."""


def _run_chains(curvature: HessianOperator, rhs: Tensor, settings: LiSSASettings, first_repeat: int, repeats: int) -> _Partial:
    """Task body: chains first_repeat .. first_repeat + repeats - 1; returns the sum of their solutions."""
    block = replace(settings, repeats=repeats)
    solver = LiSSASolver.from_settings(curvature, block, first_repeat=first_repeat, measure_residuals=False, progress=False)
    start = time.perf_counter()
    try:
        solution = solver.solve(rhs).solution
    except LiSSADivergenceError as exc:  # its custom constructor does not survive pickling to the client
        raise ChainDivergedError(first_repeat, exc.suggested_scale, str(exc)) from None
    seconds = time.perf_counter() - start
    try:
        worker = get_worker().address
    except ValueError:  # not inside a Dask worker
        worker = "in-process"
    # LiSSA returns the mean of its block; one chain per block (the default) keeps it exact
    total = solution if repeats == 1 else solution * repeats
    return total, [ChainTiming(first_repeat, repeats, seconds, worker)]


def _warm_up() -> None:
    """Import the solver's modules (and torch) on a worker, so that the timed solve does not pay for it."""
    importlib.import_module("influencekit.solvers.lissa")


def _add(left: _Partial, right: _Partial) -> _Partial:
    """One node of the reduction tree: the sum of two partial sums."""
    return left[0] + right[0], left[1] + right[1]


class ParallelLiSSASolver(LiSSASolver):
    """LiSSA with its T chains spread over Dask workers and averaged by a tree all-reduce.

    The settings are resolved exactly as the sequential :class:`LiSSASolver` resolves them
    (``scale="auto"`` once, on the client).

    Args:
        curvature: a curvature with mini-batch products ``sampled_matvec``
            (e.g. :class:`HessianOperator` of an objective); it must be
            picklable, as it is sent to the workers. A tensor that is a view
            pickles with its whole underlying storage: give the objective
            compact tensors (``x[:n].clone()``, not ``x[:n]``).
        lissa: damping, scale, depth, repeats (T chains), batch_size, seed (see
            :class:`~influencekit.solvers.lissa.LiSSASettings`; :meth:`from_settings` takes them
            as one object), measure_residuals (one full pass on the client) and progress (a tqdm
            bar over finished chains), as for :class:`LiSSASolver`.
        workers: size of the cluster started for each solve
            (:func:`influencekit.cluster.local_cluster`: worker processes with one
            thread each). ``0`` runs the same tasks and reduction in this process,
            without Dask. Ignored when ``client`` or ``scheduler_address`` is given.
        scheduler_address: an existing Dask scheduler to use instead of a
            local cluster; its workers must be able to import influencekit.
        client: an existing :class:`distributed.Client` (not closed by the solver);
            saves the cluster start-up on repeated solves, and the curvature is
            sent to its workers on the first solve only (build a new solver
            after changing the objective).
        chains_per_task: consecutive chains per task (vectorised within the
            task); must divide ``repeats``.
    """

    def __init__(
        self,
        curvature: HessianOperator,
        *,
        workers: int = 2,
        scheduler_address: str | None = None,
        client: Client | None = None,
        chains_per_task: int = 1,
        **lissa: Any,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if client is not None and scheduler_address is not None:
            raise ValueError("pass either client or scheduler_address, not both")
        super().__init__(curvature, **lissa)
        if chains_per_task < 1 or self.settings.repeats % chains_per_task != 0:
            raise ValueError(f"chains_per_task must be >= 1 and divide repeats={self.settings.repeats}, got {chains_per_task}")
        self.workers, self.scheduler_address, self.client = workers, scheduler_address, client
        self.chains_per_task = chains_per_task
        self._scattered: Future | None = None  # the curvature on the workers of self.client

    def _blocks(self) -> list[tuple[int, int]]:
        return [(r, self.chains_per_task) for r in range(0, self.settings.repeats, self.chains_per_task)]

    def _bar(self) -> tqdm:
        disable = None if self.progress is None else not self.progress
        return tqdm(total=self.settings.repeats, desc="LiSSA chains", unit="chain", disable=disable)

    def solve(self, rhs: Tensor) -> SolveResult:
        """s_test rows (H + damping I)^{-1} b_j for rhs (k, p), as the mean of the T chains.

        Returns:
            :class:`SolveResult` with solution (k, p); ``iterations`` = depth x T
            per row; ``info``: ``scale``, ``tasks`` (a :class:`ChainTiming` per
            task, in repeat order), ``chain_seconds`` (tensor (tasks,), the
            same times), ``startup_seconds`` (cluster start and connection,
            and importing the solver on every worker: only the latter with a
            given client, 0 in-process), ``scatter_seconds``,
            ``compute_seconds`` (chains and reduction) and
            ``seconds_without_residual``.

        Raises:
            ChainDivergedError: a chain diverged (scale too small).
        """
        start = time.perf_counter()
        b = check_directions(rhs, self.curvature.dim, "rhs").to(self.curvature.dtype)
        timings: dict[str, float] = {}
        if self.client is None and self.scheduler_address is None and self.workers == 0:
            timings.update(startup_seconds=0.0, scatter_seconds=0.0)
            total, tasks = self._solve_in_process(b)
        else:
            total, tasks = self._solve_on_dask(b, timings)
        solution = total / self.settings.repeats
        seconds = time.perf_counter() - start
        residuals = self.residual_norms(solution, b)
        tasks = sorted(tasks, key=lambda t: t.first_repeat)
        info: dict[str, Any] = {
            "scale": self.scale,
            "tasks": tasks,
            "chain_seconds": torch.tensor([t.seconds for t in tasks], dtype=torch.float64),
            "seconds_without_residual": seconds,
            **timings,
        }
        iterations = torch.full((b.shape[0],), self.settings.depth * self.settings.repeats)
        return SolveResult(solution, residuals, iterations, time.perf_counter() - start, info)

    def _solve_in_process(self, rhs: Tensor) -> _Partial:
        partials = []
        settings = self.settings
        with self._bar() as bar:
            for first, count in self._blocks():
                partials.append(_run_chains(self.curvature, rhs, settings, first, count))
                bar.update(count)
        while len(partials) > 1:
            paired = [_add(partials[i], partials[i + 1]) for i in range(0, len(partials) - 1, 2)]
            partials = paired + partials[len(partials) - len(partials) % 2 :]
        return partials[0]

    def _curvature_on(self, client: Client) -> Future:
        """The curvature broadcast to every worker of ``client``; kept across solves for a given client."""
        if client is self.client and self._scattered is not None and self._scattered.status == "finished":
            return self._scattered
        [shared] = client.scatter([self.curvature], broadcast=True, hash=False)
        if client is self.client:
            self._scattered = shared
        return shared

    def _solve_on_dask(self, rhs: Tensor, timings: dict[str, float]) -> _Partial:
        begin = time.perf_counter()
        with dask_client(self.workers, self.scheduler_address, self.client) as client:
            client.run(_warm_up)
            timings["startup_seconds"] = time.perf_counter() - begin
            begin = time.perf_counter()
            curvature = self._curvature_on(client)
            [shared_rhs] = client.scatter([rhs], broadcast=True, hash=False)
            timings["scatter_seconds"] = time.perf_counter() - begin
            begin = time.perf_counter()
            settings = self.settings
            chains = [client.submit(_run_chains, curvature, shared_rhs, settings, first, count, pure=False)
                      for first, count in self._blocks()]
            level: list[Future] = list(chains)
            while len(level) > 1:
                paired = [client.submit(_add, level[i], level[i + 1], pure=False) for i in range(0, len(level) - 1, 2)]
                level = paired + level[len(level) - len(level) % 2 :]
            with self._bar() as bar:
                for _ in as_completed(chains):
                    bar.update(self.chains_per_task)
            total, tasks = level[0].result()
            timings["compute_seconds"] = time.perf_counter() - begin
            return total, tasks
