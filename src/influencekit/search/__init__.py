"""Nearest-neighbour search, the one place it lives: FAISS indexes, the exact factor index, recall.

* :class:`InnerProductIndex` -- top-k proponents / opponents by maximum inner product
  (TracIn's influence embeddings), exact or approximate (HNSW / IVF).
* :class:`LastLayerFactorIndex` -- exact last-layer TracIn top-k from the factors (g, a).
* :class:`KNNCandidateSelector` -- L2 nearest neighbours of features (FastIF's pre-selection).
* :func:`recall_at_k` -- recall of a search against the truth.
"""

from influencekit.search.factor_index import LastLayerFactorIndex
from influencekit.search.faiss_index import (
    IndexKind,
    InnerProductIndex,
    RecallReport,
    SearchResult,
    as_float_matrix,
    make_faiss_index,
)
from influencekit.search.knn import KNNCandidateSelector
from influencekit.search.recall import recall_at_k

__all__ = [
    "IndexKind",
    "InnerProductIndex",
    "KNNCandidateSelector",
    "LastLayerFactorIndex",
    "RecallReport",
    "SearchResult",
    "as_float_matrix",
    "make_faiss_index",
    "recall_at_k",
]
