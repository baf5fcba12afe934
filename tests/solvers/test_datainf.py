"""DataInf against its closed form built from explicit per-example inverses, with autograd gradients."""

import pytest
import torch
from torch.nn.functional import cross_entropy

from influencekit import SoftmaxRegressionObjective
from influencekit.solvers import DataInfSolver

F64 = torch.float64
N, D, C = 37, 5, 3  # p = 15


def make_objective(n: int = N, seed: int = 0, weight_decay: float = 0.01, weight_scale: float = 1.0) -> SoftmaxRegressionObjective:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=F64) * torch.logspace(0, -2, D, dtype=F64)
    y = torch.randint(0, C, (n,), generator=gen)
    w = weight_scale * torch.randn(C, D, generator=gen, dtype=F64)
    return SoftmaxRegressionObjective(w, x, y, weight_decay=weight_decay)


def autograd_loss_gradients(objective: SoftmaxRegressionObjective) -> torch.Tensor:
    """grad l_i (no L2 term) for every example, by autograd on the cross-entropy, shape (n, p)."""
    rows = []
    for i in range(objective.n_train):
        w = objective.weights.clone().requires_grad_(True)
        loss = cross_entropy(objective.inputs[i : i + 1] @ w.T, objective.targets[i : i + 1])
        rows.append(torch.autograd.grad(loss, w)[0].reshape(-1))
    return torch.stack(rows)


def closed_form(gradients: torch.Tensor, blocks: list[slice], dampings: list[float], rhs: torch.Tensor) -> torch.Tensor:
    """Rows blockdiag(R_l) b, R_l = (1/n) sum_i (g_il g_il^T + lambda_l I)^{-1} with explicit inverses."""
    out = torch.empty_like(rhs)
    for block, lam in zip(blocks, dampings):
        g = gradients[:, block]
        eye = torch.eye(g.shape[1], dtype=F64)
        inverse_mean = torch.stack([torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in g]).mean(dim=0)
        out[:, block] = rhs[:, block] @ inverse_mean
    return out


def fisher_blocks(gradients: torch.Tensor, blocks: list[slice], dampings: list[float]) -> torch.Tensor:
    """The explicit matrix blockdiag((1/n) sum_i g_il g_il^T + lambda_l I), (p, p)."""
    p = gradients.shape[1]
    matrix = torch.zeros(p, p, dtype=F64)
    for block, lam in zip(blocks, dampings):
        g = gradients[:, block]
        matrix[block, block] = g.T @ g / g.shape[0] + lam * torch.eye(g.shape[1], dtype=F64)
    return matrix


def random_rhs(k: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(k, C * D, generator=torch.Generator().manual_seed(seed), dtype=F64)


UNEVEN = [slice(0, 4), slice(4, 11), slice(11, 15)]


@pytest.mark.parametrize("store_gradients", [False, True])
def test_single_block_default_damping_matches_the_closed_form(store_gradients):
    objective = make_objective()
    gradients = autograd_loss_gradients(objective)
    solver = DataInfSolver(objective, chunk_size=10, store_gradients=store_gradients)  # 37 = 10 + 10 + 10 + 7
    expected_lambda = 0.1 * float((gradients**2).sum(dim=1).mean()) / (C * D)
    assert solver.damping == pytest.approx(expected_lambda, rel=1e-12)
    rhs = random_rhs(4)
    result = solver.solve(rhs)
    torch.testing.assert_close(result.solution, closed_form(gradients, [slice(0, 15)], [expected_lambda], rhs), rtol=1e-11, atol=1e-12)
    fisher = fisher_blocks(gradients, [slice(0, 15)], [expected_lambda])
    torch.testing.assert_close(result.residual_norms, (result.solution @ fisher - rhs).norm(dim=1), rtol=1e-9, atol=1e-12)
    assert result.iterations is None


def test_uneven_blocks_with_per_block_damping_as_dict_or_list():
    objective = make_objective()
    gradients = autograd_loss_gradients(objective)
    dampings = [0.03, 0.2, 0.005]
    rhs = random_rhs(3)
    as_list = DataInfSolver(objective, damping=dampings, blocks=UNEVEN, chunk_size=8).solve(rhs).solution
    as_dict = DataInfSolver(objective, damping={2: 0.005, 0: 0.03, 1: 0.2}, blocks=UNEVEN).solve(rhs).solution
    torch.testing.assert_close(as_list, as_dict, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(as_list, closed_form(gradients, UNEVEN, dampings, rhs), rtol=1e-11, atol=1e-12)


def test_named_blocks_in_any_order_and_default_per_block_damping():
    objective = make_objective()
    gradients = autograd_loss_gradients(objective)
    blocks = {"late": slice(9, 15), "early": slice(0, 9)}
    solver = DataInfSolver(objective, blocks=blocks)
    assert solver.block_names == ["late", "early"]
    expected = [0.1 * float((gradients[:, b] ** 2).sum(dim=1).mean()) / (b.stop - b.start) for b in blocks.values()]
    assert solver.block_damping == pytest.approx(expected, rel=1e-12)
    with pytest.raises(AttributeError, match="block_damping"):
        solver.damping
    rhs = random_rhs(2)
    torch.testing.assert_close(solver.solve(rhs).solution, closed_form(gradients, list(blocks.values()), expected, rhs), rtol=1e-11, atol=1e-12)
    named = DataInfSolver(objective, damping={"early": expected[1], "late": expected[0]}, blocks=blocks)
    torch.testing.assert_close(named.solve(rhs).solution, solver.solve(rhs).solution, rtol=1e-14, atol=0)


def test_include_weight_decay_uses_the_training_gradients():
    objective = make_objective(weight_decay=0.3)
    gradients = autograd_loss_gradients(objective) + 0.3 * objective.parameters_vector()
    rhs = random_rhs(2)
    solver = DataInfSolver(objective, damping=0.05, blocks=UNEVEN, include_weight_decay=True)
    torch.testing.assert_close(solver.solve(rhs).solution, closed_form(gradients, UNEVEN, [0.05] * 3, rhs), rtol=1e-11, atol=1e-12)


def test_one_example_is_the_exact_damped_inverse():
    objective = make_objective(n=1)
    g = autograd_loss_gradients(objective)[0]
    rhs = random_rhs(2)
    exact = torch.linalg.solve(torch.outer(g, g) + 0.02 * torch.eye(15, dtype=F64), rhs.T).T
    result = DataInfSolver(objective, damping=0.02).solve(rhs)
    torch.testing.assert_close(result.solution, exact, rtol=1e-11, atol=1e-13)
    assert float(result.relative_residuals(rhs).max()) < 1e-12


def test_harmonic_mean_error_vanishes_as_damping_grows():
    """Relative distance to the exact (Fisher + lambda I)^{-1} b shrinks with lambda; at small lambda it is large."""
    objective = make_objective()
    gradients = autograd_loss_gradients(objective)
    rhs = random_rhs(3)
    errors = []
    for lam in (1e-3, 1e-1, 1e1):
        exact = torch.linalg.solve(fisher_blocks(gradients, [slice(0, 15)], [lam]), rhs.T).T
        got = DataInfSolver(objective, damping=lam).solve(rhs)
        errors.append(float(((got.solution - exact).norm(dim=1) / exact.norm(dim=1)).max()))
        assert float(got.relative_residuals(rhs).max()) > 0
    assert errors[0] > errors[1] > errors[2] and errors[0] > 0.1 and errors[2] < 1e-2


def test_single_rhs_and_more_rhs_than_parameters():
    objective = make_objective()
    gradients = autograd_loss_gradients(objective)
    solver = DataInfSolver(objective, damping=0.04, blocks=UNEVEN)
    many = random_rhs(40)
    torch.testing.assert_close(solver.solve(many).solution, closed_form(gradients, UNEVEN, [0.04] * 3, many), rtol=1e-11, atol=1e-12)
    one = solver.solve(many[0])
    assert one.solution.shape == (1, 15)
    torch.testing.assert_close(one.solution[0], solver.solve(many).solution[0], rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([slice(0, 5), slice(4, 15)], "partition"),
        ([slice(0, 5), slice(6, 15)], "partition"),
        ([slice(0, 10)], "cover"),
        ([slice(0, 15, 2)], "unit step"),
        ([slice(3, 3), slice(0, 15)], "empty"),
        ([], "empty"),
    ],
)
def test_invalid_blocks_are_refused(blocks, message):
    with pytest.raises(ValueError, match=message):
        DataInfSolver(make_objective(), damping=0.1, blocks=blocks)


def test_invalid_damping_is_refused():
    objective = make_objective()
    with pytest.raises(ValueError, match="must name every block"):
        DataInfSolver(objective, damping={0: 0.1, 5: 0.1, 2: 0.1}, blocks=UNEVEN)
    with pytest.raises(ValueError, match="one damping per block"):
        DataInfSolver(objective, damping=[0.1, 0.1], blocks=UNEVEN)
    with pytest.raises(ValueError, match="finite and > 0"):
        DataInfSolver(objective, damping=[0.1, 0.0, 0.1], blocks=UNEVEN)


def test_save_load_round_trip(tmp_path):
    objective = make_objective()
    rhs = random_rhs(3)
    streamed = DataInfSolver(objective, damping=[0.03, 0.2, 0.005], blocks=UNEVEN, chunk_size=9)
    stored = DataInfSolver(objective, blocks={"a": slice(0, 7), "b": slice(7, 15)}, store_gradients=True)
    for name, solver in (("streamed", streamed), ("stored", stored)):
        solver.save(tmp_path / name)
        loaded = DataInfSolver.load(tmp_path / name, objective)
        assert loaded.block_names == solver.block_names and loaded.block_damping == solver.block_damping
        first, second = solver.solve(rhs), loaded.solve(rhs)
        assert torch.equal(second.solution, first.solution)
        assert torch.equal(second.residual_norms, first.residual_norms)
    without_objective = DataInfSolver.load(tmp_path / "stored")
    assert torch.equal(without_objective.solve(rhs).solution, stored.solve(rhs).solution)
    with pytest.raises(ValueError, match="pass the objective"):
        DataInfSolver.load(tmp_path / "streamed")
    with pytest.raises(ValueError, match="changed"):
        DataInfSolver.load(tmp_path / "streamed", make_objective(weight_scale=2.0))
    with pytest.raises(ValueError, match="n = 37"):
        DataInfSolver.load(tmp_path / "streamed", make_objective(n=20))
