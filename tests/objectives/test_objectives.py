"""The generic torch.func objective against explicit autograd loops, finite differences and closed forms."""

import pytest
import torch
from torch import nn

from influencekit import DataSource, SoftmaxRegressionObjective, TorchObjective


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_data(n: int = 23, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def loop_gradients(model: nn.Module, x, y, weight_decay: float) -> torch.Tensor:
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.stack(rows) + weight_decay * theta


def test_per_example_gradients_match_autograd_loop():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.1, chunk_size=5)
    expected = loop_gradients(model, x, y, 0.1)
    got = objective.train_gradients(torch.arange(len(y)))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_train_gradient_dots_equal_gradients_times_directions():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.1, chunk_size=7)
    directions = torch.randn(3, objective.dim, dtype=torch.float64)
    expected = directions @ loop_gradients(model, x, y, 0.1).T
    torch.testing.assert_close(objective.train_gradient_dots(directions), expected, rtol=1e-11, atol=1e-12)


def test_objective_gradient_is_mean_of_training_gradients():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, chunk_size=4)
    torch.testing.assert_close(objective.objective_gradient(), objective.train_gradients(torch.arange(23)).mean(0))


def test_hvp_matches_finite_differences_of_gradients():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, chunk_size=6)
    v = torch.randn(objective.dim, dtype=torch.float64)
    eps = 1e-5
    theta = objective.parameters_vector()

    def gradient_at(t):
        shifted = make_mlp()
        torch.nn.utils.vector_to_parameters(t, shifted.parameters())
        return TorchObjective(shifted, "cross_entropy", (x, y), weight_decay=0.05).objective_gradient()

    fd = (gradient_at(theta + eps * v) - gradient_at(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(objective.hvp(v)[0], fd, rtol=1e-7, atol=1e-9)


def test_explicit_hessian_matches_torch_autograd_hessian():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05)

    def objective_at(theta):
        return objective.losses(theta, (x, y)).mean() + 0.025 * theta @ theta

    expected = torch.autograd.functional.hessian(objective_at, objective.parameters_vector())
    torch.testing.assert_close(objective.hessian(block=7), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("budget_chunks", [0, 2, None])  # no chunk cached, the first 2 of 4, all (in 2 groups)
def test_hvp_with_retained_gradient_graphs_is_the_hessian(budget_chunks, monkeypatch):
    monkeypatch.setattr("influencekit.objectives.torch_objective.HVP_GRAPH_ROWS", 12)  # 2 chunks of 6 per graph
    model, (x, y) = make_mlp(), make_data()
    probe = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, chunk_size=6)
    _, per_chunk = probe._retained_gradient(probe._prepare((x[:6], y[:6])))
    assert per_chunk > 0  # the tanh activations and softmax outputs of the chunk, not the data
    budget = 1e6 if budget_chunks is None else (budget_chunks + 0.5) * per_chunk / 2**20
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, chunk_size=6, hvp_cache_mb=budget)

    def objective_at(theta):
        return objective.losses(theta, (x, y)).mean() + 0.025 * theta @ theta

    hessian = torch.autograd.functional.hessian(objective_at, objective.parameters_vector())
    v = torch.randn(3, objective.dim, dtype=torch.float64)
    for _ in range(2):  # the retained graphs serve every later product
        torch.testing.assert_close(objective.hvp(v), v @ hessian, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(objective.hvp(v[1]), v[1:2] @ hessian, rtol=1e-10, atol=1e-12)
    # all fit: graphs of 12 rows (the 4 chunks in 2 graphs); only part fits: one graph per chunk
    assert len(objective._cached_gradients()) == (2 if budget_chunks is None else budget_chunks)


def test_hvp_of_a_convolutional_network_matches_autograd_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.01, chunk_size=4)
    hessian = torch.autograd.functional.hessian(
        lambda t: objective.losses(t, (x, y)).mean() + 0.005 * t @ t, objective.parameters_vector()
    )
    v = torch.randn(2, objective.dim, dtype=torch.float64)
    torch.testing.assert_close(objective.hvp(v), v @ hessian, rtol=1e-10, atol=1e-12)


def test_sampled_hvp_is_minibatch_hessian():
    model, (x, y) = make_mlp(), make_data()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05)
    indices = torch.tensor([[0, 5, 5], [3, 9, 22]])
    v = torch.randn(2, objective.dim, dtype=torch.float64)
    got = objective.sampled_hvp(indices, v)
    for j in range(2):
        sub = TorchObjective(model, "cross_entropy", (x[indices[j]], y[indices[j]]), weight_decay=0.05)
        torch.testing.assert_close(got[j], sub.hvp(v[j])[0], rtol=1e-12, atol=1e-12)


def test_mini_batches_shared_by_groups_of_rows_are_those_batches_hessians():
    # softmax (two GEMMs per group) and TorchObjective (expanded to a batch per row): indices (g, B),
    # row j uses batch j // (k / g), against the explicit Hessian of the objective on exactly those
    # examples (repeats included)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(31, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (31,), generator=gen)
    weights = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    fast = SoftmaxRegressionObjective(weights, x, y, weight_decay=0.03)
    model = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weights)
    generic = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.03)

    def batch_hessian(batch):
        return SoftmaxRegressionObjective(weights, x[batch], y[batch], weight_decay=0.03).hessian()

    shared = torch.tensor([2, 7, 7, 30, 0])
    grouped = torch.tensor([[2, 7, 7, 30, 0], [1, 1, 5, 9, 12]])  # rows 0..2 and rows 3..5
    for indices in (shared, shared.unsqueeze(0), grouped, grouped.repeat_interleave(3, dim=0)):
        rows = indices.reshape(-1, 5).repeat_interleave(6 // indices.reshape(-1, 5).shape[0], dim=0)
        expected = torch.stack([v[j] @ batch_hessian(rows[j]) for j in range(6)])
        torch.testing.assert_close(fast.sampled_hvp(indices, v), expected, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(generic.sampled_hvp(indices, v), expected, rtol=1e-10, atol=1e-12)
        assert float((expected - 0.03 * v).norm()) > 0.5 * float(expected.norm())  # H_B v, not just lambda v
    for wrong in (torch.zeros(4, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match="g dividing k = 6"):
            fast.sampled_hvp(wrong, v)


def test_batching_does_not_change_results():
    model, (x, y) = make_mlp(), make_data()
    v = torch.randn(60, 51, dtype=torch.float64)  # more right-hand sides than parameters (p = 51)
    plain = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, chunk_size=1000)
    uneven = [(x[a:b], y[a:b]) for a, b in [(0, 1), (1, 8), (8, 10), (10, 23)]]
    dict_batches = [{"inputs": xb, "targets": yb} for xb, yb in uneven]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    for data in (uneven, dict_batches, loader, [(x, y)]):
        other = TorchObjective(model, "cross_entropy", data, weight_decay=0.05)
        assert other.n_train == 23
        torch.testing.assert_close(other.hvp(v), plain.hvp(v), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(other.train_gradient_dots(v), plain.train_gradient_dots(v), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(other.objective_gradient(), plain.objective_gradient(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(
            other.sampled_hvp(torch.tensor([[2, 20]]), v[:1]), plain.sampled_hvp(torch.tensor([[2, 20]]), v[:1])
        )


def test_shuffling_loader_is_refused():
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        DataSource(loader)


def test_attributing_a_subset_of_parameters():
    model, (x, y) = make_mlp(), make_data()
    full = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05)
    last = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.05, params=["2.weight", "2.bias"])
    assert last.dim == 21
    torch.testing.assert_close(last.hessian(), full.hessian()[-21:, -21:], rtol=1e-12, atol=1e-13)
    with pytest.raises(KeyError, match="unknown parameter"):
        TorchObjective(model, "cross_entropy", (x, y), params=["nope"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_fast_path_matches_generic_path(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(37, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 4, (37,), generator=gen)
    model = nn.Linear(6, 4, bias=False).to(dtype)
    generic = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.01, chunk_size=10)
    fast = SoftmaxRegressionObjective(model.weight.detach(), x, y, weight_decay=0.01, chunk_size=9)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    v = torch.randn(5, 24, generator=gen, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(fast.hvp(v), generic.hvp(v), **tol)
    torch.testing.assert_close(fast.hessian(chunk_size=8), generic.hessian(), **tol)
    torch.testing.assert_close(fast.train_gradient_dots(v), generic.train_gradient_dots(v), **tol)
    torch.testing.assert_close(fast.train_gradients(torch.arange(37)), generic.train_gradients(torch.arange(37)), **tol)
    torch.testing.assert_close(fast.objective_gradient(), generic.objective_gradient(), **tol)
    assert abs(fast.objective_value() - generic.objective_value()) < (1e-12 if dtype == torch.float64 else 1e-5)
    idx = torch.randint(0, 37, (5, 3), generator=gen)
    torch.testing.assert_close(fast.sampled_hvp(idx, v), generic.sampled_hvp(idx, v), **tol)
    test = (x[:4], y[:4])
    torch.testing.assert_close(fast.measurement_gradients(test), generic.measurement_gradients(test), **tol)
    torch.testing.assert_close(fast.measurement_values(test), generic.measurement_values(test), **tol)
