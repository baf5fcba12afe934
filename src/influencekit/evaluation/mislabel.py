"""Mislabelled-data detection: rank training points by a score, inspect the top.

A fraction of the training labels is flipped to a different class (uniformly
among the other C - 1 classes), a model is trained on the noisy labels, and each
training point gets a suspicion score (higher = more likely flipped), e.g. its
self-influence g_i^T H^{-1} g_i, its TracIn self-influence sum_c eta_c ||g_ic||^2,
or (the baseline) its training loss. Reported:

* AUC: probability that a random flipped point scores higher than a random clean
  one (ties count 1/2), i.e. the Mann-Whitney U statistic / (n_flipped n_clean).
  A random scorer gives 0.5 in expectation with standard deviation
  sqrt((n_1 + n_0 + 1) / (12 n_1 n_0)); a perfect one gives 1.
* fraction found after inspecting a fraction q of the data: |flipped among the
  top ceil(q n)| / n_flipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip round(fraction n) labels, chosen at random, to a different random class.

    Returns:
        (noisy labels (n,), flipped mask (n,) bool). Seeded: the same arguments give the same flips.
    """
    labels = np.asarray(labels)
    n = len(labels)
    count = int(round(fraction * n))
    if not 1 <= count < n:
        raise ValueError(f"fraction {fraction} of n = {n} flips {count} labels; need 1 <= count < n")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=count, replace=False)
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=count)) % num_classes
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def _check(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, flipped = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(flipped, dtype=bool).reshape(-1)
    if scores.shape != flipped.shape:
        raise ValueError(f"scores and flipped must have the same length, got {scores.shape} and {flipped.shape}")
    if flipped.all() or not flipped.any():
        raise ValueError("need both flipped and clean points")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    return scores, flipped


def detection_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """P(score of a flipped point > score of a clean point) + P(tie) / 2 (the ROC AUC)."""
    scores, flipped = _check(scores, flipped)
    ranks = scipy.stats.rankdata(scores)
    n1, n0 = int(flipped.sum()), int((~flipped).sum())
    u = ranks[flipped].sum() - n1 * (n1 + 1) / 2
    return float(u / (n1 * n0))


def fraction_found(scores: np.ndarray, flipped: np.ndarray, inspected: float) -> float:
    """Fraction of the flipped points among the top ceil(inspected n) scores (ties broken by index)."""
    scores, flipped = _check(scores, flipped)
    top = np.argsort(-scores, kind="stable")[: math.ceil(inspected * len(scores))]
    return float(flipped[top].sum() / flipped.sum())


@dataclass(frozen=True)
class MislabelResult:
    """AUC and fraction of flipped points found per inspected fraction."""

    auc: float
    found: dict[float, float]

    def as_dict(self) -> dict:
        return {"mislabel_auc": self.auc, **{f"found_at_{int(round(100 * q))}pct": v for q, v in self.found.items()}}


def mislabel_detection(scores: np.ndarray, flipped: np.ndarray, inspected: Sequence[float] = (0.1, 0.2)) -> MislabelResult:
    """AUC and fraction found after inspecting each fraction in ``inspected`` (higher score = inspected first)."""
    return MislabelResult(detection_auc(scores, flipped), {float(q): fraction_found(scores, flipped, q) for q in inspected})
