"""Linear datamodeling score (LDS; Park et al. 2023, TRAK).

Setting: n training points, m test points, M random training subsets S_1..S_M,
each of size round(alpha n), drawn without replacement with a seeded generator.
A model retrained on S_j gives test outputs f(z_t; S_j) (the *actual* outputs,
shape (m, M)). An attribution method gives a score tau(z_t, i) per test and
training point, meaning "the contribution of *including* training point i to the
output at z_t". Its predicted group output is the additive model

    g(z_t; S_j) = sum_{i in S_j} tau(z_t, i)        (``group_effects``),

and the LDS is the Spearman rank correlation, over the M subsets, between g and
f, per test point, averaged over test points:

    LDS = (1/m) sum_t spearman_j( g(z_t; S_j), f(z_t; S_j) ).

Sign: an additive constant and a positive factor do not change the LDS, but the
sign does. With the output "test loss", influence functions give
tau(z_t, i) = I_up,loss(z_i, z_t) (up to the positive factor 1/|S|): at the
optimum sum_i g_i = 0, so the first-order change of the loss when training on
S instead of all points is (1/|S|) sum_{i in S} I_up,loss(z_i, z_t). TracIn's
positive = helpful (lowers the loss), so tau = -TracIn for the loss.

Uncertainty: percentile bootstrap intervals (i) over test points (resample
the per-test correlations), (ii) over subsets (resample the M columns), (iii)
over both at once. Resampling subsets resamples the pairs of *ranks* and
recomputes their Pearson correlation; re-ranking a resample would count every
swapped pair once per duplicate and bias the correlation down (for LDS near 1,
by more than its spread, so the interval would miss the estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats


def subset_masks(n: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """M random subsets of size round(fraction n) of range(n), as a boolean mask (M, n).

    Subset j uses ``numpy.random.default_rng(SeedSequence(seed).spawn(M)[j])``, so
    the first k subsets do not depend on M.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = int(round(fraction * n))
    if not 1 <= size < n:
        raise ValueError(f"fraction {fraction} of n = {n} gives subsets of size {size}; need 1 <= size < n")
    if num_subsets < 2:
        raise ValueError(f"need at least 2 subsets for a rank correlation, got {num_subsets}")
    masks = np.zeros((num_subsets, n), dtype=bool)
    for j, stream in enumerate(np.random.SeedSequence(seed).spawn(num_subsets)):
        masks[j, np.random.default_rng(stream).choice(n, size=size, replace=False)] = True
    return masks


def group_effects(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted group outputs g(z_t; S_j) = sum_{i in S_j} tau(z_t, i): (m, n), (M, n) -> (m, M)."""
    scores, masks = np.asarray(scores, dtype=np.float64), np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"need scores (m, n) and masks (M, n), got {scores.shape} and {masks.shape}")
    return scores @ masks.astype(np.float64).T


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (m, k) -> (m,); NaN for a constant row."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (ties: average ranks): (m, k) -> (m,).

    NaN for a row where either side is constant.
    """
    return rowwise_pearson(scipy.stats.rankdata(a, axis=1), scipy.stats.rankdata(b, axis=1))


@dataclass(frozen=True)
class LDSResult:
    """An LDS and its uncertainty.

    Attributes:
        lds: mean over test points of the per-test Spearman correlations.
        per_test: the per-test correlations, shape (m,) (NaN where a side was constant;
            those test points are left out of every mean).
        ci: percentile bootstrap interval resampling test points and subsets together.
        ci_test_points: interval resampling test points only.
        ci_subsets: interval resampling subsets only.
        confidence: the intervals' level.
        n_bootstrap: bootstrap replicates per interval.
    """

    lds: float
    per_test: np.ndarray
    ci: tuple[float, float]
    ci_test_points: tuple[float, float]
    ci_subsets: tuple[float, float]
    confidence: float
    n_bootstrap: int

    def as_dict(self) -> dict:
        return {"lds": self.lds, "lds_ci": list(self.ci), "lds_ci_test_points": list(self.ci_test_points),
                "lds_ci_subsets": list(self.ci_subsets), "confidence": self.confidence, "n_bootstrap": self.n_bootstrap}


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 50 * (1 - confidence)
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def linear_datamodeling_score(
    scores: np.ndarray,
    masks: np.ndarray,
    actual: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS of an attribution method (see the module docstring).

    Args:
        scores: tau, shape (m, n): contribution of including training point i to the
            output at test point t (for the test loss and influence functions: I_up,loss).
        masks: the subsets, boolean (M, n).
        actual: outputs of the models retrained on each subset, shape (m, M).
        n_bootstrap: replicates per bootstrap interval (0: intervals are (nan, nan)).
        confidence: level of the percentile intervals.
        seed: seed of the bootstrap resampling.
    """
    actual = np.asarray(actual, dtype=np.float64)
    predicted = group_effects(scores, masks)
    if actual.shape != predicted.shape:
        raise ValueError(f"actual must have shape (m, M) = {predicted.shape}, got {actual.shape}")
    per_test = rowwise_spearman(predicted, actual)
    valid = ~np.isnan(per_test)
    if not valid.any():
        raise ValueError("every test point has a constant predicted or actual output over the subsets; the LDS is undefined")
    predicted_ranks, actual_ranks = scipy.stats.rankdata(predicted, axis=1), scipy.stats.rankdata(actual, axis=1)
    rng = np.random.default_rng(seed)
    m, num_subsets = predicted.shape
    nan_pair = (float("nan"), float("nan"))
    by_test, by_subset, joint = [], [], []
    for _ in range(n_bootstrap):
        rows = rng.integers(0, m, size=m)
        columns = rng.integers(0, num_subsets, size=num_subsets)
        by_test.append(np.nanmean(per_test[rows]))
        resampled = rowwise_pearson(predicted_ranks[:, columns], actual_ranks[:, columns])
        by_subset.append(np.nanmean(resampled))
        joint.append(np.nanmean(resampled[rows]))
    return LDSResult(
        lds=float(np.mean(per_test[valid])),
        per_test=per_test,
        ci=_interval(np.array(joint), confidence) if n_bootstrap else nan_pair,
        ci_test_points=_interval(np.array(by_test), confidence) if n_bootstrap else nan_pair,
        ci_subsets=_interval(np.array(by_subset), confidence) if n_bootstrap else nan_pair,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
    )
