"""Top-k proponents/opponents by maximum inner product search with FAISS.

Influence embeddings (:mod:`influencekit.tracin.embeddings`) turn the TracIn
score into an inner product, so the proponents of a test example are the
training embeddings with the **largest** inner product with its embedding, and
the opponents those with the **smallest** (most negative) one -- found by
searching with the negated query.

FAISS works in float32: embeddings and queries are converted to contiguous
float32 arrays (float64 input loses precision, relative ~1e-7), and returned
scores are float32 inner products. Near-ties may therefore be ordered
differently from a float64 computation; rescore the returned candidates with
the float64 embeddings where exact scores matter.

Index kinds:

* ``"flat"``: ``faiss.IndexFlatIP``, exact brute force.
* ``"hnsw"``: ``faiss.IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``,
  approximate; ``hnsw_m`` (graph degree), ``ef_construction`` and
  ``ef_search`` trade speed for recall.
* ``"ivf"``: ``faiss.IndexIVFFlat`` over a ``IndexFlatIP`` coarse quantizer,
  approximate; needs training (k-means with ``nlist`` lists) before adding;
  ``nprobe`` lists are visited per query.

Measure the loss of an approximate index with :meth:`InnerProductIndex.recall_vs`
(recall@k against an exact index, see :func:`recall_at_k`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NamedTuple

import faiss
import numpy as np
from torch import Tensor

from influencekit.search.recall import recall_at_k

__all__ = ["IndexKind", "InnerProductIndex", "RecallReport", "SearchResult", "as_float_matrix", "make_faiss_index"]

IndexKind = Literal["flat", "hnsw", "ivf"]

ArrayLike = np.ndarray | Tensor


class SearchResult(NamedTuple):
    """Result of a search; both arrays have shape ``(n_queries, k)``.

    ``ids`` index the vectors in the order they were added (for embeddings
    written in training-data order: the training index); ``-1`` marks a slot
    that an approximate index could not fill. ``scores`` are float32 inner
    products (TracIn scores for influence embeddings), best first: descending
    for proponents, ascending (most negative first) for opponents; the score
    in a ``-1`` slot is meaningless.
    """

    scores: np.ndarray
    ids: np.ndarray


class RecallReport(NamedTuple):
    """Recall@k of an approximate index against an exact one over a query set."""

    k: int
    n_queries: int
    proponent_recall: float
    opponent_recall: float


def as_float_matrix(x: ArrayLike, what: str, dim: int | None = None, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Contiguous ``(n, dim)`` array of ``x`` in ``dtype`` (float32 for FAISS), checked finite."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x), dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} has dimension {arr.shape[1]}, the index has {dim}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf (after conversion to {np.dtype(dtype).name})")
    return arr


def make_faiss_index(
    dim: int,
    kind: IndexKind,
    metric: int,
    *,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
    nlist: int,
    nprobe: int,
) -> faiss.Index:
    """An empty FAISS index of ``kind`` for ``metric`` (``faiss.METRIC_INNER_PRODUCT`` or ``faiss.METRIC_L2``).

    ``"flat"``: exact; ``"hnsw"``: ``IndexHNSWFlat`` (graph degree ``hnsw_m``, beam
    widths ``ef_construction`` and ``ef_search``); ``"ivf"``: ``IndexIVFFlat`` over a flat
    coarse quantizer with ``nlist`` lists, ``nprobe`` visited per query (train before adding).
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if kind == "flat":
        return faiss.IndexFlat(dim, metric)
    if kind == "hnsw":
        if hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError(f"need hnsw_m >= 2, ef_construction >= 1, ef_search >= 1; got {hnsw_m}, {ef_construction}, {ef_search}")
        index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        return index
    if kind == "ivf":
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"need 1 <= nprobe <= nlist, got nprobe={nprobe}, nlist={nlist}")
        index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, nlist, metric)
        index.nprobe = nprobe
        return index
    raise ValueError(f"kind must be 'flat', 'hnsw' or 'ivf', got {kind!r}")


class InnerProductIndex:
    """Inner-product (MIPS) index over embeddings, for TracIn proponents and opponents.

    Args:
        dim: embedding dimension.
        kind: ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"`` (approximate).
        hnsw_m, ef_construction, ef_search: HNSW graph degree, build-time and
            query-time beam widths (``kind="hnsw"``).
        nlist, nprobe: number of inverted lists and lists visited per query
            (``kind="ivf"``).
    """

    def __init__(
        self,
        dim: int,
        kind: IndexKind = "flat",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int = 64,
        nprobe: int = 8,
    ) -> None:
        self.dim = int(dim)
        self.kind: IndexKind = kind
        self._index = make_faiss_index(
            self.dim, kind, faiss.METRIC_INNER_PRODUCT, hnsw_m=hnsw_m, ef_construction=ef_construction,
            ef_search=ef_search, nlist=nlist, nprobe=nprobe,
        )

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """False only for an IVF index that has not been trained yet."""
        return bool(self._index.is_trained)

    def train(self, sample: ArrayLike) -> None:
        """Train the IVF coarse quantizer on ``sample`` ``(n >= nlist, dim)``; not needed for flat/HNSW."""
        if self.kind != "ivf":
            raise ValueError(f"a '{self.kind}' index needs no training")
        arr = as_float_matrix(sample, "training sample", self.dim)
        if arr.shape[0] < self._index.nlist:
            raise ValueError(f"IVF training needs at least nlist={self._index.nlist} vectors, got {arr.shape[0]}")
        self._index.train(arr)

    def add(self, embeddings: ArrayLike) -> None:
        """Append ``embeddings`` ``(n, dim)``; they get ids ``ntotal .. ntotal + n - 1``."""
        if not self.is_trained:
            raise RuntimeError("train the IVF index (train(...)) before adding vectors")
        arr = as_float_matrix(embeddings, "embeddings", self.dim)
        self._index.add(arr)

    @classmethod
    def from_array(cls, embeddings: ArrayLike, kind: IndexKind = "flat", **options: int) -> InnerProductIndex:
        """Build an index from in-memory embeddings ``(n, dim)`` (IVF is trained on all of them)."""
        arr = as_float_matrix(embeddings, "embeddings")
        index = cls(arr.shape[1], kind, **options)
        if kind == "ivf":
            index.train(arr)
        index.add(arr)
        return index

    @classmethod
    def from_chunks(
        cls,
        chunks: Iterable[ArrayLike],
        kind: IndexKind = "flat",
        *,
        train_size: int | None = None,
        **options: int,
    ) -> InnerProductIndex:
        """Build an index from a stream of embedding chunks, e.g. :func:`iter_embedding_chunks`.

        Ids follow the order of the rows across chunks. For ``kind="ivf"`` the
        first ``train_size`` rows (default ``64 * nlist``; faiss advises at
        least ~39 per list) are buffered to train the quantizer, then added;
        otherwise only one chunk is in memory at a time.
        """
        index: InnerProductIndex | None = None
        pending: list[np.ndarray] = []
        buffered = 0
        for i, chunk in enumerate(chunks):
            arr = as_float_matrix(chunk, f"chunk {i}", None if index is None else index.dim)
            if index is None:
                index = cls(arr.shape[1], kind, **options)
                if kind == "ivf" and train_size is None:
                    train_size = 64 * index._index.nlist
            if index.is_trained:
                index.add(arr)
                continue
            pending.append(arr)
            buffered += arr.shape[0]
            if train_size is not None and buffered >= train_size:
                index._train_and_flush(pending)
        if index is None:
            raise ValueError("no embedding chunks given")
        if not index.is_trained:
            index._train_and_flush(pending)
        return index

    def _train_and_flush(self, pending: list[np.ndarray]) -> None:
        sample = np.concatenate(pending)
        self.train(sample)
        self.add(sample)
        pending.clear()

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be an int in [1, ntotal={self.ntotal}], got {k!r}")
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def proponents(self, queries: ArrayLike, k: int) -> SearchResult:
        """The ``k`` stored vectors with the largest inner product with each query (descending)."""
        q = as_float_matrix(queries, "queries", self.dim)
        scores, ids = self._search(q, k)
        return SearchResult(scores, ids)

    def opponents(self, queries: ArrayLike, k: int) -> SearchResult:
        """The ``k`` stored vectors with the smallest inner product with each query (ascending).

        Searches with ``-query`` (``max <-q, x> = -min <q, x>``) and negates the
        scores back, so they are the actual (typically negative) inner products.
        """
        q = as_float_matrix(queries, "queries", self.dim)
        scores, ids = self._search(-q, k)
        return SearchResult(-scores, ids)

    def recall_vs(self, exact: InnerProductIndex, queries: ArrayLike, k: int) -> RecallReport:
        """Recall@k of this index's proponents and opponents against ``exact`` (a flat index, same vectors)."""
        if exact.kind != "flat":
            raise ValueError(f"the reference must be an exact 'flat' index, got '{exact.kind}'")
        if exact.ntotal != self.ntotal or exact.dim != self.dim:
            raise ValueError(
                f"the indexes differ: {self.ntotal} x {self.dim} here, {exact.ntotal} x {exact.dim} in the reference"
            )
        q = as_float_matrix(queries, "queries", self.dim)
        pro = float(recall_at_k(self.proponents(q, k).ids, exact.proponents(q, k).ids).mean())
        opp = float(recall_at_k(self.opponents(q, k).ids, exact.opponents(q, k).ids).mean())
        return RecallReport(k=k, n_queries=q.shape[0], proponent_recall=pro, opponent_recall=opp)
