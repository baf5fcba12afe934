"""Block-diagonal curvature and the block-wise solver against blocks cut from explicit autograd Hessians."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influencekit import CGSolver, DirectSolver, HessianOperator, LiSSASolver, TorchObjective
from influencekit.curvature import (
    BlockDiagonalOperator,
    CurvatureBlock,
    DenseOperator,
    blocks_from_groups,
    blocks_per_module,
    blocks_per_tensor,
)
from influencekit.solvers.block_diagonal import BlockDiagonalSolver
from minimum import train_to_minimum

DTYPE = torch.float64
N, WD, P = 13, 0.05, 43


pytestmark = pytest.mark.usefixtures("single_thread")  # see tests/conftest.py


def net(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 4-5-3 tanh MLP written out by hand on a flat theta (nn.Linear layout)."""
    w1, b1 = theta[:20].view(5, 4), theta[20:25]
    w2, b2 = theta[25:40].view(3, 5), theta[40:43]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def explicit_hessian(theta, x, y, indices) -> torch.Tensor:
    """Hessian of (1/|B|) sum_{i in B} CE_i + (lambda/2)||theta||^2 by autograd (indices may repeat)."""
    indices = torch.as_tensor(indices)

    def objective(t):
        return F.cross_entropy(net(t, x[indices]), y[indices]) + 0.5 * WD * t @ t

    return torch.autograd.functional.hessian(objective, theta)


def mask_of(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """(p, p) with ones on the diagonal blocks."""
    mask = torch.zeros(P, P, dtype=DTYPE)
    for index in blocks.values():
        mask[index.unsqueeze(1), index.unsqueeze(0)] = 1.0
    return mask


@pytest.fixture(scope="module")
def setup():
    """An MLP trained to a minimum of the regularised cross-entropy (positive definite Hessian)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (N,), generator=gen)
    train_to_minimum(model, x, y, WD)
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=WD, chunk_size=5)
    theta = objective.parameters_vector()
    hessian = explicit_hessian(theta, x, y, torch.arange(N))
    assert float(torch.linalg.eigvalsh(hessian)[0]) > 0
    return objective, hessian


GROUPS = {"weights": ["2.weight", "0.weight"], "biases": ["0.bias", "2.bias"]}


def all_blocks(objective) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "tensor": blocks_per_tensor(objective.space),
        "module": blocks_per_module(objective.model, objective.space),
        "groups": blocks_from_groups(objective.space, GROUPS),
    }


def test_block_helpers_name_and_locate_parameters(setup):
    objective, _ = setup
    per_tensor = blocks_per_tensor(objective.space)
    assert list(per_tensor) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(per_tensor["2.weight"], torch.arange(25, 40))
    per_module = blocks_per_module(objective.model, objective.space)
    assert list(per_module) == ["0", "2"]
    torch.testing.assert_close(per_module["0"], torch.arange(0, 25))
    torch.testing.assert_close(per_module["2"], torch.arange(25, 43))
    groups = blocks_from_groups(objective.space, GROUPS)
    torch.testing.assert_close(groups["weights"], torch.cat([torch.arange(25, 40), torch.arange(0, 20)]))
    torch.testing.assert_close(groups["biases"], torch.cat([torch.arange(20, 25), torch.arange(40, 43)]))


def test_blocks_per_module_of_nested_model_with_root_parameter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.body = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))

    model = Net()
    objective = TorchObjective(model, "squared_error", (torch.randn(4, 2), torch.randn(4, 2)), forward=lambda call, b: call(b[0]))
    blocks = blocks_per_module(model, objective.space)
    assert list(blocks) == ["", "body.0", "body.2"]
    assert [len(b) for b in blocks.values()] == [2, 9, 8]


@pytest.mark.parametrize("kind", ["tensor", "module", "groups"])
def test_block_diagonal_operator_equals_blocks_of_explicit_hessian(kind, setup):
    objective, hessian = setup
    blocks = all_blocks(objective)[kind]
    operator = BlockDiagonalOperator(HessianOperator(objective), blocks)
    expected = hessian * mask_of(blocks)
    vectors = torch.randn(3, P, dtype=DTYPE)
    torch.testing.assert_close(operator.matvec(vectors), vectors @ expected, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(operator.to_dense(), expected, rtol=1e-11, atol=1e-12)
    assert operator.n_train == N
    indices = torch.tensor([[0, 4, 4], [12, 3, 7], [1, 1, 1]])
    got = operator.sampled_matvec(indices, vectors)
    for j in range(3):
        minibatch = explicit_hessian(objective.parameters_vector(), *objective.train.materialize(), indices[j])
        torch.testing.assert_close(got[j], vectors[j] @ (minibatch * mask_of(blocks)), rtol=1e-11, atol=1e-12)


def test_block_specifications_and_their_errors():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 6, generator=gen, dtype=DTYPE)
    dense = DenseOperator(a + a.T)
    expected = (a + a.T) * mask_of_small([[0, 1, 2], [3, 5], [4]], 6)
    mask = torch.tensor([False, False, False, False, True, False])
    for blocks in ([slice(0, 3), torch.tensor([3, 5]), mask], {"a": [0, 1, 2], "b": (3, 5), "c": torch.tensor([4])}):
        operator = BlockDiagonalOperator(dense, blocks)
        torch.testing.assert_close(operator.to_dense(), expected)
        torch.testing.assert_close(operator.matvec(torch.eye(6, dtype=DTYPE)), expected)
    assert list(BlockDiagonalOperator(dense, [slice(0, 3), slice(3, 6)]).blocks) == ["0", "1"]
    with pytest.raises(ValueError, match="overlap"):
        BlockDiagonalOperator(dense, [slice(0, 4), slice(3, 6)])
    with pytest.raises(ValueError, match="2 of 6 coordinate"):
        BlockDiagonalOperator(dense, [slice(0, 4)])
    with pytest.raises(IndexError, match="outside"):
        BlockDiagonalOperator(dense, [slice(0, 6), [6]])
    with pytest.raises(ValueError, match="empty"):
        BlockDiagonalOperator(dense, [slice(0, 6), []])
    with pytest.raises(TypeError, match="integers"):
        BlockDiagonalOperator(dense, [torch.arange(6.0)])
    with pytest.raises(TypeError, match="mini-batch"):
        BlockDiagonalOperator(dense, [slice(0, 6)]).sampled_matvec(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 6))


def mask_of_small(blocks, dim):
    mask = torch.zeros(dim, dim, dtype=DTYPE)
    for index in blocks:
        index = torch.tensor(index)
        mask[index.unsqueeze(1), index.unsqueeze(0)] = 1.0
    return mask


def test_overlapping_unknown_or_missing_groups_are_refused(setup):
    objective, _ = setup
    with pytest.raises(KeyError, match="not an attributed parameter"):
        blocks_from_groups(objective.space, {"a": ["0.weight", "nope"]})
    with pytest.raises(ValueError, match="both group"):
        blocks_from_groups(objective.space, {"a": ["0.weight", "0.bias"], "b": ["0.bias", "2.weight", "2.bias"]})
    with pytest.raises(ValueError, match=r"\['2.bias'\] belong to no group"):
        blocks_from_groups(objective.space, {"a": ["0.weight", "0.bias", "2.weight"]})


def explicit_blockwise_solve(hessian, blocks, dampings, rhs):
    solution = torch.zeros_like(rhs)
    for name, index in blocks.items():
        block = hessian[index][:, index] + dampings[name] * torch.eye(len(index), dtype=DTYPE)
        solution[:, index] = torch.linalg.solve(block, rhs[:, index].T).T
    return solution


def test_block_solver_with_direct_blocks_is_the_blockwise_inverse(setup):
    objective, hessian = setup
    blocks = blocks_per_tensor(objective.space)
    rhs = torch.randn(3, P, dtype=DTYPE)
    solver = BlockDiagonalSolver(HessianOperator(objective), blocks=blocks, make_solver=lambda op, name: DirectSolver(op), damping=0.01)
    result = solver.solve(rhs)
    dampings = dict.fromkeys(blocks, 0.01)
    torch.testing.assert_close(result.solution, explicit_blockwise_solve(hessian, blocks, dampings, rhs), rtol=1e-10, atol=1e-12)
    # Residuals are measured against the block-diagonal operator plus damping, per block and overall.
    block_diagonal = hessian * mask_of(blocks) + 0.01 * torch.eye(P, dtype=DTYPE)
    torch.testing.assert_close(result.residual_norms, (result.solution @ block_diagonal - rhs).norm(dim=1), rtol=0, atol=1e-12)
    assert set(result.info["block_residual_norms"]) == set(blocks)
    assert solver.damping == 0.01
    assert float(result.residual_norms.max()) < 1e-10


def test_block_solver_with_cg_and_per_block_damping(setup):
    objective, hessian = setup
    blocks = blocks_from_groups(objective.space, GROUPS)
    dampings = {"weights": 0.3, "biases": 0.001}
    rhs = torch.randn(2, P, dtype=DTYPE)
    names = []

    def make_solver(operator, name):
        names.append(name)
        assert isinstance(operator, CurvatureBlock) and operator.dim == len(blocks[name])
        return CGSolver(operator, rtol=1e-12)

    solver = BlockDiagonalSolver(HessianOperator(objective), blocks=blocks, make_solver=make_solver, damping=dampings)
    result = solver.solve(rhs)
    assert names == ["weights", "biases"]
    expected = explicit_blockwise_solve(hessian, blocks, dampings, rhs)
    relative = (result.solution - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(relative.max()) < 1e-8
    assert result.info["dampings"] == dampings
    with pytest.raises(AttributeError, match="different dampings"):
        solver.damping


def test_curvature_block_is_the_damped_principal_submatrix(setup):
    objective, hessian = setup
    index = blocks_from_groups(objective.space, GROUPS)["biases"]
    block = CurvatureBlock(HessianOperator(objective), index, damping=0.25)
    expected = hessian[index][:, index] + 0.25 * torch.eye(len(index), dtype=DTYPE)
    torch.testing.assert_close(block.to_dense(), expected, rtol=1e-11, atol=1e-12)
    indices = torch.tensor([[3, 3, 9], [0, 1, 2]])
    vectors = torch.randn(2, len(index), dtype=DTYPE)
    got = block.sampled_matvec(indices, vectors)
    for j in range(2):
        minibatch = explicit_hessian(objective.parameters_vector(), *objective.train.materialize(), indices[j])
        sub = minibatch[index][:, index] + 0.25 * torch.eye(len(index), dtype=DTYPE)
        torch.testing.assert_close(got[j], vectors[j] @ sub, rtol=1e-11, atol=1e-12)


def test_block_solver_with_lissa_blocks(setup):
    objective, hessian = setup
    blocks = blocks_per_module(objective.model, objective.space)
    dampings = {"0": 0.2, "2": 0.1}
    rhs = torch.randn(2, P, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    solver = BlockDiagonalSolver(
        HessianOperator(objective),
        blocks=blocks,
        make_solver=lambda op, name: LiSSASolver(op, depth=80, repeats=4, batch_size=N, seed=1, progress=False),
        damping=dampings,
    )
    result = solver.solve(rhs)
    expected = explicit_blockwise_solve(hessian, blocks, dampings, rhs)
    relative = (result.solution - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(relative.max()) < 0.1, relative
    assert torch.isfinite(result.residual_norms).all()


def test_block_solver_errors(setup):
    objective, _ = setup
    operator, blocks = HessianOperator(objective), blocks_per_module(objective.model, objective.space)
    with pytest.raises(ValueError, match=r"unknown \['1'\], missing \['2'\]"):
        BlockDiagonalSolver(operator, blocks=blocks, make_solver=lambda op, name: DirectSolver(op), damping={"0": 0.1, "1": 0.1})
    with pytest.raises(ValueError, match="finite and >= 0"):
        BlockDiagonalSolver(operator, blocks=blocks, make_solver=lambda op, name: DirectSolver(op), damping=-1.0)
    with pytest.raises(ValueError, match="has damping 0.1"):
        BlockDiagonalSolver(operator, blocks=blocks, make_solver=lambda op, name: CGSolver(op, damping=0.1))
    with pytest.raises(TypeError, match="must return a Solver"):
        BlockDiagonalSolver(operator, blocks=blocks, make_solver=lambda op, name: op)
