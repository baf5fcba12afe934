"""The factorised last-layer index against TracInCP's per-example gradients and FAISS over embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influencekit.tracin import InnerProductIndex, LastLayerTracIn, TracInCP, influence_embeddings
from influencekit.tracin.factor_index import LastLayerFactorIndex

LRS = (0.3, 0.1, 0.02)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def ce_loss(model_call, batch):
    x, y = batch
    return F.cross_entropy(model_call(x), y, reduction="none")


@pytest.fixture()
def setup():
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        states.append(MLP().double().state_dict())
    model = MLP().double().eval()
    g = torch.Generator().manual_seed(4)
    train = (torch.randn(50, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g))
    test = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    last = LastLayerTracIn(model, states, LRS, ce_loss, layer="fc2", chunk_size=7)
    full = TracInCP(model, states, LRS, ce_loss, params=["fc2.weight", "fc2.bias"], chunk_size=11)
    return last, full, test, train


def test_scores_equal_per_example_gradient_tracin(setup):
    last, full, test, train = setup
    index = LastLayerFactorIndex.from_tracin(last, train, dtype=np.float64)
    got = index.scores(*LastLayerFactorIndex.query_factors(last, test))
    want = full.scores(test, train).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    assert index.nbytes == 3 * 50 * (3 + 9) * 8  # C + d (with the bias column) per example and checkpoint


def test_top_k_equals_brute_force_and_the_flat_embedding_index(setup):
    last, full, test, train = setup
    k = 5
    index = LastLayerFactorIndex.from_tracin(last, train)  # float32, like FAISS
    pro, opp = index.search(*LastLayerFactorIndex.query_factors(last, test), k)
    want = full.scores(test, train).numpy()
    np.testing.assert_array_equal(pro.ids, np.argsort(-want, axis=1, kind="stable")[:, :k])
    np.testing.assert_array_equal(opp.ids, np.argsort(want, axis=1, kind="stable")[:, :k])
    np.testing.assert_allclose(pro.scores, np.take_along_axis(want, pro.ids, axis=1), rtol=1e-5)
    assert np.all(np.diff(pro.scores, axis=1) <= 0) and np.all(np.diff(opp.scores, axis=1) >= 0)
    flat = InnerProductIndex.from_array(influence_embeddings(last, train))
    queries = influence_embeddings(last, test)
    np.testing.assert_array_equal(flat.proponents(queries, k).ids, pro.ids)
    np.testing.assert_array_equal(flat.opponents(queries, k).ids, opp.ids)


def test_invalid_input_is_refused(setup):
    last, _, test, train = setup
    index = LastLayerFactorIndex.from_tracin(last, train)
    g, a = LastLayerFactorIndex.query_factors(last, test)
    with pytest.raises(ValueError, match="k must be"):
        index.search(g, a, 0)
    with pytest.raises(ValueError, match="all 3 checkpoints"):
        index.scores(g[:2], a[:2])
    with pytest.raises(ValueError, match="widths"):
        index.scores(g, [x[:, :-1] for x in a])
    with pytest.raises(ValueError, match="one \\(gradients, inputs"):
        LastLayerFactorIndex(index.gradients, index.inputs[:2], LRS)
    with pytest.raises(ValueError, match="expected 50"):
        LastLayerFactorIndex(index.gradients, [index.inputs[0][:10], *index.inputs[1:]], LRS)
    with pytest.raises(ValueError, match="NaN"):
        LastLayerFactorIndex([np.full((50, 3), np.nan)] * 3, index.inputs, LRS)
