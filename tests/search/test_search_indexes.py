"""Embedding storage (zarr / .npy), FAISS top-k proponents/opponents with recall, and the factor index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influencekit.search import InnerProductIndex, LastLayerFactorIndex, recall_at_k
from influencekit.tracin import (
    GaussianProjection,
    LastLayerTracIn,
    TracInCP,
    embedding_dim,
    influence_embeddings,
    iter_embedding_chunks,
    open_embeddings,
    write_influence_embeddings,
)

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
def tracin():
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        states.append(MLP().double().state_dict())
    torch.manual_seed(0)
    return LastLayerTracIn(MLP().double().eval(), states, LRS, ce_loss, layer="fc2", chunk_size=7)


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(4)
    train = (torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))
    test = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    return test, train


def numpy_topk(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")
    return order[:, :k]


# ------------------------------------------------------------------------- storage


@pytest.mark.parametrize("suffix", [".zarr", ".npy"])
@pytest.mark.parametrize("projected", [False, True])
def test_write_and_stream_embeddings(tracin, data, tmp_path, suffix, projected):
    _, train = data
    proj = GaussianProjection(embedding_dim(tracin), 12, seed=5) if projected else None
    want = influence_embeddings(tracin, train, projection=proj).numpy()
    loader = DataLoader(TensorDataset(*train), batch_size=9)  # streamed input, chunk_size 7 inside
    path = tmp_path / f"emb{suffix}"
    shape = write_influence_embeddings(tracin, loader, path, projection=proj, chunk_rows=8)
    assert shape == want.shape == (40, 12 if projected else 3 * 3 * 9)
    arr = open_embeddings(path)
    assert arr.shape == shape and arr.dtype == np.float64
    chunks = list(iter_embedding_chunks(path, chunk_rows=15))
    assert [c.shape[0] for c in chunks] == [15, 15, 10]
    np.testing.assert_allclose(np.concatenate(chunks), want, rtol=1e-12, atol=1e-15)
    if suffix == ".zarr":
        assert arr.attrs["num_checkpoints"] == 3 and arr.attrs["block_dim"] == 27
        assert (arr.attrs["projection"] is None) == (not projected)
    with pytest.raises(FileExistsError):
        write_influence_embeddings(tracin, train, path)
    write_influence_embeddings(tracin, (train[0][:5], train[1][:5]), path, projection=proj, overwrite=True)
    assert open_embeddings(path).shape == (5, shape[1])


def test_unknown_format_and_missing_embeddings_are_refused(tracin, data, tmp_path):
    with pytest.raises(ValueError, match=".zarr or .npy"):
        write_influence_embeddings(tracin, data[1], tmp_path / "emb.h5")
    with pytest.raises(FileNotFoundError):
        open_embeddings(tmp_path / "missing.npy")


# --------------------------------------------------------------------------- FAISS


@pytest.fixture()
def random_vectors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2000, 32)).astype(np.float32), rng.standard_normal((20, 32)).astype(np.float32)


def test_flat_top_k_equals_brute_force(random_vectors):
    x, q = random_vectors
    exact = (q.astype(np.float64) @ x.astype(np.float64).T)
    index = InnerProductIndex.from_array(x, "flat")
    assert index.ntotal == 2000
    pro = index.proponents(q, 10)
    opp = index.opponents(q, 10)
    np.testing.assert_array_equal(pro.ids, numpy_topk(exact, 10))
    np.testing.assert_array_equal(opp.ids, numpy_topk(exact, 10, largest=False))
    np.testing.assert_allclose(pro.scores, np.take_along_axis(exact, pro.ids, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(opp.scores, np.take_along_axis(exact, opp.ids, 1), rtol=1e-5, atol=1e-5)
    assert (opp.scores < 0).all() and (pro.scores > 0).all()


def test_hnsw_and_ivf_recall(random_vectors):
    x, q = random_vectors
    exact = InnerProductIndex.from_array(x, "flat")
    hnsw = InnerProductIndex.from_array(x, "hnsw", hnsw_m=16, ef_search=64)
    report = hnsw.recall_vs(exact, q, k=10)
    print(f"HNSW recall@10: proponents {report.proponent_recall:.3f}, opponents {report.opponent_recall:.3f}")
    assert report.k == 10 and report.n_queries == 20
    assert report.proponent_recall >= 0.9 and report.opponent_recall >= 0.9

    coarse = InnerProductIndex.from_array(x, "ivf", nlist=16, nprobe=2).recall_vs(exact, q, k=10)
    full_probe = InnerProductIndex.from_array(x, "ivf", nlist=16, nprobe=16).recall_vs(exact, q, k=10)
    print(f"IVF recall@10: nprobe=2 {coarse.proponent_recall:.3f}, nprobe=16 {full_probe.proponent_recall:.3f}")
    assert full_probe.proponent_recall == full_probe.opponent_recall == 1.0  # all lists visited = exhaustive
    assert 0.2 <= coarse.proponent_recall < 1.0


def test_recall_at_k():
    approx = np.array([[0, 1, 2], [5, -1, 7]])
    exact = np.array([[2, 5, 0], [7, 8, 5]])
    assert recall_at_k(approx, exact).tolist() == pytest.approx([2 / 3, 2 / 3])  # -1 ("no result") is a miss
    assert float(recall_at_k(exact, exact).mean()) == 1.0
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(approx[:1], exact)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_from_chunks_equals_from_array(random_vectors, kind):
    x, q = random_vectors
    options = {"nlist": 8, "nprobe": 8} if kind == "ivf" else {}
    chunks = (x[i : i + 300] for i in range(0, 2000, 300))
    streamed = InnerProductIndex.from_chunks(chunks, kind, train_size=600, **options)
    assert streamed.ntotal == 2000
    exact = InnerProductIndex.from_array(x, "flat")
    want = exact.proponents(q, 5).ids
    got = streamed.proponents(q, 5).ids
    assert float(recall_at_k(got, want).mean()) >= (1.0 if kind != "hnsw" else 0.9)


def test_wrong_dimension_k_nan_untrained_ivf_and_unknown_kind_are_refused(random_vectors):
    x, q = random_vectors
    index = InnerProductIndex.from_array(x[:50], "flat")
    with pytest.raises(ValueError, match="dimension"):
        index.proponents(q[:, :16], 3)
    with pytest.raises(ValueError, match="k must be"):
        index.opponents(q, 51)
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 32), np.nan))
    ivf = InnerProductIndex(32, "ivf", nlist=4, nprobe=1)
    with pytest.raises(RuntimeError, match="train"):
        ivf.add(x)
    with pytest.raises(ValueError, match="flat"):
        index.recall_vs(InnerProductIndex.from_array(x[:50], "hnsw"), q, 3)
    with pytest.raises(ValueError, match="kind"):
        InnerProductIndex(32, "lsh")  # type: ignore[arg-type]


def test_index_over_tracin_embeddings_matches_tracin_top_k(tracin, data, tmp_path):
    """Stored influence embeddings -> flat FAISS index -> same proponents/opponents as TracIn scores."""
    test, train = data
    path = tmp_path / "train.zarr"
    write_influence_embeddings(tracin, train, path)
    index = InnerProductIndex.from_chunks(iter_embedding_chunks(path, chunk_rows=16), "flat")
    queries = influence_embeddings(tracin, test)  # float64 tensor, converted to float32
    top = tracin.top_k(test, train, k=5)
    pro, opp = index.proponents(queries, 5), index.opponents(queries, 5)
    np.testing.assert_array_equal(pro.ids, top.proponent_indices.numpy())
    np.testing.assert_array_equal(opp.ids, top.opponent_indices.numpy())
    scale = float(top.proponent_scores.abs().max())
    np.testing.assert_allclose(pro.scores, top.proponent_scores.numpy(), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(opp.scores, top.opponent_scores.numpy(), rtol=0, atol=1e-5 * scale)

# ------------------------------------------------------------------------- factor index


def layer_tracincp(tracin: LastLayerTracIn) -> TracInCP:
    """Per-example-gradient TracIn on the same layer and checkpoints: the factor index's ground truth."""
    return TracInCP(tracin.model, tracin.checkpoints, LRS, ce_loss, params=["fc2.weight", "fc2.bias"], chunk_size=11)


def test_scores_equal_per_example_gradient_tracin(tracin, data):
    test, train = data
    last, full = tracin, layer_tracincp(tracin)
    index = LastLayerFactorIndex.from_tracin(last, train, dtype=np.float64)
    got = index.scores(*LastLayerFactorIndex.query_factors(last, test))
    want = full.scores(test, train).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    assert index.nbytes == 3 * 40 * (3 + 9) * 8  # C + d (with the bias column) per example and checkpoint


def test_top_k_equals_brute_force_and_the_flat_embedding_index(tracin, data):
    test, train = data
    last, full = tracin, layer_tracincp(tracin)
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


def test_invalid_input_is_refused(tracin, data):
    (test, train), last = data, tracin
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
    with pytest.raises(ValueError, match="expected 40"):
        LastLayerFactorIndex(index.gradients, [index.inputs[0][:10], *index.inputs[1:]], LRS)
    with pytest.raises(ValueError, match="NaN"):
        LastLayerFactorIndex([np.full((40, 3), np.nan)] * 3, index.inputs, LRS)
