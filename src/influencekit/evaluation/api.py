"""Evaluate an attribution method on your own model, given only a function that trains it on a subset."""

from __future__ import annotations

from typing import Any

import numpy as np

from influencekit.evaluation.lds import LDSResult, linear_datamodeling_score, subset_masks
from influencekit.evaluation.retrain import SubsetTrainer, subset_outputs


def evaluate_lds(
    trainer: SubsetTrainer,
    scores: np.ndarray,
    *,
    num_subsets: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    n_bootstrap: int = 1000,
    **run: Any,
) -> LDSResult:
    """LDS of ``scores`` (m, n) for the model that ``trainer`` trains.

    Draws ``num_subsets`` subsets of ``fraction`` of the n training points
    (:func:`~influencekit.evaluation.lds.subset_masks`), retrains on each with
    ``trainer`` (outputs (k, m) for masks (k, n); see
    :class:`~influencekit.evaluation.retrain.SubsetTrainer`), and correlates.
    ``run`` goes to :func:`~influencekit.evaluation.retrain.subset_outputs`
    (``cache_dir``, ``fingerprint``, ``workers``, ``scheduler_address``, ``batch_size``):
    give a ``cache_dir`` to retrain on Dask and to resume an interrupted run.
    ``scores[t, i]``: effect of *including* training point i on output t (for the
    test loss and influence functions: I_up,loss).
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = subset_masks(scores.shape[1], num_subsets, fraction, seed)
    actual = subset_outputs(trainer, masks, **run)
    return linear_datamodeling_score(scores, masks, actual, n_bootstrap=n_bootstrap, seed=seed)
