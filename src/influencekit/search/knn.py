"""k nearest neighbours by L2 distance between features (FAISS): FastIF's candidate pre-selection."""

from __future__ import annotations

import time

import faiss
import numpy as np
import torch
from torch import Tensor

from influencekit.search.faiss_index import IndexKind, as_float_matrix, make_faiss_index
from influencekit.search.recall import recall_at_k

__all__ = ["KNNCandidateSelector"]


class KNNCandidateSelector:
    """L2 nearest neighbours of queries among the training points' features (FAISS).

    Args:
        features: one feature row per training point, shape (n, f), in
            training-index order (row i is training point i). Any floating
            dtype; stored and searched in float32, so distances carry a
            relative rounding error of about 1e-7 and near-ties may be ordered
            differently from a float64 computation.
        kind: ``"flat"``: exact (``IndexFlatL2``), a pass over all n x f
            features per query (memory-bound); ``"hnsw"``: ``IndexHNSWFlat``,
            approximate (graph degree ``hnsw_m``, beam widths
            ``ef_construction`` and ``ef_search``; a search for k neighbours
            uses the beam max(ef_search, k)); ``"ivf"``: ``IndexIVFFlat``,
            approximate (k-means on all features into ``nlist`` lists, default
            4 sqrt(n); ``nprobe`` of them scanned per query, default nlist / 16).
            Measure what an approximate index loses with :meth:`recall_vs`.

    Attributes:
        build_seconds: wall time of building (and training) the index.
        ef_search, nprobe: the search-time settings of an HNSW / IVF index; may be
            changed between searches (speed against recall) without rebuilding.
    """

    def __init__(
        self,
        features: Tensor | np.ndarray,
        kind: IndexKind = "flat",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 128,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int | None = None,
    ):
        start = time.perf_counter()
        arr = as_float_matrix(features, "features")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"need at least one training point and one feature, got shape {arr.shape}")
        if nlist is None:
            nlist = max(1, min(arr.shape[0], round(4 * arr.shape[0] ** 0.5)))
        if nprobe is None:
            nprobe = max(1, nlist // 16)
        self.nlist, self.nprobe = int(nlist), int(nprobe)
        self.dim = int(arr.shape[1])
        self.kind: IndexKind = kind
        self.ef_search = int(ef_search)
        self._index = make_faiss_index(
            self.dim, kind, faiss.METRIC_L2, hnsw_m=hnsw_m, ef_construction=ef_construction,
            ef_search=ef_search, nlist=nlist, nprobe=nprobe,
        )
        if kind == "ivf":
            if arr.shape[0] < nlist:
                raise ValueError(f"an IVF index with nlist={nlist} needs at least that many training points, got {arr.shape[0]}")
            self._index.train(arr)
        self._index.add(arr)
        self.build_seconds = time.perf_counter() - start

    @property
    def n_train(self) -> int:
        """Number n of indexed training points."""
        return int(self._index.ntotal)

    def search(self, query_features: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """The k nearest training points of each query.

        Args:
            query_features: shape (m, f), the same feature map as the training points.
            k: number of neighbours, 1 <= k <= n.

        Returns:
            ``(squared_distances, indices)``, both (m, k), nearest first:
            float32 squared L2 distances and int64 training indices.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n_train:
            raise ValueError(f"k must be an int in [1, n_train={self.n_train}], got {k!r}")
        queries = as_float_matrix(query_features, "query features", self.dim)
        if self.kind == "hnsw":  # a beam narrower than k cannot return k neighbours
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, int(k)))
            distances, ids = self._index.search(queries, int(k), params=params)
        elif self.kind == "ivf":
            if not 1 <= self.nprobe <= self.nlist:
                raise ValueError(f"need 1 <= nprobe <= nlist = {self.nlist}, got nprobe = {self.nprobe}")
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
            distances, ids = self._index.search(queries, int(k), params=params)
        else:
            distances, ids = self._index.search(queries, int(k))
        missing = int((ids < 0).sum(axis=1).max())
        if missing:
            remedy = "raise nprobe" if self.kind == "ivf" else "raise ef_search"
            raise RuntimeError(
                f"the {self.kind} index returned only {k - missing} of the k = {k} neighbours for some query: "
                f"{remedy}, or use the exact flat index"
            )
        return torch.from_numpy(distances), torch.from_numpy(ids.astype(np.int64))

    def candidates(self, query_features: Tensor | np.ndarray, k: int) -> Tensor:
        """Training indices of the k nearest neighbours of each query, nearest first: LongTensor (m, k).

        The k nearest are the first k of any larger k' nearest (up to ties at
        the boundary), so one search with the largest k serves every smaller k.
        """
        return self.search(query_features, k)[1]

    def recall_vs(self, exact: "KNNCandidateSelector", query_features: Tensor | np.ndarray, k: int) -> float:
        """Mean over queries of |this index's k nearest intersect the exact k nearest| / k.

        ``exact`` must be a ``"flat"`` selector over the same features.
        """
        if exact.kind != "flat":
            raise ValueError(f"the reference must be an exact 'flat' selector, got '{exact.kind}'")
        if (exact.n_train, exact.dim) != (self.n_train, self.dim):
            raise ValueError(
                f"the selectors differ: {self.n_train} x {self.dim} here, {exact.n_train} x {exact.dim} in the reference"
            )
        return float(recall_at_k(self.candidates(query_features, k), exact.candidates(query_features, k)).mean())
