"""FastIF (Guo et al. 2021): influence search restricted to kNN-preselected candidates.

Finding the most influential training points for a test point z_test needs
I_up,loss(z_i, z_test) = -g_i^T s_test for every training point, where
s_test = H^{-1} grad m(z_test) and g_i = grad l(z_i) + lambda theta (the sign
conventions of :mod:`influencekit.scores.influence`: negative = helpful, positive =
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

Quality is measured by recall@m (:func:`influencekit.search.recall_at_k`): the fraction of the
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

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from influencekit.data import Batch, batch_size
from influencekit.scores.influence import InfluenceFunction, InfluenceScores, TopK
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective
from influencekit.objectives.base import Objective
from influencekit.solvers.base import Solver, SolveResult
from influencekit.search.knn import KNNCandidateSelector
from influencekit.search.recall import recall_at_k

__all__ = [
    "RECALL_KINDS",
    "FastIFResult",
    "RecallKind",
    "RecallTable",
    "ScoringMethod",
    "candidate_influence",
    "fastif_recall_table",
    "fastif_top_m",
    "top_m_among",
]

RecallKind = Literal["helpful", "harmful", "influential"]
RECALL_KINDS: tuple[RecallKind, ...] = ("helpful", "harmful", "influential")
"""The three rankings: most negative I_up,loss, most positive, largest |I_up,loss|."""


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
    objective: Objective, inverse_hvp: Tensor, candidates: Tensor, *, method: ScoringMethod = "auto",
    chunk_size: int = 1024, progress: bool | None = None,
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
    solver: Solver | None,
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
    solver: Solver,
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
                recall[a, i, j] = recall_at_k(found[kind][:, :m], truth[kind][:, :m])
    return RecallTable(ms, ks, recall, scores, candidates)
