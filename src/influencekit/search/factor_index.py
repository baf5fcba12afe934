"""Exact last-layer TracIn top-k from the gradient factors, without forming embeddings.

For an ``nn.Linear`` last layer the TracIn score is (see :class:`LastLayerTracIn`)

    score(z, z') = sum_c eta_c (g_c . g'_c) (a_c . a'_c),

with g_c = dl/dz (C values) and a_c the layer input (d values, a trailing 1 for
the bias) at checkpoint c. An influence embedding stores the C d products of
every checkpoint; this index stores the C + d factors instead and scores all n
training points with two matrix-vector products per checkpoint. The scores are
the same (float32 rounding aside), the memory n sum_c (C + d) floats instead of
n sum_c C d, and a query reads that much less memory: on W1 (C = 10, d = 784)
a tenth. Proponents are the largest scores, opponents the smallest, as in
:class:`~influencekit.search.InnerProductIndex`, whose ``SearchResult``
this returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from influencekit.search.faiss_index import SearchResult, as_float_matrix
from influencekit.tracin.tracincp import LastLayerTracIn, TracInData

__all__ = ["LastLayerFactorIndex"]


def _factors(tracin: LastLayerTracIn, data: TracInData) -> tuple[list[Tensor], list[Tensor]]:
    """Per checkpoint, the stacked g (n, C) and a (n, d) of ``data``."""
    gradients, inputs = [], []
    for c in range(tracin.num_checkpoints):
        parts = list(tracin.iter_factors(data, c))
        gradients.append(torch.cat([g for g, _ in parts]))
        inputs.append(torch.cat([a for _, a in parts]))
    return gradients, inputs


class LastLayerFactorIndex:
    """Exact TracIn search over per-checkpoint factors ``(G_c, A_c)`` of the training set.

    Args:
        gradients: per checkpoint, G_c of shape (n, C): dl/dz of every training example.
        inputs: per checkpoint, A_c of shape (n, d): the layer inputs (with the bias column).
        learning_rates: eta_c per checkpoint.
        dtype: storage and arithmetic precision (float32 by default, like FAISS).
    """

    def __init__(
        self,
        gradients: Sequence[np.ndarray | Tensor],
        inputs: Sequence[np.ndarray | Tensor],
        learning_rates: Sequence[float],
        dtype: np.dtype | type = np.float32,
    ) -> None:
        if not (len(gradients) == len(inputs) == len(learning_rates)) or not gradients:
            raise ValueError(
                f"need one (gradients, inputs, learning rate) per checkpoint, got {len(gradients)}, "
                f"{len(inputs)} and {len(learning_rates)}"
            )
        self.dtype = np.dtype(dtype)
        self.gradients = [as_float_matrix(g, f"gradients[{c}]", dtype=self.dtype) for c, g in enumerate(gradients)]
        self.inputs = [as_float_matrix(a, f"inputs[{c}]", dtype=self.dtype) for c, a in enumerate(inputs)]
        self.learning_rates = [float(eta) for eta in learning_rates]
        n = self.gradients[0].shape[0]
        for c, (g, a) in enumerate(zip(self.gradients, self.inputs)):
            if g.shape[0] != n or a.shape[0] != n:
                raise ValueError(f"checkpoint {c}: {g.shape[0]} gradients and {a.shape[0]} inputs, expected {n} of each")
        self.ntotal = n

    @classmethod
    def from_tracin(cls, tracin: LastLayerTracIn, train_data: TracInData, dtype: np.dtype | type = np.float32) -> LastLayerFactorIndex:
        """Compute and store the factors of ``train_data`` at every checkpoint of ``tracin``."""
        return cls(*_factors(tracin, train_data), tracin.learning_rates, dtype)

    @staticmethod
    def query_factors(tracin: LastLayerTracIn, test_batch: TracInData) -> tuple[list[Tensor], list[Tensor]]:
        """The factors ``(g_c, a_c)`` of test examples per checkpoint, each (m, C) and (m, d)."""
        return _factors(tracin, test_batch)

    @property
    def nbytes(self) -> int:
        """Memory held by the factors."""
        return sum(g.nbytes + a.nbytes for g, a in zip(self.gradients, self.inputs))

    def scores(self, query_gradients: Sequence[np.ndarray | Tensor], query_inputs: Sequence[np.ndarray | Tensor]) -> np.ndarray:
        """TracIn scores of every training example for m queries, shape (m, n); positive = proponent."""
        if len(query_gradients) != len(self.gradients) or len(query_inputs) != len(self.inputs):
            raise ValueError(f"need the query factors of all {len(self.gradients)} checkpoints")
        total: np.ndarray | None = None
        for c, eta in enumerate(self.learning_rates):
            qg = as_float_matrix(query_gradients[c], f"query_gradients[{c}]", dtype=self.dtype)
            qa = as_float_matrix(query_inputs[c], f"query_inputs[{c}]", dtype=self.dtype)
            if qg.shape[1] != self.gradients[c].shape[1] or qa.shape[1] != self.inputs[c].shape[1]:
                raise ValueError(
                    f"checkpoint {c}: query factors of widths {qg.shape[1]}, {qa.shape[1]}; the index has "
                    f"{self.gradients[c].shape[1]}, {self.inputs[c].shape[1]}"
                )
            block = (qg @ self.gradients[c].T) * (qa @ self.inputs[c].T)
            total = eta * block if total is None else total + eta * block
        assert total is not None
        return total

    def _top(self, scores: np.ndarray, k: int, largest: bool) -> SearchResult:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be an int in [1, ntotal={self.ntotal}], got {k!r}")
        signed = -scores if largest else scores
        part = np.argpartition(signed, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(signed, part, axis=1).argsort(axis=1, kind="stable")
        ids = np.take_along_axis(part, order, axis=1)
        return SearchResult(np.take_along_axis(scores, ids, axis=1), ids)

    def search(self, query_gradients: Sequence[np.ndarray | Tensor], query_inputs: Sequence[np.ndarray | Tensor], k: int) -> tuple[SearchResult, SearchResult]:
        """Proponents (k largest scores, descending) and opponents (k smallest, ascending) from one scoring pass."""
        scores = self.scores(query_gradients, query_inputs)
        return self._top(scores, k, largest=True), self._top(scores, k, largest=False)
