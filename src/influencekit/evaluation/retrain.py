"""Test outputs of models retrained on training subsets, for any model.

A *subset trainer* is the one thing the evaluation needs from a model: a
callable that takes boolean masks (k, n) of training subsets, trains one model
per mask and returns their outputs at the m test points, shape (k, m). The
output is whatever the attribution explains (the test loss, a margin, ...).
Batching k subsets into one call lets a trainer share work between them (the
softmax-regression trainer fits all k in shared matrix products). A trainer
that handles one subset at a time is wrapped by :class:`PerSubsetTrainer`.

:func:`subset_outputs` runs a trainer over many masks through
:func:`influencekit.validation.parallel.run_refits`: on a local Dask cluster
or a scheduler, each finished batch saved at once in a
:class:`~influencekit.validation.refit_cache.RefitCache`, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from influencekit.validation.parallel import run_refits
from influencekit.validation.refit_cache import RefitCache, fingerprint_of


class SubsetTrainer(Protocol):
    """``trainer(masks) -> outputs``: masks (k, n) bool, outputs (k, m) test outputs of the k retrained models."""

    def __call__(self, masks: np.ndarray) -> np.ndarray: ...


class PerSubsetTrainer:
    """A :class:`SubsetTrainer` from ``train(indices) -> (m,)`` that trains on one index set at a time.

    ``train`` receives the sorted training indices of a subset and returns the
    test outputs of a model trained on them (from scratch, with a fresh seed, to
    follow the field's protocol). It must be picklable to run on Dask (a
    module-level function or a picklable object).
    """

    def __init__(self, train: Callable[[np.ndarray], Any]):
        self.train = train

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.train(np.flatnonzero(mask)), dtype=np.float64).reshape(-1) for mask in masks])


def _train_batch(shared: tuple[SubsetTrainer, np.ndarray], batch: list[int]) -> list[dict[str, np.ndarray]]:
    trainer, masks = shared
    outputs = np.asarray(trainer(masks[batch]), dtype=np.float64)
    if outputs.ndim != 2 or outputs.shape[0] != len(batch):
        raise ValueError(f"the subset trainer returned shape {outputs.shape} for {len(batch)} masks; it must return (k, m)")
    return [{"outputs": row} for row in outputs]


def subset_outputs(
    trainer: SubsetTrainer,
    masks: np.ndarray,
    *,
    cache_dir: str | Path | None = None,
    fingerprint: str = "",
    workers: int = 0,
    scheduler_address: str | None = None,
    batch_size: int = 10,
    progress: bool = False,
) -> np.ndarray:
    """Outputs of a model retrained on each subset, shape (m, M) for masks (M, n).

    Args:
        trainer: see :class:`SubsetTrainer`.
        masks: boolean (M, n).
        cache_dir: where each finished batch is saved (resumable); None: no cache,
            in this process.
        fingerprint: identifies the trainer's setting (data, model, hyperparameters)
            in the cache, together with the masks; change it when they change.
        workers, scheduler_address, batch_size, progress: as in
            :func:`~influencekit.validation.parallel.run_refits` (``batch_size`` masks per call).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be (M, n), got shape {masks.shape}")
    indices = list(range(len(masks)))
    if cache_dir is None:
        if workers or scheduler_address:
            raise ValueError("running on Dask needs a cache_dir (results are saved there as they finish)")
        rows = [r["outputs"] for start in range(0, len(masks), batch_size)
                for r in _train_batch((trainer, masks), indices[start : start + batch_size])]
        return np.stack(rows, axis=1)
    cache = RefitCache(cache_dir, fingerprint_of(masks, setting=fingerprint, kind="subset-outputs"))
    results = run_refits(_train_batch, indices, cache, shared=(trainer, masks), workers=workers,
                         scheduler_address=scheduler_address, batch_size=batch_size, progress=progress)
    return np.stack([np.asarray(results[j]["outputs"], dtype=np.float64) for j in indices], axis=1)
