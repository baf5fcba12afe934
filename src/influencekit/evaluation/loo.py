"""Leave-one-out (LOO) correlation: predicted vs. actual change of a test output when one point is removed.

For removed points i_1..i_k and test points z_1..z_m, the actual effect is
f(z_t; all but i) - f(z_t; all), computed by retraining (any model, through a
:class:`~influencekit.evaluation.retrain.SubsetTrainer`), and a method's
prediction is its predicted removal effect (for influence functions and the test
loss: ``predicted_loss_change`` = -(1/n) I_up,loss). The LOO correlation is the
Pearson (and Spearman) correlation over the k removed points, per test point,
averaged over test points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from influencekit.evaluation.lds import rowwise_pearson, rowwise_spearman
from influencekit.evaluation.retrain import SubsetTrainer, subset_outputs


def leave_one_out_effects(trainer: SubsetTrainer, n: int, removed: Sequence[int], **run: Any) -> np.ndarray:
    """Actual f(z_t; all but i) - f(z_t; all) for each removed i: shape (m, k).

    ``run`` goes to :func:`~influencekit.evaluation.retrain.subset_outputs`
    (cache, Dask workers or scheduler, batch size). The full model is trained by
    the same trainer (first mask), so both sides follow one protocol.
    """
    masks = np.ones((len(removed) + 1, n), dtype=bool)
    masks[np.arange(1, len(removed) + 1), np.asarray(removed, dtype=np.int64)] = False
    outputs = subset_outputs(trainer, masks, **run)
    return outputs[:, 1:] - outputs[:, :1]


@dataclass(frozen=True)
class LOOResult:
    """Mean over test points of the per-test correlations (over removed points), and the per-test values."""

    pearson: float
    spearman: float
    per_test_pearson: np.ndarray
    per_test_spearman: np.ndarray

    def as_dict(self) -> dict:
        return {"loo_pearson": self.pearson, "loo_spearman": self.spearman}


def leave_one_out_correlation(predicted: np.ndarray, actual: np.ndarray) -> LOOResult:
    """Correlate predicted and actual removal effects, both (m, k) (or (k,) for one test point)."""
    predicted = np.atleast_2d(np.asarray(predicted, dtype=np.float64))
    actual = np.atleast_2d(np.asarray(actual, dtype=np.float64))
    if predicted.shape != actual.shape or predicted.shape[1] < 3:
        raise ValueError(f"need predicted and actual of one shape (m, k) with k >= 3, got {predicted.shape} and {actual.shape}")
    pearson, spearman = rowwise_pearson(predicted, actual), rowwise_spearman(predicted, actual)
    return LOOResult(float(np.nanmean(pearson)), float(np.nanmean(spearman)), pearson, spearman)
