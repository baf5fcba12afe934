"""FastIF (Guo et al. 2021): influence search restricted to kNN-preselected candidates.

Finding the most influential training points for a test point z_test needs
I_up,loss(z_i, z_test) = -g_i^T s_test for every training point, where
s_test = H^{-1} grad m(z_test) and g_i = grad l(z_i) + lambda theta (the sign
conventions of :mod:`influencekit.influence`: negative = helpful, positive =
harmful). FastIF observes that the most influential points tend to lie close
to z_test in the model's feature space, so it

1. selects k candidate training points, the k nearest neighbours of z_test by
   L2 distance between *features* (:class:`KNNCandidateSelector`: an exact
   FAISS ``IndexFlatL2``, or an approximate HNSW / IVF index, whose neighbour
   recall against the exact one it reports): for softmax regression the inputs
   x themselves, for a network e.g. its penultimate activations;
2. computes s_test once and the exact I_up,loss of the k candidates only
   (:func:`candidate_influence`, :func:`fastif_top_m`), costing k instead of n
   training gradients (for softmax regression, whose full pass is one GEMM,
   the candidates' dots are taken by the same closed form instead of forming
   their gradients, see :data:`ScoringMethod`);
3. returns the top-m helpful, harmful and most influential (largest
   |I_up,loss|) points among the candidates.

Quality is measured by recall@m (:func:`recall_at_m`): the fraction of the
true top-m points (from the influence of all n training points) that the
search returns. The top-m among the candidates contain every true top-m point
that is a candidate (at most m - 1 training points beat it), so, barring ties,
this recall equals the fraction of the true top-m inside the k candidate set,
the R@m of Guo et al. :func:`fastif_recall_table` tabulates it over m and k.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from influencekit.data import Batch, batch_size
from influencekit.influence import InfluenceFunction, InfluenceScores, TopK
from influencekit.models.softmax_regression import SoftmaxRegressionObjective
from influencekit.objective import Objective
from influencekit.solvers.base import IHVPSolver, SolveResult
from influencekit.tracin.index import IndexKind, as_float_matrix, make_faiss_index, recall_at_k

__all__ = [
    "RECALL_KINDS",
    "FastIFResult",
    "KNNCandidateSelector",
    "RecallKind",
    "RecallTable",
    "ScoringMethod",
    "candidate_influence",
    "fastif_recall_table",
    "fastif_top_m",
    "recall_at_m",
    "top_m_among",
]

RecallKind = Literal["helpful", "harmful", "influential"]
RECALL_KINDS: tuple[RecallKind, ...] = ("helpful", "harmful", "influential")
"""The three rankings: most negative I_up,loss, most positive, largest |I_up,loss|."""


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
        return recall_at_k(self.candidates(query_features, k).numpy(), exact.candidates(query_features, k).numpy())


ScoringMethod = Literal["auto", "gradients", "closed_form"]
"""How :func:`candidate_influence` forms g_i^T s_test (all exact):

* ``"gradients"``: ``objective.train_gradients(chunk) @ s_test``, for any objective;
* ``"closed_form"``: for :class:`SoftmaxRegressionObjective` only,
  g_i^T s = (p_i - e_{y_i})^T S x_i + lambda theta^T s with S = s reshaped like
  W (the formula of its full pass ``train_gradient_dots``), without forming
  the (k, p) gradients: O(k d C) work and no (k, p) memory traffic;
* ``"auto"``: ``"closed_form"`` where available, else ``"gradients"``.
"""


def candidate_influence(
    objective: Objective,
    inverse_hvp: Tensor,
    candidates: Tensor,
    *,
    method: ScoringMethod = "auto",
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> Tensor:
    """Exact I_up,loss(z_i, z_test_j) = -g_i^T s_test_j of each test point's own candidates only.

    Args:
        objective: the training objective at the trained parameters.
        inverse_hvp: s_test, shape (m_test, p): row j is H^{-1} grad m(z_test_j)
            (``SolveResult.solution`` of the test gradients).
        candidates: training indices, shape (m_test, k); row j lists the
            candidates of test point j.
        method: see :data:`ScoringMethod`.
        chunk_size: candidates scored at a time (the ``"gradients"`` method holds
            chunk_size x p gradient entries).
        progress: tqdm bar over chunks (None: only on a terminal).

    Returns:
        I_up,loss, shape (m_test, k), entry (j, c) for training point
        ``candidates[j, c]``; negative = helpful, positive = harmful.
    """
    s_test = inverse_hvp if inverse_hvp.dim() == 2 else inverse_hvp.unsqueeze(0)
    if s_test.shape[1] != objective.dim:
        raise ValueError(f"inverse_hvp must have shape (m_test, {objective.dim}), got {tuple(inverse_hvp.shape)}")
    candidates = _check_candidates(candidates, s_test.shape[0], objective.n_train)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    closed_form = isinstance(objective, SoftmaxRegressionObjective)
    if method == "closed_form" and not closed_form:
        raise TypeError(f"the closed_form method needs a SoftmaxRegressionObjective, got {type(objective).__name__}")
    if method not in ("auto", "gradients", "closed_form"):
        raise ValueError(f"method must be 'auto', 'gradients' or 'closed_form', got {method!r}")
    use_closed_form = closed_form and method != "gradients"
    s_test = s_test.to(objective.dtype)
    m_test, k = candidates.shape
    out = torch.empty(m_test, k, dtype=objective.dtype)
    steps = [(j, start) for j in range(m_test) for start in range(0, k, chunk_size)]
    for j, start in tqdm(steps, desc="FastIF scoring", disable=None if progress is None else not progress):
        indices = candidates[j, start : start + chunk_size]
        if use_closed_form:
            dots = _softmax_dots(objective, indices, s_test[j])  # type: ignore[arg-type]
        else:
            dots = objective.train_gradients(indices) @ s_test[j]
        out[j, start : start + chunk_size] = -dots
    return out


def _softmax_dots(objective: SoftmaxRegressionObjective, indices: Tensor, s_test: Tensor) -> Tensor:
    """g_i^T s for the rows ``indices`` of a softmax regression, without forming g_i (shape (len(indices),)).

    With S = s reshaped to (C, d) like W and r_i = p_i - e_{y_i} (the cached
    training probabilities), g_i^T s = r_i^T S x_i + lambda theta^T s.
    """
    weights = s_test.reshape(objective.num_classes, objective.num_features)
    # (k, C): S x_i, in the orientation measured fastest on W1 with k = 1,000 (about 1.2 ms, against 1.7 ms
    # for x_c @ S^T and 8 ms through OpenBLAS right after torch's gather)
    projected = (weights @ objective.inputs.index_select(0, indices).T).T
    probabilities = objective.probs.index_select(0, indices)
    label_terms = projected.gather(1, objective.targets.index_select(0, indices).unsqueeze(1)).squeeze(1)
    dots = (projected * probabilities).sum(dim=1) - label_terms  # r_i^T S x_i with r_i = p_i - e_{y_i}
    return dots + objective.weight_decay * (objective.parameters_vector() @ s_test)


def _check_candidates(candidates: Tensor, m_test: int, n_train: int) -> Tensor:
    candidates = torch.as_tensor(candidates)
    if candidates.dim() == 1:
        candidates = candidates.unsqueeze(0)
    if candidates.dim() != 2 or candidates.shape[0] != m_test or candidates.shape[1] == 0:
        raise ValueError(
            f"candidates must have shape (m_test, k) = ({m_test}, k >= 1), one row per test point, "
            f"got {tuple(candidates.shape)}"
        )
    if candidates.dtype.is_floating_point or candidates.dtype == torch.bool:
        raise TypeError(f"candidates must be integer training indices, got {candidates.dtype}")
    candidates = candidates.long()
    if int(candidates.min()) < 0 or int(candidates.max()) >= n_train:
        raise ValueError(
            f"candidate indices must lie in [0, {n_train}), got [{int(candidates.min())}, {int(candidates.max())}] "
            "(-1 marks a slot an approximate index could not fill: use the exact KNNCandidateSelector)"
        )
    return candidates


@dataclass(frozen=True)
class FastIFResult:
    """Top-m training points among each test point's candidates.

    Attributes:
        candidates: training indices searched, shape (m_test, k).
        candidate_influence: I_up,loss of those candidates, shape (m_test, k).
        top: the most helpful (most negative I_up,loss first) and most harmful
            (most positive first) candidates, fields of shape (m_test, m'),
            m' = min(m, k); indices are training indices. Same convention as
            :meth:`InfluenceScores.top_k`.
        influential_indices: training indices of the m' largest |I_up,loss|,
            largest first, shape (m_test, m') (as :meth:`InfluenceScores.most_influential`).
        influential_influence: their signed I_up,loss, shape (m_test, m').
        inverse_hvp: the solve of s_test = H^{-1} grad m(z_test) (rows, (m_test, p)).
        scoring_seconds: wall time of scoring the candidates and ranking them
            (excluding the solve and the kNN search).
    """

    candidates: Tensor
    candidate_influence: Tensor
    top: TopK
    influential_indices: Tensor
    influential_influence: Tensor
    inverse_hvp: SolveResult
    scoring_seconds: float


def top_m_among(candidates: Tensor, influence: Tensor, m: int) -> tuple[TopK, Tensor, Tensor]:
    """Rank each row's candidates by I_up,loss.

    Args:
        candidates: training indices, shape (m_test, k).
        influence: their I_up,loss, shape (m_test, k).
        m: how many to return per ranking; m' = min(m, k) are.

    Returns:
        ``(top, influential_indices, influential_influence)``: helpful (most
        negative first) and harmful (most positive first) as a :class:`TopK`,
        then the training indices and signed I_up,loss of the m' largest
        |I_up,loss|; every tensor has shape (m_test, m').
    """
    if candidates.shape != influence.shape or candidates.dim() != 2:
        raise ValueError(f"candidates and influence must share a shape (m_test, k), got {tuple(candidates.shape)} and {tuple(influence.shape)}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    m = min(m, candidates.shape[1])
    helpful = torch.topk(influence, m, dim=1, largest=False)
    harmful = torch.topk(influence, m, dim=1, largest=True)
    influential = torch.topk(influence.abs(), m, dim=1).indices
    top = TopK(
        candidates.gather(1, helpful.indices),
        helpful.values,
        candidates.gather(1, harmful.indices),
        harmful.values,
    )
    return top, candidates.gather(1, influential), influence.gather(1, influential)


def fastif_top_m(
    objective: Objective,
    solver: IHVPSolver | None,
    test_batch: Batch,
    candidates: Tensor,
    m: int,
    *,
    inverse_hvp: SolveResult | None = None,
    method: ScoringMethod = "auto",
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> FastIFResult:
    """FastIF: s_test once, then exact I_up,loss of the candidates only, then their top m.

    Args:
        objective: the training objective at the trained parameters.
        solver: solves H x = grad m(z_test) (with its damping); unused, and may be
            None, when ``inverse_hvp`` is given.
        test_batch: the m_test test examples.
        candidates: training indices, shape (m_test, k), e.g.
            :meth:`KNNCandidateSelector.candidates`; with every training index
            in each row the result equals :meth:`InfluenceFunction.scores`'s
            top-m (up to rounding).
        m: number of top points per ranking (m' = min(m, k) returned).
        inverse_hvp: a prepared solve of s_test for ``test_batch`` (skips the solver).
        method, chunk_size, progress: see :func:`candidate_influence`.

    Returns:
        :class:`FastIFResult`.
    """
    m_test = batch_size(test_batch)
    if inverse_hvp is None:
        if solver is None:
            raise ValueError("pass a solver, or a prepared inverse_hvp")
        inverse_hvp = InfluenceFunction(objective, solver).inverse_hvp_of_test(test_batch)
    if inverse_hvp.solution.shape != (m_test, objective.dim):
        raise ValueError(
            f"inverse_hvp.solution must have shape ({m_test}, {objective.dim}) for this test batch, "
            f"got {tuple(inverse_hvp.solution.shape)}"
        )
    candidates = _check_candidates(candidates, m_test, objective.n_train)
    start = time.perf_counter()
    influence = candidate_influence(
        objective, inverse_hvp.solution, candidates, method=method, chunk_size=chunk_size, progress=progress
    )
    top, influential_indices, influential_influence = top_m_among(candidates, influence, m)
    seconds = time.perf_counter() - start
    return FastIFResult(candidates, influence, top, influential_indices, influential_influence, inverse_hvp, seconds)


def recall_at_m(retrieved: Tensor, true_top: Tensor) -> Tensor:
    """R@m = |retrieved ∩ true_top| / m, with m = the number of true top points.

    Args:
        retrieved: training indices returned by a search, shape (r,) or
            (q, r) (one row per test point); order and duplicates do not matter.
        true_top: the true top-m indices, shape (m,) or (q, m), distinct within a row.

    Returns:
        Recall in [0, 1] (float64): a 0-dim tensor for 1-D inputs, else shape (q,).
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


@dataclass(frozen=True)
class RecallTable:
    """Recall@m of FastIF against full influence, for each ranking, m and k.

    Attributes:
        ms: the m values (top-m sizes).
        ks: the k values (candidates per test point).
        recall: shape (len(RECALL_KINDS), len(ms), len(ks), m_test); entry
            [kind, i, j, t] is R@ms[i] of test point t with ks[j] candidates,
            kinds in the order of :data:`RECALL_KINDS`.
        scores: the full influence the recall is measured against.
        candidates: the kNN candidates of each test point, nearest first,
            shape (m_test, max(ks)); the first k are the k-candidate set.
    """

    ms: tuple[int, ...]
    ks: tuple[int, ...]
    recall: Tensor
    scores: InfluenceScores
    candidates: Tensor

    def mean(self) -> Tensor:
        """Recall averaged over test points, shape (len(RECALL_KINDS), len(ms), len(ks))."""
        return self.recall.mean(dim=-1)

    def as_dict(self) -> dict[str, dict[str, dict[str, dict[str, float | list[float]]]]]:
        """``{kind: {"m=M": {"k=K": {"mean": R, "per_test": [...]}}}}`` for JSON."""
        return {
            kind: {
                f"m={m}": {
                    f"k={k}": {"mean": float(self.recall[a, i, j].mean()), "per_test": self.recall[a, i, j].tolist()}
                    for j, k in enumerate(self.ks)
                }
                for i, m in enumerate(self.ms)
            }
            for a, kind in enumerate(RECALL_KINDS)
        }

    def format(self) -> str:
        """The mean table as text: one line per (kind, m), one column per k."""
        header = f"{'ranking':<12} {'m':>5} " + " ".join(f"{'k=' + str(k):>9}" for k in self.ks)
        lines = [header]
        means = self.mean()
        for a, kind in enumerate(RECALL_KINDS):
            for i, m in enumerate(self.ms):
                lines.append(f"{kind:<12} {m:>5} " + " ".join(f"{float(means[a, i, j]):>9.3f}" for j in range(len(self.ks))))
        return "\n".join(lines)


def fastif_recall_table(
    objective: Objective,
    solver: IHVPSolver,
    test_batch: Batch,
    selector: KNNCandidateSelector,
    query_features: Tensor | np.ndarray,
    ms: Sequence[int] = (10, 100),
    ks: Sequence[int] = (100, 1000, 10000),
    *,
    scores: InfluenceScores | None = None,
    method: ScoringMethod = "auto",
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> RecallTable:
    """Recall@m of FastIF's top-m among k kNN candidates against the top-m of full influence.

    The ground truth is :meth:`InfluenceFunction.scores` over all n training
    points (or ``scores``, if already computed for ``test_batch``); FastIF
    scores the max(ks) nearest candidates once from the same s_test
    (:func:`candidate_influence`) and ranks the first k of them for each k,
    which is :func:`fastif_top_m` on those k candidates.

    Args:
        objective, solver: the influence set-up (the solver is only used when
            ``scores`` is None).
        test_batch: the m_test test examples.
        selector: kNN index over the training features.
        query_features: the test points' features, shape (m_test, f).
        ms: top-m sizes, each >= 1 and <= min(ks).
        ks: candidate counts, each in [1, n].
        scores: precomputed full influence of ``test_batch``.
        method, chunk_size, progress: see :func:`candidate_influence`.

    Returns:
        :class:`RecallTable`.
    """
    ms, ks = tuple(int(m) for m in ms), tuple(int(k) for k in ks)
    if not ms or not ks:
        raise ValueError("need at least one m and one k")
    if selector.n_train != objective.n_train:
        raise ValueError(f"the selector indexes {selector.n_train} training points, the objective has {objective.n_train}")
    if max(ks) > objective.n_train or min(ks) < 1:
        raise ValueError(f"every k must lie in [1, n_train={objective.n_train}], got {ks}")
    if min(ms) < 1 or max(ms) > min(ks):
        raise ValueError(f"every m must lie in [1, min(ks)={min(ks)}], got {ms}")
    if scores is None:
        scores = InfluenceFunction(objective, solver).scores(test_batch)
    m_test = batch_size(test_batch)
    if scores.influence_on_loss.shape != (m_test, objective.n_train):
        raise ValueError(f"scores must cover {m_test} test points x {objective.n_train} training points")
    candidates = selector.candidates(query_features, max(ks))
    if candidates.shape[0] != m_test:
        raise ValueError(f"got {candidates.shape[0]} query feature rows for {m_test} test points")
    influence = candidate_influence(
        objective, scores.inverse_hvp.solution, candidates, method=method, chunk_size=chunk_size, progress=progress
    )
    m_max = max(ms)
    full_top = scores.top_k(m_max)
    truth = {"helpful": full_top.helpful_indices, "harmful": full_top.harmful_indices, "influential": scores.most_influential(m_max)}
    recall = torch.empty(len(RECALL_KINDS), len(ms), len(ks), m_test, dtype=torch.float64)
    for j, k in enumerate(ks):
        top, influential, _ = top_m_among(candidates[:, :k], influence[:, :k], m_max)
        found = {"helpful": top.helpful_indices, "harmful": top.harmful_indices, "influential": influential}
        for a, kind in enumerate(RECALL_KINDS):
            for i, m in enumerate(ms):  # top-m lists are sorted, so top-m is the first m of top-m_max
                recall[a, i, j] = recall_at_m(found[kind][:, :m], truth[kind][:, :m])
    return RecallTable(ms, ks, recall, scores, candidates)
