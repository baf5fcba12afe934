"""TracInCP, the last-layer fast path and influence embeddings against explicit autograd loops (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from influencekit.tracin import (
    GaussianProjection,
    LastLayerTracIn,
    TracInCP,
    embedding_dim,
    influence_embeddings,
    jl_min_dimension,
    jl_pair_failure_probability,
    load_checkpoint,
)

LRS = (0.5, 0.2, 0.05)
ALL = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
LAST = ("fc2.weight", "fc2.bias")


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def ce_loss(model_call, batch):
    x, y = batch
    return F.cross_entropy(model_call(x), y, reduction="none")


def ce_loss_dict(model_call, batch):
    return F.cross_entropy(model_call(batch["x"]), batch["y"], reduction="none")


def make_states(bias: bool = True) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in (11, 12, 13):
        torch.manual_seed(seed)
        model = MLP(bias).double()
        with torch.no_grad():  # larger weights -> less uniform softmax, more varied gradients
            for p in model.parameters():
                p.mul_(2.0)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


@pytest.fixture()
def states():
    return make_states()


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y_train = torch.randint(0, 3, (13,), generator=g)
    x_test = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y_test = torch.randint(0, 3, (4,), generator=g)
    return (x_test, y_test), (x_train, y_train)


@pytest.fixture()
def model():
    torch.manual_seed(99)
    return MLP().double().eval()


def mixed_checkpoints(states, tmp_path):
    """Checkpoint 0 as torch.save file, 1 as safetensors file, 2 in memory."""
    pt = tmp_path / "ckpt0.pt"
    torch.save(states[0], pt)
    st = tmp_path / "ckpt1.safetensors"
    save_file(states[1], str(st))
    return [pt, str(st), states[2]]


# ------------------------------------------------------------------ ground truth


def loop_grads(state, x, y, names, bias: bool = True) -> torch.Tensor:
    """(n, p) per-example gradients by an explicit loop with torch.autograd.grad."""
    net = MLP(bias).double()
    net.load_state_dict(state)
    params = dict(net.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([gr.reshape(-1) for gr in grads]))
    return torch.stack(rows)


def loop_scores(states, lrs, names, test, train, bias: bool = True) -> torch.Tensor:
    total = torch.zeros(test[0].shape[0], train[0].shape[0], dtype=torch.float64)
    for state, eta in zip(states, lrs):
        total += eta * loop_grads(state, *test, names, bias) @ loop_grads(state, *train, names, bias).T
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------- TracInCP


def test_scores_match_autograd_loop_all_params(model, states, data, tmp_path):
    test, train = data
    tracin = TracInCP(model, mixed_checkpoints(states, tmp_path), LRS, ce_loss, chunk_size=4)
    got = tracin.scores(test, train)
    want = loop_scores(states, LRS, ALL, test, train)
    assert got.shape == (4, 13) and got.dtype == torch.float64
    assert rel_err(got, want) <= 1e-10
    assert tracin.num_params == 5 * 8 + 8 + 8 * 3 + 3


def test_scores_param_subset(model, states, data):
    test, train = data
    names = ("fc1.weight", "fc2.bias")
    tracin = TracInCP(model, states, LRS, ce_loss, params=list(names), chunk_size=5)
    assert rel_err(tracin.scores(test, train), loop_scores(states, LRS, names, test, train)) <= 1e-10


def test_train_data_forms_agree(model, states, data):
    """A tuple batch, a DataLoader, a list of dict batches all give the same scores."""
    test, train = data
    want = loop_scores(states, LRS, ALL, test, train)
    loader = DataLoader(TensorDataset(*train), batch_size=5, shuffle=False)
    assert rel_err(TracInCP(model, states, LRS, ce_loss, chunk_size=3).scores(test, loader), want) <= 1e-10
    dict_batches = [{"x": train[0][i : i + 6], "y": train[1][i : i + 6]} for i in range(0, 13, 6)]
    dict_test = {"x": test[0], "y": test[1]}
    got = TracInCP(model, states, LRS, ce_loss_dict, chunk_size=4).scores(dict_test, dict_batches)
    assert rel_err(got, want) <= 1e-10


def test_self_influence_is_the_sum_of_squared_gradient_norms(model, states, data):
    _, train = data
    tracin = TracInCP(model, states, LRS, ce_loss, chunk_size=4)
    got = tracin.self_influence(train)
    want = sum(eta * (loop_grads(s, *train, ALL) ** 2).sum(1) for s, eta in zip(states, LRS))
    assert got.shape == (13,)
    assert rel_err(got, want) <= 1e-10
    assert torch.allclose(got, torch.diagonal(tracin.scores(train, train)), rtol=1e-12, atol=0)


def test_top_k_are_the_largest_and_smallest_loop_scores(model, states, data):
    test, train = data
    want = loop_scores(states, LRS, ALL, test, train)
    top = TracInCP(model, states, LRS, ce_loss).top_k(test, train, k=3)
    order = torch.argsort(want, dim=1, descending=True)
    assert torch.equal(top.proponent_indices, order[:, :3])
    assert torch.equal(top.opponent_indices, order[:, [-1, -2, -3]])
    assert rel_err(top.proponent_scores, torch.gather(want, 1, order[:, :3])) <= 1e-10
    assert (top.proponent_scores[:, :-1] >= top.proponent_scores[:, 1:]).all()
    assert (top.opponent_scores[:, :-1] <= top.opponent_scores[:, 1:]).all()
    assert (top.opponent_scores[:, 0] < 0).all() and (top.proponent_scores[:, 0] > 0).all()


def test_sign_convention_matches_sgd_step(model, states, data):
    """A small SGD step on z' changes the test loss by -eta * score(z, z') to first order."""
    test, train = data
    state, eta = states[0], 1e-6
    scores = TracInCP(model, [state], [1.0], ce_loss).scores(test, train)
    net = MLP().double()
    net.load_state_dict(state)
    base = F.cross_entropy(net(test[0]), test[1], reduction="none")
    grads = loop_grads(state, *train, ALL)
    for j in range(train[0].shape[0]):
        stepped = MLP().double()
        flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach() - eta * grads[j]
        torch.nn.utils.vector_to_parameters(flat, stepped.parameters())
        with torch.no_grad():
            change = F.cross_entropy(stepped(test[0]), test[1], reduction="none") - base
        torch.testing.assert_close(change / eta, -scores[:, j], rtol=1e-4, atol=1e-8)


def test_float32_checkpoint_is_cast_to_model_dtype(model, states, data):
    test, train = data
    rounded = [{k: v.float().double() for k, v in s.items()} for s in states]
    as_float32 = [{k: v.float() for k, v in s.items()} for s in states]
    got = TracInCP(model, as_float32, LRS, ce_loss).scores(test, train)
    assert got.dtype == torch.float64
    assert rel_err(got, loop_scores(rounded, LRS, ALL, test, train)) <= 1e-10


def test_model_is_not_modified(model, states, data):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TracInCP(model, states, LRS, ce_loss).scores(*data)
    LastLayerTracIn(model, states, LRS, ce_loss, layer="fc2").scores(*data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.fc2._forward_hooks


def test_load_checkpoint_formats(states, tmp_path):
    pt, st, mem = mixed_checkpoints(states, tmp_path)
    for path_or_dict, want in ((pt, states[0]), (st, states[1]), (mem, mem)):
        loaded = load_checkpoint(path_or_dict)
        assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    bad = tmp_path / "not_a_state_dict.pt"
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(TypeError, match="state dict"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"learning_rates": (0.1, 0.2)}, ValueError, "learning rates"),
        ({"learning_rates": (0.1, -0.2, 0.3)}, ValueError, "> 0"),
        ({"params": ["fc3.weight"]}, KeyError, "unknown parameter"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"checkpoints": []}, ValueError, "at least one"),
        ({"checkpoints": ["/nonexistent/ckpt.pt"] * 3}, FileNotFoundError, "not found"),
    ],
)
def test_constructor_errors(model, states, kwargs, exc, match):
    args = {"checkpoints": states, "learning_rates": LRS, "params": None, "chunk_size": 4} | kwargs
    with pytest.raises(exc, match=match):
        TracInCP(model, args["checkpoints"], args["learning_rates"], ce_loss, args["params"], args["chunk_size"])


def test_checkpoint_mismatch_errors(model, states):
    missing = {k: v for k, v in states[0].items() if k != "fc1.bias"}
    with pytest.raises(KeyError, match="fc1.bias"):
        TracInCP(model, [missing], [1.0], ce_loss)
    wrong = dict(states[0], **{"fc1.bias": torch.zeros(7, dtype=torch.float64)})
    with pytest.raises(ValueError, match="shape"):
        TracInCP(model, [wrong], [1.0], ce_loss)


def test_one_shot_iterators_and_mismatched_batches_are_refused(model, states, data):
    test, train = data
    tracin = TracInCP(model, states, LRS, ce_loss)
    with pytest.raises(TypeError, match="re-iterable"):
        tracin.scores(test, (b for b in [train]))
    with pytest.raises(ValueError, match="leading batch dimension"):
        tracin.scores(test, (train[0], train[1][:5]))
    with pytest.raises(ValueError, match="shuffle"):
        tracin.scores(test, DataLoader(TensorDataset(*train), batch_size=5, shuffle=True))
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        TracInCP(model, states, LRS, lambda f, b: F.cross_entropy(f(b[0]), b[1])).scores(test, train)
    with pytest.raises(ValueError, match="k must be"):
        tracin.top_k(test, train, k=14)


# ---------------------------------------------------------------- last-layer path


def test_last_layer_equals_full_gradient_restricted_to_layer(model, states, data, tmp_path):
    test, train = data
    ckpts = mixed_checkpoints(states, tmp_path)
    full = TracInCP(model, ckpts, LRS, ce_loss, params=list(LAST), chunk_size=4)
    fast = LastLayerTracIn(model, ckpts, LRS, ce_loss, layer="fc2", chunk_size=4)
    want = loop_scores(states, LRS, LAST, test, train)
    assert rel_err(full.scores(test, train), want) <= 1e-10
    assert rel_err(fast.scores(test, train), full.scores(test, train)) <= 1e-10
    assert rel_err(fast.self_influence(train), full.self_influence(train)) <= 1e-10
    assert torch.equal(fast.top_k(test, train, 4).proponent_indices, full.top_k(test, train, 4).proponent_indices)
    assert fast.feature_dim == 3 * 9


def test_last_layer_without_bias(data):
    test, train = data
    torch.manual_seed(5)
    model = MLP(bias=False).double()
    st = make_states(bias=False)
    got = LastLayerTracIn(model, st, LRS, ce_loss, layer="fc2").scores(test, train)
    assert rel_err(got, loop_scores(st, LRS, ("fc2.weight",), test, train, bias=False)) <= 1e-10


def test_last_layer_factors_are_the_layer_gradient(model, states, data):
    """g a^T from iter_factors is the per-example gradient of [W | b] (checkpoint 1)."""
    _, train = data
    fast = LastLayerTracIn(model, states, LRS, ce_loss, layer="fc2", chunk_size=6)
    g, a = (torch.cat(t) for t in zip(*fast.iter_factors(train, 1)))
    want = loop_grads(states[1], *train, LAST)  # [vec(dW) (24), db (3)]
    assert torch.allclose(g, want[:, 24:], rtol=1e-12, atol=1e-15)
    outer = g[:, :, None] * a[:, None, :]
    assert torch.allclose(outer[:, :, :8].reshape(13, -1), want[:, :24], rtol=1e-12, atol=1e-15)
    assert torch.equal(a[:, 8], torch.ones(13, dtype=torch.float64))


def test_last_layer_errors(model, states, data):
    with pytest.raises(TypeError, match="not nn.Linear"):
        LastLayerTracIn(model, states, LRS, ce_loss, layer="act")
    with pytest.raises(ValueError, match="no module named"):
        LastLayerTracIn(model, states, LRS, ce_loss, layer="head")
    test, train = data

    def loss_3d(f, b):
        return F.cross_entropy(f(b[0][:, None, :]).squeeze(1), b[1], reduction="none")

    with pytest.raises(ValueError, match="2-D input"):
        LastLayerTracIn(model, states, LRS, loss_3d, layer="fc2").scores(test, train)
    assert not model.fc2._forward_hooks


# ------------------------------------------------------------ influence embeddings


def analytic_factors(state, x, y):
    """Cross-entropy: g = softmax(z) - onehot(y); a = [tanh(W1 x + b1), 1]."""
    h = torch.tanh(x @ state["fc1.weight"].T + state["fc1.bias"])
    z = h @ state["fc2.weight"].T + state["fc2.bias"]
    g = torch.softmax(z, dim=1) - F.one_hot(y, 3).double()
    return g, torch.cat([h, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def test_embedding_dot_is_tracin_not_product_of_sums(model, states, data):
    test, train = data
    fast = LastLayerTracIn(model, states, LRS, ce_loss, layer="fc2", chunk_size=5)
    e_test, e_train = influence_embeddings(fast, test), influence_embeddings(fast, train)
    assert e_train.shape == (13, embedding_dim(fast)) == (13, 3 * 3 * 9)
    definition = loop_scores(states, LRS, LAST, test, train)
    assert rel_err(e_test @ e_train.T, definition) <= 1e-6

    # the same per-checkpoint factors (analytic), combined both ways
    gg, aa, sum_of_products = 0.0, 0.0, 0.0
    for state, eta in zip(states, LRS):
        g_t, a_t = analytic_factors(state, *test)
        g_r, a_r = analytic_factors(state, *train)
        gg = gg + eta * (g_t @ g_r.T)
        aa = aa + a_t @ a_r.T
        sum_of_products = sum_of_products + eta * (g_t @ g_r.T) * (a_t @ a_r.T)
    assert rel_err(sum_of_products, definition) <= 1e-10  # the definition: sum over checkpoints of products
    assert rel_err(gg * aa, definition) > 0.1  # the product of sums is a different quantity


def test_projected_embeddings_equal_projection_of_full(model, states, data):
    _, train = data
    fast = LastLayerTracIn(model, states, LRS, ce_loss, layer="fc2", chunk_size=5)
    proj = GaussianProjection(embedding_dim(fast), 16, seed=3)
    full = influence_embeddings(fast, train)
    projected = influence_embeddings(fast, train, projection=proj)
    assert projected.shape == (13, 16)
    assert torch.allclose(projected, full @ torch.from_numpy(proj.rows(0, proj.in_dim)), rtol=1e-12, atol=1e-14)
    assert torch.allclose(projected, proj(full), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="in_dim"):
        influence_embeddings(fast, train, projection=GaussianProjection(10, 4))


def test_gaussian_projection_is_deterministic_and_tiled():
    proj = GaussianProjection(2500, 7, seed=42)
    whole = proj.rows(0, 2500)
    assert np.array_equal(np.concatenate([proj.rows(0, 1000), proj.rows(1000, 2049), proj.rows(2049, 2500)]), whole)
    assert np.array_equal(GaussianProjection(2500, 7, seed=42).rows(900, 1100), whole[900:1100])
    assert not np.array_equal(GaussianProjection(2500, 7, seed=43).rows(0, 10), whole[:10])
    assert abs(whole.var() * 7 - 1) < 0.05  # entries N(0, 1/d)


def test_jl_inner_product_error_within_bound():
    """|<uR, vR> - <u, v>| <= eps ||u|| ||v|| for all pairs at d = jl_min_dimension(...)."""
    rng = np.random.default_rng(1)
    m, in_dim, eps, delta = 40, 300, 0.3, 0.01
    u = torch.from_numpy(rng.standard_normal((m, in_dim)) * rng.uniform(0.1, 10, (m, 1)))
    u[1] = u[0] + 0.1 * u[1]  # include strongly correlated pairs
    n_pairs = m * (m + 1) // 2
    d = jl_min_dimension(n_pairs, eps, delta)
    assert d == math.ceil(4 * math.log(4 * n_pairs / delta) / (eps**2 - eps**3))
    pu = GaussianProjection(in_dim, d, seed=7)(u)
    norms = u.norm(dim=1)
    err = ((pu @ pu.T) - (u @ u.T)).abs() / (norms[:, None] * norms[None, :])
    assert err.max() <= eps
    assert err.max() > 1e-3  # a real projection, not the identity

    # at a small d the per-pair violation rate stays below the per-pair bound
    small_d, eps2 = 48, 0.5
    pu = GaussianProjection(in_dim, small_d, seed=8)(u)
    err = ((pu @ pu.T) - (u @ u.T)).abs() / (norms[:, None] * norms[None, :])
    assert float((err > eps2).double().mean()) <= jl_pair_failure_probability(small_d, eps2) < 1
    with pytest.raises(ValueError, match="eps"):
        jl_min_dimension(10, 1.0, 0.1)
