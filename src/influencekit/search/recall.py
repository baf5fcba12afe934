"""Recall of a search against the truth: the one recall function of the library."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["recall_at_k"]


def recall_at_k(retrieved: Tensor | np.ndarray, true_top: Tensor | np.ndarray) -> Tensor:
    """R@k = |retrieved ∩ true_top| / k per query, with k = the number of true top points.

    Used for nearest-neighbour indexes against an exact one (k nearest), and for FastIF's
    influence search against the full ranking (R@m of Guo et al. 2021).

    Args:
        retrieved: indices returned by a search, shape (r,) or (q, r) (one row per
            query); order and duplicates do not matter; negative entries (FAISS's
            "no result") count as misses.
        true_top: the true top-k indices, shape (k,) or (q, k), distinct within a row.

    Returns:
        Recall in [0, 1] (float64): a 0-dim tensor for 1-D inputs, else shape (q,);
        ``.mean()`` averages over queries.
    """
    retrieved, true_top = torch.as_tensor(retrieved), torch.as_tensor(true_top)
    if retrieved.dim() != true_top.dim() or retrieved.dim() not in (1, 2):
        raise ValueError(f"retrieved and true_top must both be 1-D or both 2-D, got shapes {tuple(retrieved.shape)} and {tuple(true_top.shape)}")
    single = retrieved.dim() == 1
    if single:
        retrieved, true_top = retrieved.unsqueeze(0), true_top.unsqueeze(0)
    if retrieved.shape[0] != true_top.shape[0]:
        raise ValueError(f"retrieved has {retrieved.shape[0]} rows, true_top {true_top.shape[0]}")
    m = true_top.shape[1]
    if m == 0:
        raise ValueError("true_top must hold at least one index per row")
    recalls = torch.empty(true_top.shape[0], dtype=torch.float64)
    for row, (found, truth) in enumerate(zip(retrieved, true_top)):
        if torch.unique(truth).numel() != m:
            raise ValueError(f"true_top row {row} contains duplicate indices")
        recalls[row] = torch.isin(truth, found).sum().item() / m
    return recalls[0] if single else recalls
