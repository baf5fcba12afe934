"""FastIF: kNN candidates, candidate-restricted influence and recall@m, against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from influencekit.curvature.hessian import HessianOperator
from influencekit.datasets.mnist import koh_liang_split, load_mnist
from influencekit.scores.fastif import (
    RECALL_KINDS,
    candidate_influence,
    fastif_recall_table,
    fastif_top_m,
    top_m_among,
)
from influencekit.search import KNNCandidateSelector, recall_at_k
from influencekit.scores.influence import InfluenceFunction
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.solvers.cg import CGSolver
from influencekit.solvers.direct import DirectSolver

LAMBDA = 0.05


def setup_module() -> None:
    torch.set_num_threads(1)  # tiny ops crawl when many threads compete on a shared machine


@pytest.fixture(scope="module")
def problem():
    """A fitted 3-class softmax regression (n = 90, d = 6, p = 18) and 4 test points."""
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (94,), generator=g)
    x = centres[y] + 1.5 * torch.randn(94, 6, generator=g, dtype=torch.float64)
    fit = fit_softmax_regression(x[:90], y[:90], LAMBDA, num_classes=3)
    objective = SoftmaxRegressionObjective(fit.weights, x[:90], y[:90], LAMBDA)
    return objective, (x[90:], y[90:])


def autograd_influence(objective: SoftmaxRegressionObjective, test_batch) -> torch.Tensor:
    """I_up,loss (m_test, n) from autograd per-example gradients and the autograd Hessian (no library code)."""
    w = objective.weights.clone()
    x, y = objective.inputs, objective.targets

    def risk(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x @ flat.reshape(w.shape).T, y) + 0.5 * LAMBDA * (flat @ flat)

    hessian = torch.autograd.functional.hessian(risk, w.reshape(-1))
    train_grads = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda f, i=i: F.cross_entropy(x[i : i + 1] @ f.reshape(w.shape).T, y[i : i + 1]) + 0.5 * LAMBDA * (f @ f),
                w.reshape(-1),
            )
            for i in range(len(y))
        ]
    )
    xt, yt = test_batch
    test_grads = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda f, j=j: F.cross_entropy(xt[j : j + 1] @ f.reshape(w.shape).T, yt[j : j + 1]), w.reshape(-1))
            for j in range(len(yt))
        ]
    )
    return -test_grads @ torch.linalg.solve(hessian, train_grads.T)


# ------------------------------------------------------------------ kNN candidates


def test_knn_candidates_equal_brute_force_l2_neighbours():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(300, 12, generator=g, dtype=torch.float64)
    queries = torch.randn(7, 12, generator=g, dtype=torch.float64)
    selector = KNNCandidateSelector(features)
    distances, ids = selector.search(queries, 25)
    brute = torch.cdist(queries, features) ** 2
    expected = brute.argsort(dim=1)[:, :25]
    assert ids.dtype == torch.long and ids.shape == (7, 25)
    assert torch.equal(selector.candidates(queries, 25), expected)
    torch.testing.assert_close(distances.double(), brute.gather(1, expected), rtol=1e-5, atol=1e-5)
    everyone = selector.candidates(queries, 300)
    assert all(torch.equal(row.sort().values, torch.arange(300)) for row in everyone)


def test_approximate_selectors_against_the_exact_neighbours():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2000, 16, generator=g)
    queries = torch.randn(20, 16, generator=g)
    exact = KNNCandidateSelector(features)
    brute = (torch.cdist(queries.double(), features.double()) ** 2).argsort(dim=1)[:, :50]
    every_list = KNNCandidateSelector(features, "ivf", nlist=8, nprobe=8)  # scans all lists: exact
    assert torch.equal(every_list.candidates(queries, 50), brute)
    assert every_list.recall_vs(exact, queries, 50) == 1.0
    hnsw = KNNCandidateSelector(features, "hnsw", hnsw_m=16, ef_construction=64)
    recall = hnsw.recall_vs(exact, queries, 50)
    manual = np.mean([np.isin(brute[j].numpy(), hnsw.candidates(queries, 50)[j].numpy()).mean() for j in range(20)])
    assert recall == pytest.approx(manual) and 0.8 <= recall <= 1.0
    few_lists = KNNCandidateSelector(features, "ivf", nlist=64, nprobe=1)
    assert few_lists.recall_vs(exact, queries, 5) < 1.0  # one list of 64 misses some neighbours
    with pytest.raises(RuntimeError, match="raise nprobe"):
        few_lists.candidates(queries, 1000)  # one list holds ~31 points
    few_lists.nprobe = 64  # a search-time setting: every list, so exact
    assert torch.equal(few_lists.candidates(queries, 50), brute)
    few_lists.nprobe = 65
    with pytest.raises(ValueError, match="nprobe"):
        few_lists.candidates(queries, 5)
    with pytest.raises(ValueError, match="exact 'flat'"):
        exact.recall_vs(hnsw, queries, 5)
    with pytest.raises(ValueError, match="nlist"):
        KNNCandidateSelector(features[:10], "ivf", nlist=64)


def test_knn_selector_rejects_bad_arguments():
    selector = KNNCandidateSelector(np.random.default_rng(0).standard_normal((20, 4)))
    assert selector.n_train == 20 and selector.dim == 4
    for k in (0, 21):
        with pytest.raises(ValueError, match="k must be"):
            selector.candidates(np.zeros((1, 4)), k)
    with pytest.raises(ValueError, match="features"):
        selector.candidates(np.zeros((1, 5)), 3)
    with pytest.raises(ValueError, match="NaN"):
        KNNCandidateSelector(torch.tensor([[0.0, float("nan")]]))


# ------------------------------------------------------- candidate-restricted influence


@pytest.mark.parametrize("method", ["gradients", "closed_form", "auto"])
def test_fastif_with_all_candidates_equals_full_influence(problem, method):
    objective, test_batch = problem
    solver = DirectSolver(HessianOperator(objective))
    full = InfluenceFunction(objective, solver).scores(test_batch)
    g = torch.Generator().manual_seed(2)
    candidates = torch.stack([torch.randperm(objective.n_train, generator=g) for _ in range(4)])  # every point, shuffled
    result = fastif_top_m(objective, solver, test_batch, candidates, 7, method=method)

    truth = autograd_influence(objective, test_batch)
    torch.testing.assert_close(result.candidate_influence, truth.gather(1, candidates), rtol=1e-9, atol=1e-12)
    top = full.top_k(7)
    assert torch.equal(result.top.helpful_indices, top.helpful_indices)
    assert torch.equal(result.top.harmful_indices, top.harmful_indices)
    assert torch.equal(result.influential_indices, full.most_influential(7))
    torch.testing.assert_close(result.top.helpful_influence, top.helpful_influence, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(result.top.harmful_influence, top.harmful_influence, rtol=1e-10, atol=1e-13)
    assert (result.top.helpful_influence < 0).all() and (result.top.harmful_influence > 0).all()


def test_fastif_restricted_to_candidates_ranks_only_them(problem):
    objective, test_batch = problem
    solver = DirectSolver(HessianOperator(objective))
    full = InfluenceFunction(objective, solver).scores(test_batch)
    g = torch.Generator().manual_seed(3)
    candidates = torch.stack([torch.randperm(objective.n_train, generator=g)[:30] for _ in range(4)])
    result = fastif_top_m(objective, None, test_batch, candidates, 5, inverse_hvp=full.inverse_hvp)
    for j in range(4):
        values = full.influence_on_loss[j, candidates[j]]
        order = values.argsort()
        assert result.top.helpful_indices[j].tolist() == candidates[j, order[:5]].tolist()
        assert result.top.harmful_indices[j].tolist() == candidates[j, order.flip(0)[:5]].tolist()
        assert result.influential_indices[j].tolist() == candidates[j, values.abs().argsort(descending=True)[:5]].tolist()
    assert set(result.top.helpful_indices.flatten().tolist()) <= set(candidates.flatten().tolist())


def test_fastif_validates_inputs(problem):
    objective, test_batch = problem
    s_test = torch.zeros(4, objective.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[0, 90\)"):
        candidate_influence(objective, s_test, torch.full((4, 3), 90))
    with pytest.raises(ValueError, match="one row per test point"):
        candidate_influence(objective, s_test, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="solver"):
        fastif_top_m(objective, None, test_batch, torch.zeros(4, 3, dtype=torch.long), 2)


def test_top_m_among_on_a_hand_made_row():
    candidates = torch.tensor([[10, 11, 12, 13]])
    influence = torch.tensor([[-3.0, 1.0, 5.0, -0.5]])
    top, influential, values = top_m_among(candidates, influence, 2)
    assert top.helpful_indices.tolist() == [[10, 13]] and top.helpful_influence.tolist() == [[-3.0, -0.5]]
    assert top.harmful_indices.tolist() == [[12, 11]] and top.harmful_influence.tolist() == [[5.0, 1.0]]
    assert influential.tolist() == [[12, 10]] and values.tolist() == [[5.0, -3.0]]
    assert top_m_among(candidates, influence, 10)[1].shape == (1, 4)  # m is capped at k


# ------------------------------------------------------------------------ recall@m


def test_recall_at_k_on_hand_made_sets():
    assert float(recall_at_k(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6]))) == 0.5
    assert float(recall_at_k(torch.tensor([6, 5, 4, 3]), torch.tensor([3, 4, 5, 6]))) == 1.0  # order is irrelevant
    assert float(recall_at_k(torch.tensor([3, 3, 3]), torch.tensor([3, 4]))) == 0.5  # duplicates count once
    assert float(recall_at_k(torch.arange(100), torch.tensor([5, 200, 300, 7]))) == 0.5  # more retrieved than m
    assert float(recall_at_k(torch.tensor([9]), torch.tensor([1, 2, 3]))) == 0.0
    rows = recall_at_k(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[2, 9], [3, 4], [7, 8]]))
    assert rows.tolist() == [0.5, 1.0, 0.0] and rows.dtype == torch.float64
    with pytest.raises(ValueError, match="duplicate"):
        recall_at_k(torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]))


# ------------------------------------------------- an MNIST-sized run (the synthetic set)


def test_recall_table_on_a_2000_point_mnist_logistic_regression(synthetic_mnist_dir: Path):
    split = koh_liang_split(load_mnist(synthetic_mnist_dir))
    n = 2000
    x, y = split.x_train[:n], split.y_train[:n]
    fit = fit_softmax_regression(x, y, 0.01, num_classes=10)
    objective = SoftmaxRegressionObjective(fit.weights, x, y, 0.01)
    test = [8, 0, 1, 2, 3]
    test_batch = (split.x_test[test], split.y_test[test])
    solver = CGSolver(HessianOperator(objective), rtol=1e-10)
    table = fastif_recall_table(
        objective, solver, test_batch, KNNCandidateSelector(x), test_batch[0], ms=(10,), ks=(100, n // 2), progress=False
    )
    assert table.recall.shape == (3, 1, 2, 5)
    assert ((table.recall >= 0) & (table.recall <= 1)).all()
    # k = n/2 random candidates would recall half of the top 10 on average; the kNN does better.
    for a, kind in enumerate(RECALL_KINDS):
        assert float(table.mean()[a, 0, 1]) >= 0.6, (kind, table.format())

    # The same recall from numpy: brute-force neighbours and a sort of the full influence.
    influence = table.scores.influence_on_loss.numpy()
    distances = ((split.x_test[test].numpy()[:, None, :] - x.numpy()[None, :, :]) ** 2).sum(axis=2)
    for t in range(5):
        neighbours = set(np.argsort(distances[t], kind="stable")[: n // 2].tolist())
        truth = {
            "helpful": np.argsort(influence[t])[:10],
            "harmful": np.argsort(-influence[t])[:10],
            "influential": np.argsort(-np.abs(influence[t]))[:10],
        }
        for a, kind in enumerate(RECALL_KINDS):
            expected = len(neighbours & set(truth[kind].tolist())) / 10
            assert float(table.recall[a, 0, 1, t]) == pytest.approx(expected), (kind, t)
    as_dict = table.as_dict()
    assert set(as_dict) == set(RECALL_KINDS)
    assert as_dict["helpful"]["m=10"][f"k={n // 2}"]["mean"] == pytest.approx(float(table.mean()[0, 0, 1]))
