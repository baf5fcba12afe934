"""Resumable, parallel execution of many independent leave-one-out refits.

:func:`run_refits` evaluates ``refit_fn(shared, batch)`` for every requested
index that is not yet in a :class:`~influencekit.validation.refit_cache.RefitCache`,
on a Dask distributed cluster (or in-process), and saves each batch's results
as soon as the batch finishes. Interrupting a run (Ctrl-C, ``kill -9``, a
crash) loses at most the batches in flight; calling :func:`run_refits` again
with the same cache computes only what is missing.

Example::

    def refit(shared, batch):          # module-level, so workers can import it
        x, y = shared
        return [{"theta": fit(np.delete(x, i, 0), np.delete(y, i))} for i in batch]

    cache = RefitCache("refits", fingerprint_of(x, y, l2=1e-3))
    results = run_refits(refit, range(len(x)), cache, shared=(x, y), workers=4)
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distributed import as_completed
from distributed.client import FutureCancelledError
from tqdm.auto import tqdm

from influencekit.cluster import dask_client

if TYPE_CHECKING:
    # Only the client uses the cache; workers unpickling `_call_refit` then need
    # not import torch unless `refit_fn` does.
    from influencekit.validation.refit_cache import RefitCache

__all__ = ["run_refits"]

logger = logging.getLogger(__name__)

RefitFn = Callable[[Any, list[int]], Sequence[Mapping[str, Any]]]
"""``refit_fn(shared, batch)``: one result mapping per index of ``batch``, in order."""

_RESUBMISSIONS = 3
"""Times a batch whose result was lost (its worker died, the scheduler dropped the task) is resubmitted."""


def _call_refit(payload: tuple[RefitFn, Any], batch: list[int]) -> list[Mapping[str, Any]]:
    """Task body on a worker; ``payload`` is the scattered ``(refit_fn, shared)``."""
    refit_fn, shared = payload
    return list(refit_fn(shared, batch))


def _unique_indices(indices: Iterable[int]) -> list[int]:
    order: dict[int, None] = {}
    for index in indices:
        if isinstance(index, bool):
            raise TypeError("indices must be integers, got a bool.")
        i = operator.index(index)
        if i < 0:
            raise ValueError(f"indices must be non-negative, got {i}.")
        order[i] = None
    return list(order)


@dataclass
class _RefitRun:
    """One call of :func:`run_refits`: what every batch needs, and where its results go."""

    refit_fn: RefitFn
    shared: Any
    cache: RefitCache
    results: dict[int, dict[str, Any]]
    bar: tqdm

    def store(self, batch: list[int], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Check one batch's results and save each in the cache as soon as the batch is back."""
        if len(outputs) != len(batch):
            raise ValueError(
                f"refit_fn returned {len(outputs)} results for a batch of {len(batch)} indices "
                f"({batch[:5]}{'...' if len(batch) > 5 else ''}); it must return one per index."
            )
        for index, output in zip(batch, outputs):
            if not isinstance(output, Mapping):
                raise TypeError(
                    f"refit_fn returned a {type(output).__name__} for index {index}; "
                    f"each result must be a mapping of names to arrays or JSON values."
                )
        for index, output in zip(batch, outputs):
            self.results[index] = self.cache.put(index, output)
        self.bar.update(len(batch))

    def in_process(self, batches: list[list[int]]) -> None:
        for batch in batches:
            self.store(batch, self.refit_fn(self.shared, batch))

    def on_dask(self, batches: list[list[int]], workers: int, scheduler_address: str | None) -> None:
        with dask_client(workers, scheduler_address) as client:
            # One copy of the function and the shared data per worker, not per task.
            payloads = [client.scatter([(self.refit_fn, self.shared)], broadcast=True, hash=False)[0]]
            # each pending task -> (its batch, the index in `payloads` of the copy of the data it reads)
            pending = {client.submit(_call_refit, payloads[0], batch, pure=False): (batch, 0) for batch in batches}
            resubmitted: dict[int, int] = {}  # first index of a batch -> times resubmitted
            try:
                finished = as_completed(list(pending))
                for future in finished:
                    batch, generation = pending.pop(future)
                    try:
                        outputs = future.result()
                    except FutureCancelledError as error:
                        # A dead worker's tasks are rerun by the scheduler; this covers a result lost
                        # with it that the scheduler then gave up on ("lost dependencies" when the
                        # scattered data went with it too).
                        if resubmitted.get(batch[0], 0) >= _RESUBMISSIONS:
                            raise
                        resubmitted[batch[0]] = resubmitted.get(batch[0], 0) + 1
                        logger.warning("Resubmitting refits %s: %s", batch[:5], error)
                        if generation == len(payloads) - 1:  # the first loss seen of this copy: scatter afresh
                            payloads.append(client.scatter([(self.refit_fn, self.shared)], broadcast=True, hash=False)[0])
                        retry = client.submit(_call_refit, payloads[-1], batch, pure=False)
                        pending[retry] = (batch, len(payloads) - 1)
                        finished.add(retry)
                        continue
                    self.store(batch, outputs)
            finally:
                if pending:
                    client.cancel(list(pending))


def _saved_and_missing(order: list[int], cache: RefitCache) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The results already in ``cache`` by index, and the indices still to refit, in order."""
    results: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for index in order:
        stored = cache.get(index)
        if stored is None:
            todo.append(index)
        else:
            results[index] = stored
    return results, todo


def run_refits(
    refit_fn: RefitFn,
    indices: Iterable[int],
    cache: RefitCache,
    *,
    shared: Any = None,
    workers: int = 2,
    scheduler_address: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Compute (or load from ``cache``) one refit result per index.

    Indices already in ``cache`` are loaded, not recomputed. The others are
    split into batches of ``batch_size`` and ``refit_fn(shared, batch)`` is
    called once per batch; every batch's results are written to ``cache`` by
    this (the client) process as soon as that batch finishes, so an interrupted
    run resumes where it stopped.

    Args:
        refit_fn: ``refit_fn(shared, batch) -> results``, ``batch`` a list of
            ints and ``results`` a sequence of ``len(batch)`` mappings (see
            :meth:`RefitCache.put` for allowed values), in the order of
            ``batch``. With Dask it must be picklable: a module-level function
            or a picklable callable object. Keep large state out of it and in
            ``shared``.
        indices: training-point indices to refit without (non-negative ints;
            duplicates are computed once).
        cache: where results are read from and written to.
        shared: data every call needs (e.g. the ``(n, d)`` training matrix),
            passed as ``refit_fn``'s first argument. With Dask it is sent
            once to every worker together with ``refit_fn`` (``scatter`` with
            ``broadcast=True``), not once per task.
        workers: ``0`` runs every batch in this process, without Dask (for
            debugging, tests, and cheap problems); ``n >= 1`` starts a
            ``LocalCluster`` of ``n`` single-threaded worker processes (Dask
            sets ``OMP_NUM_THREADS=1`` in them, so use about one worker per
            core). Ignored when ``scheduler_address`` is given.
        scheduler_address: address of an existing Dask scheduler
            (e.g. ``"tcp://10.0.0.1:8786"``) to use instead of a local cluster;
            its workers must be able to import ``refit_fn``'s module. Start
            the workers first: ``shared`` is sent to the workers connected
            when the run starts (later ones copy it from them). A worker that
            dies mid-run loses only its tasks in flight; the scheduler reruns
            them on the others (a batch whose result was lost is resubmitted
            up to 3 times).
        batch_size: indices per ``refit_fn`` call (and per task).
        progress: show a tqdm progress bar over indices.

    Returns:
        ``{index: result}`` for every requested index, in the order first
        requested; values as :meth:`RefitCache.get` returns them.

    Raises:
        KeyboardInterrupt: re-raised after shutting down the cluster; the
            results saved so far stay in ``cache``.
        ValueError, TypeError: invalid arguments, or ``refit_fn`` returned the
            wrong number or kind of results. An exception raised by
            ``refit_fn`` propagates; finished batches stay saved.
    """
    if isinstance(workers, bool) or operator.index(workers) < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}.")
    if operator.index(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}.")
    if workers == 0 and scheduler_address is not None:
        raise ValueError("workers=0 runs in-process and cannot use scheduler_address.")
    order = _unique_indices(indices)

    results, todo = _saved_and_missing(order, cache)
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]

    with tqdm(
        total=len(order), initial=len(results), unit="refit", desc="refits", disable=not progress
    ) as bar:
        run = _RefitRun(refit_fn, shared, cache, results, bar)
        try:
            if batches and workers == 0:
                run.in_process(batches)
            elif batches:
                run.on_dask(batches, workers, scheduler_address)
        except KeyboardInterrupt:
            logger.warning(
                "Interrupted: %d of %d refits are saved in %s; run again to resume.",
                len(results),
                len(order),
                cache.path,
            )
            raise
    return {index: results[index] for index in order}
