"""Gauss-Newton and empirical Fisher operators against explicit matrices built with autograd loops.

Ground truth never goes through the operators' torch.func code: the network is
re-implemented as an explicit function of a flat theta, Jacobians come from
``torch.autograd.functional.jacobian``, output Hessians from their closed forms,
per-example gradients from ``torch.autograd.grad`` on the nn.Module.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influencekit import CGSolver, DirectSolver, HessianOperator, LiSSASolver, SoftmaxRegressionObjective, TorchObjective
from influencekit.curvature import BlockDiagonalOperator, EmpiricalFisherOperator, GaussNewtonOperator, blocks_per_module
from minimum import train_to_minimum

DTYPE = torch.float64
N, WD = 13, 0.05


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)  # p = 43


def make_data(loss: str, n: int = N, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, 3, generator=gen, dtype=DTYPE)
    return x, y


def net(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 4-5-3 tanh MLP written out by hand on a flat theta (nn.Linear layout)."""
    w1, b1 = theta[:20].view(5, 4), theta[20:25]
    w2, b2 = theta[25:40].view(3, 5), theta[40:43]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def theta_of(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def example_loss(outputs: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, target)
    return 0.5 * ((outputs - target) ** 2).sum()


def explicit_ggn(model, x, y, loss: str, indices, weight_decay: float) -> torch.Tensor:
    """(1/|indices|) sum_i J_i^T H_out,i J_i + lambda I, indices may repeat."""
    theta = theta_of(model)
    torch.testing.assert_close(net(theta, x), model(x).detach(), rtol=1e-14, atol=1e-14)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=DTYPE)
    for i in indices:
        jac = torch.autograd.functional.jacobian(lambda t: net(t, x[i]), theta)  # (3, p)
        if loss == "cross_entropy":
            prob = torch.softmax(net(theta, x[i]), dim=0)
            h_out = torch.diag(prob) - torch.outer(prob, prob)
        else:
            h_out = torch.eye(3, dtype=DTYPE)
        total += jac.T @ h_out @ jac
    return total / len(indices) + weight_decay * torch.eye(theta.numel(), dtype=DTYPE)


def loop_loss_gradients(model, x, y, loss: str) -> torch.Tensor:
    """Per-example gradients of the loss (no L2 term), one autograd call each, shape (n, p)."""
    rows = []
    for i in range(len(x)):
        value = example_loss(model(x[i : i + 1]), y[i : i + 1], loss)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))]))
    return torch.stack(rows)


def explicit_fisher(model, x, y, loss: str, indices, weight_decay: float) -> torch.Tensor:
    grads = loop_loss_gradients(model, x, y, loss)[torch.as_tensor(indices)]
    return grads.T @ grads / len(indices) + weight_decay * torch.eye(grads.shape[1], dtype=DTYPE)


def explicit_hessian(model, x, y, loss: str, weight_decay: float) -> torch.Tensor:
    def objective(theta):
        outputs = net(theta, x)
        values = F.cross_entropy(outputs, y, reduction="none") if loss == "cross_entropy" else 0.5 * ((outputs - y) ** 2).sum(1)
        return values.mean() + 0.5 * weight_decay * theta @ theta

    return torch.autograd.functional.hessian(objective, theta_of(model))


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_gauss_newton_matches_explicit_jacobian_products(loss):
    model, (x, y) = make_mlp(), make_data(loss)
    objective = TorchObjective(model, loss, (x, y), weight_decay=WD, chunk_size=5)
    ggn = GaussNewtonOperator(objective)
    expected = explicit_ggn(model, x, y, loss, range(N), WD)
    vectors = torch.randn(4, 43, dtype=DTYPE)
    torch.testing.assert_close(ggn.matvec(vectors), vectors @ expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ggn.to_dense(), expected, rtol=1e-12, atol=1e-13)
    assert ggn.n_train == N
    # The Gauss-Newton matrix drops the residual term: it is not the Hessian of this nonlinear model.
    assert (expected - explicit_hessian(model, x, y, loss, WD)).abs().max() > 1e-3


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_gauss_newton_sampled_matvec_is_minibatch_matrix(loss):
    model, (x, y) = make_mlp(), make_data(loss)
    objective = TorchObjective(model, loss, (x, y), weight_decay=WD, chunk_size=4)
    indices = torch.tensor([[0, 5, 5, 12], [3, 9, 1, 2], [7, 7, 7, 7]])
    vectors = torch.randn(3, 43, dtype=DTYPE)
    got = GaussNewtonOperator(objective).sampled_matvec(indices, vectors)
    for j in range(3):
        expected = vectors[j] @ explicit_ggn(model, x, y, loss, indices[j].tolist(), WD)
        torch.testing.assert_close(got[j], expected, rtol=1e-12, atol=1e-13)


def test_gauss_newton_equals_hessian_for_linear_model_with_squared_error():
    x, y = make_data("squared_error")
    model = nn.Linear(4, 3).to(DTYPE)
    objective = TorchObjective(model, "squared_error", (x, y), weight_decay=WD, chunk_size=6)
    ggn, hessian = GaussNewtonOperator(objective), HessianOperator(objective)
    torch.testing.assert_close(ggn.to_dense(), hessian.to_dense(), rtol=1e-12, atol=1e-13)
    # Closed form, theta = [W (3, 4) row-major, b (3)]: H = [[I kron mean(x x^T), I kron mean(x)], [., I]] + lambda I.
    eye3 = torch.eye(3, dtype=DTYPE)
    second, mean = x.T @ x / N, x.mean(0)  # (4, 4), (4,)
    closed = torch.cat(
        [
            torch.cat([torch.kron(eye3, second), torch.kron(eye3, mean.unsqueeze(1))], 1),
            torch.cat([torch.kron(eye3, mean.unsqueeze(0)), eye3], 1),
        ]
    )
    torch.testing.assert_close(ggn.to_dense(), closed + WD * torch.eye(15, dtype=DTYPE), rtol=1e-12, atol=1e-13)
    indices = torch.tensor([[1, 2, 2], [0, 12, 4]])
    vectors = torch.randn(2, 15, dtype=DTYPE)
    torch.testing.assert_close(
        ggn.sampled_matvec(indices, vectors), hessian.sampled_matvec(indices, vectors), rtol=1e-12, atol=1e-13
    )


def test_gauss_newton_handles_structured_outputs_and_custom_losses():
    """The output Hessian comes from torch.func on the loss, so tuple outputs and a custom loss just work."""
    model, (x, y) = make_mlp(), make_data("cross_entropy")

    def forward(call, batch):
        logits = call(batch["inputs"])
        return logits[:, :2], logits[:, 2:]

    def split_loss(outputs, batch):
        return F.cross_entropy(torch.cat(outputs, dim=1), batch["targets"], reduction="none")

    split = TorchObjective(model, split_loss, {"inputs": x, "targets": y}, weight_decay=WD, forward=forward)
    plain = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD)
    vectors = torch.randn(3, 43, dtype=DTYPE)
    expected = GaussNewtonOperator(plain).matvec(vectors)
    torch.testing.assert_close(GaussNewtonOperator(split).matvec(vectors), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_empirical_fisher_matches_outer_products_of_loop_gradients(loss):
    model, (x, y) = make_mlp(), make_data(loss)
    objective = TorchObjective(model, loss, (x, y), weight_decay=WD, chunk_size=5)
    fisher = EmpiricalFisherOperator(objective)
    expected = explicit_fisher(model, x, y, loss, list(range(N)), WD)
    vectors = torch.randn(4, 43, dtype=DTYPE)
    torch.testing.assert_close(fisher.matvec(vectors), vectors @ expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fisher.to_dense(), expected, rtol=1e-12, atol=1e-13)
    indices = torch.tensor([[0, 5, 5, 12], [3, 9, 1, 2]])
    got = fisher.sampled_matvec(indices, vectors[:2])
    for j in range(2):
        minibatch = explicit_fisher(model, x, y, loss, indices[j], WD)
        torch.testing.assert_close(got[j], vectors[j] @ minibatch, rtol=1e-12, atol=1e-13)
    # Rank at most n = 13 < p = 43 before the lambda I.
    eigenvalues = torch.linalg.eigvalsh(expected - WD * torch.eye(43, dtype=DTYPE))
    assert int((eigenvalues > 1e-10).sum()) <= N


def make_trained_objective() -> TorchObjective:
    """The MLP trained to a minimum of the regularised objective, so its Hessian is positive definite."""
    model, (x, y) = make_mlp(), make_data("cross_entropy")
    train_to_minimum(model, x, y, WD)
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=5)
    assert objective.objective_gradient().norm() < 1e-6
    return objective


@pytest.fixture(scope="module")
def trained():
    return make_trained_objective()


KINDS = {
    "hessian": HessianOperator,
    "gauss_newton": GaussNewtonOperator,
    "empirical_fisher": EmpiricalFisherOperator,
    "block_gauss_newton": lambda o: BlockDiagonalOperator(GaussNewtonOperator(o), blocks_per_module(o.model, o.space)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_curvature_kind_works_with_every_solver(kind, trained):
    operator = KINDS[kind](trained)
    damping = 0.2
    rhs = torch.randn(2, 43, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    dense = operator.to_dense()
    exact = torch.linalg.solve(dense + damping * torch.eye(43, dtype=DTYPE), rhs.T).T

    direct = DirectSolver(operator, damping=damping).solve(rhs)
    torch.testing.assert_close(direct.solution, exact, rtol=1e-10, atol=1e-12)

    cg = CGSolver(operator, damping=damping, rtol=1e-12).solve(rhs)
    assert bool(cg.info["converged"].all())
    assert float(((cg.solution - direct.solution).norm(dim=1) / direct.solution.norm(dim=1)).max()) < 1e-8

    lissa = LiSSASolver(operator, damping=damping, depth=100, repeats=4, batch_size=N, progress=False).solve(rhs)
    relative = (lissa.solution - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(relative.max()) < 0.1, relative


def test_normalisation_does_not_depend_on_batching():
    model, (x, y) = make_mlp(), make_data("cross_entropy")
    vectors = torch.randn(5, 43, dtype=DTYPE)
    indices = torch.tensor([[2, 12, 2], [0, 1, 5]])
    uneven = [(x[a:b], y[a:b]) for a, b in [(0, 1), (1, 8), (8, 10), (10, 13)]]
    sources = {
        "single": (x, y),
        "uneven": uneven,
        "dict": [{"inputs": xb, "targets": yb} for xb, yb in uneven],
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6),
    }
    for kind in (GaussNewtonOperator, EmpiricalFisherOperator):
        reference = kind(TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=1000))
        expected, expected_sampled = reference.matvec(vectors), reference.sampled_matvec(indices, vectors[:2])
        for name, data in sources.items():
            operator = kind(TorchObjective(model, "cross_entropy", data, weight_decay=WD, chunk_size=4))
            assert operator.n_train == N, name
            torch.testing.assert_close(operator.matvec(vectors), expected, rtol=1e-12, atol=1e-12, msg=name)
            sampled = operator.sampled_matvec(indices, vectors[:2])
            torch.testing.assert_close(sampled, expected_sampled, rtol=1e-12, atol=1e-12, msg=name)


def test_mismatched_batches_and_shapes_are_refused():
    model, (x, y) = make_mlp(), make_data("cross_entropy")
    objective = TorchObjective(model, "cross_entropy", (x, y))
    with pytest.raises(ValueError, match="g dividing k = 2"):  # 3 mini-batches cannot be shared by 2 rows
        GaussNewtonOperator(objective).sampled_matvec(torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.randn(2, 43, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"shape \(k, 43\)"):
        EmpiricalFisherOperator(objective).matvec(torch.randn(2, 42, dtype=DTYPE))
    closed_form = SoftmaxRegressionObjective(torch.zeros(3, 4, dtype=DTYPE), x, y, weight_decay=0.0)
    with pytest.raises(TypeError, match="needs a TorchObjective"):
        GaussNewtonOperator(closed_form)
