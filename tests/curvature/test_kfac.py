"""K-FAC / EK-FAC against an explicit Gauss-Newton matrix built with autograd, independently of the solver."""

import pytest
import torch
from torch import nn

from influencekit import TorchObjective
from influencekit.curvature import DenseOperator, HessianOperator
from influencekit.persistence import save_tensors
from influencekit.solvers import CGSolver, JacobiPreconditioner, NotPositiveDefiniteError
from influencekit.curvature.kfac import KFACCurvature
from influencekit.solvers.kfac import KFACSolver, SingularKFACError

DT = torch.float64


# -- models and data ---------------------------------------------------------------------
def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    elif kind == "conv_full":  # the kernel covers the whole 3x3 input: one spatial location
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3))
    elif kind == "conv":  # 5x5 input, padding 1, stride 2: 3x3 = 9 locations
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    elif kind == "conv_same":  # string padding, reflect padding mode, dilation: 4x4 = 16 locations
        conv = nn.Conv2d(1, 2, 3, padding="same", padding_mode="reflect", dilation=2)
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
    else:
        raise ValueError(kind)
    return model.to(DT)


def make_data(kind: str, loss: str, n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = {"mlp": (5,), "conv_full": (1, 3, 3), "conv": (1, 5, 5), "conv_same": (1, 4, 4)}[kind]
    x = torch.randn(n, *shape, generator=gen, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n,), generator=gen)
    else:
        y = torch.randn(n, 3, generator=gen, dtype=DT)
    return x, y


def make_objective(kind, loss, n, weight_decay=0.0, params=None, data=None, **kwargs):
    model = make_model(kind)
    x, y = make_data(kind, loss, n)
    return TorchObjective(model, loss, data if data is not None else (x, y), weight_decay=weight_decay, params=params, **kwargs), x, y


# -- the explicit GGN and the layer layout, independent of influencekit.solvers.kfac ----------
def explicit_ggn(objective: TorchObjective, x, y) -> torch.Tensor:
    """(1/n) sum_i J_i^T H_i J_i + lambda I with J from autograd and H the loss Hessian in the outputs."""
    theta = objective.parameters_vector()
    total = torch.zeros(objective.dim, objective.dim, dtype=DT)
    for i in range(len(x)):
        example = (x[i : i + 1], y[i : i + 1])
        outputs = objective.outputs(theta, example).detach()
        jac = torch.autograd.functional.jacobian(lambda t: objective.outputs(t, example).reshape(-1), theta)
        hess = torch.autograd.functional.hessian(
            lambda o: objective.loss(o.reshape(outputs.shape), example)[0], outputs.reshape(-1)
        )
        total += jac.T @ hess @ jac
    return total / len(x) + objective.weight_decay * torch.eye(objective.dim, dtype=DT)


def layer_index(objective: TorchObjective, prefix: str) -> torch.Tensor:
    """theta indices of [W, b] (out, in + 1), row-major, for the layer named ``prefix``."""
    offsets = objective.space.offsets()
    w, b = offsets[f"{prefix}.weight"], offsets[f"{prefix}.bias"]
    out = b.stop - b.start
    weight = torch.arange(w.start, w.stop).reshape(out, -1)
    return torch.cat([weight, torch.arange(b.start, b.stop).reshape(out, 1)], dim=1).reshape(-1)


def block(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return matrix[index.unsqueeze(1), index.unsqueeze(0)]


LAYERS = {"mlp": ["0", "2"], "conv_full": ["0", "3"], "conv": ["0", "3"], "conv_same": ["0", "3"]}
REORDERED_MLP = ["2.bias", "0.weight", "2.weight", "0.bias"]


# -- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("kind,params", [("mlp", None), ("mlp", REORDERED_MLP), ("conv_full", None)])
def test_kfac_is_exact_for_one_example(kind, params, loss):
    objective, x, y = make_objective(kind, loss, n=1, weight_decay=0.3, params=params)
    exact = explicit_ggn(objective, x, y)
    approx = KFACCurvature(objective).to_dense()
    for prefix in LAYERS[kind]:
        index = layer_index(objective, prefix)
        torch.testing.assert_close(block(approx, index), block(exact, index), rtol=1e-10, atol=1e-12)
    # block-diagonal: nothing between layers but the weight decay
    first, second = (layer_index(objective, p) for p in LAYERS[kind])
    assert block(approx, torch.cat([first, second]))[: len(first), len(first) :].abs().max() == 0


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
def test_kfac_linear_block_exact_after_multi_location_conv(loss):
    objective, x, y = make_objective("conv", loss, n=1)
    exact, approx = explicit_ggn(objective, x, y), KFACCurvature(objective).to_dense()
    index = layer_index(objective, "3")
    torch.testing.assert_close(block(approx, index), block(exact, index), rtol=1e-10, atol=1e-12)


def test_input_factor_is_mean_outer_product_of_inputs_with_bias():
    objective, x, _ = make_objective("mlp", "cross_entropy", n=9)
    solver = KFACCurvature(objective).fit()
    augmented = torch.cat([x, torch.ones(9, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(solver.factors["0"].A, augmented.T @ augmented / 9, rtol=1e-13, atol=1e-14)


# -- EK-FAC --------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("kind", ["mlp", "conv", "conv_same"])
def test_ekfac_is_exact_diagonal_in_eigenbasis_and_no_worse_than_kfac(kind, loss):
    objective, x, y = make_objective(kind, loss, n=12, weight_decay=0.01)
    exact = explicit_ggn(objective, x, y)
    kfac = KFACCurvature(objective)
    ekfac = KFACCurvature(objective, eigenvalue_correction=True)
    dense_kfac, dense_ekfac = kfac.to_dense(), ekfac.to_dense()
    for prefix in LAYERS[kind]:
        index = layer_index(objective, prefix)
        factors = ekfac.factors[prefix]
        basis = torch.kron(factors.eigenvectors_S, factors.eigenvectors_A)
        exact_block = block(exact, index) - objective.weight_decay * torch.eye(len(index), dtype=DT)
        torch.testing.assert_close(
            factors.corrected_eigenvalues.reshape(-1), torch.diagonal(basis.T @ exact_block @ basis), rtol=1e-10, atol=1e-13
        )
        error_kfac = (block(dense_kfac, index) - block(exact, index)).norm()
        error_ekfac = (block(dense_ekfac, index) - block(exact, index)).norm()
        assert error_ekfac <= error_kfac * (1 + 1e-10) + 1e-14
    assert (dense_ekfac - exact).norm() <= (dense_kfac - exact).norm()


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("kind,params", [("mlp", None), ("mlp", REORDERED_MLP), ("conv", None), ("conv_same", None)])
def test_exact_diagonal_is_the_ggn_diagonal(kind, params, loss):
    objective, x, y = make_objective(kind, loss, n=11, weight_decay=0.07, params=params, chunk_size=4)
    exact = explicit_ggn(objective, x, y)
    diagonal = KFACCurvature(objective, chunk_size=3).exact_diagonal()
    torch.testing.assert_close(diagonal, exact.diagonal(), rtol=1e-10, atol=1e-13)
    jacobi = JacobiPreconditioner.from_diagonal(diagonal, damping=0.2)
    reference = JacobiPreconditioner(DenseOperator(exact), damping=0.2, exact=True)
    torch.testing.assert_close(jacobi.inverse, reference.inverse, rtol=1e-10, atol=0)


def test_ekfac_equals_kfac_for_one_example():
    objective, _, _ = make_objective("mlp", "cross_entropy", n=1, weight_decay=0.1)
    torch.testing.assert_close(
        KFACCurvature(objective, eigenvalue_correction=True).to_dense(), KFACCurvature(objective).to_dense(), rtol=1e-10, atol=1e-12
    )


# -- solving -------------------------------------------------------------------------------
@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("damping", [0.05, {"0": 0.2, "2": 1e-3}])
@pytest.mark.parametrize("params", [None, REORDERED_MLP])
def test_solve_matches_explicit_inverse(correction, damping, params):
    objective, _, _ = make_objective("mlp", "cross_entropy", n=15, weight_decay=0.01, params=params)
    solver = KFACSolver(objective, damping=damping, eigenvalue_correction=correction)
    dense = solver.approximation.to_dense()
    per_layer = damping if isinstance(damping, dict) else {"0": damping, "2": damping}
    diagonal = torch.zeros(objective.dim, dtype=DT)
    for prefix, value in per_layer.items():
        diagonal[layer_index(objective, prefix)] = value
    torch.testing.assert_close(solver.damping_vector(), diagonal, rtol=0, atol=0)
    rhs = torch.randn(4, objective.dim, generator=torch.Generator().manual_seed(3), dtype=DT)
    expected = torch.linalg.solve(dense + torch.diag(diagonal), rhs.T).T
    result = solver.solve(rhs)
    assert result.residual_norms is None
    assert ((result.solution - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-10
    damped = solver.approximation.matvec(result.solution) + solver.damping_vector() * result.solution
    torch.testing.assert_close(damped, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("correction", [False, True])
def test_kfac_preconditioned_cg_reaches_the_exact_ggn_solve(correction):
    objective, x, y = make_objective("mlp", "cross_entropy", n=40, weight_decay=0.01)
    exact = explicit_ggn(objective, x, y)
    rhs = torch.randn(3, objective.dim, generator=torch.Generator().manual_seed(4), dtype=DT)
    expected = torch.linalg.solve(exact + 0.02 * torch.eye(objective.dim, dtype=DT), rhs.T).T
    preconditioner = KFACSolver(objective, damping=0.02, eigenvalue_correction=correction).inverse_matvec
    result = CGSolver(DenseOperator(exact), damping=0.02, rtol=1e-12, preconditioner=preconditioner).solve(rhs)
    assert ((result.solution - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-8


@pytest.mark.parametrize("kind", ["conv", "conv_full"])
def test_conv_solve_matches_explicit_inverse(kind):
    objective, _, _ = make_objective(kind, "squared_error", n=6, weight_decay=0.0)
    solver = KFACSolver(objective, damping=0.1, eigenvalue_correction=True)
    rhs = torch.randn(3, objective.dim, generator=torch.Generator().manual_seed(4), dtype=DT)
    expected = torch.linalg.solve(solver.approximation.to_dense() + torch.diag(solver.damping_vector()), rhs.T).T
    assert ((solver.solve(rhs).solution - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-10


def test_residuals_against_a_given_operator():
    objective, _, _ = make_objective("mlp", "cross_entropy", n=10, weight_decay=0.05)
    approximation = KFACCurvature(objective, eigenvalue_correction=True)
    rhs = torch.randn(2, objective.dim, dtype=DT)
    own = KFACSolver(approximation, damping=0.1, residual_operator=DenseOperator(approximation.to_dense())).solve(rhs)
    assert (own.relative_residuals(rhs) <= 1e-12).all()
    hessian = HessianOperator(objective)
    result = KFACSolver(objective, damping=0.1, eigenvalue_correction=True, residual_operator=hessian).solve(rhs)
    manual = (objective.hvp(result.solution) + 0.1 * result.solution - rhs).norm(dim=1)
    torch.testing.assert_close(result.residual_norms, manual)
    assert result.info["method"] == "ekfac" and result.info["layers"] == ["0", "2"]


# -- batching and persistence ---------------------------------------------------------------
def test_factors_do_not_depend_on_batching():
    _, x, y = make_objective("conv", "cross_entropy", n=11)
    sources = {
        "one": (x, y),
        "uneven": [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:11], y[4:11])],
        "dict": [{"inputs": x[:5], "targets": y[:5]}, {"inputs": x[5:], "targets": y[5:]}],
    }
    solvers = {}
    for name, data in sources.items():
        objective, _, _ = make_objective("conv", "cross_entropy", n=11, weight_decay=0.02, data=data)
        solvers[name] = KFACCurvature(objective, eigenvalue_correction=True).fit()
    objective, _, _ = make_objective("conv", "cross_entropy", n=11, weight_decay=0.02)
    solvers["chunk1"] = KFACCurvature(objective, eigenvalue_correction=True, chunk_size=1).fit()
    reference = solvers.pop("one")
    for solver in solvers.values():
        assert solver.n_examples == 11
        for prefix in ["0", "3"]:
            for field in ["A", "S"]:
                torch.testing.assert_close(
                    getattr(solver.factors[prefix], field), getattr(reference.factors[prefix], field), rtol=1e-12, atol=1e-15
                )
        torch.testing.assert_close(solver.to_dense(), reference.to_dense(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("correction", [False, True])
def test_save_load_round_trip(tmp_path, correction):
    objective, _, _ = make_objective("conv", "cross_entropy", n=8, weight_decay=0.01)
    solver = KFACSolver(objective, damping={"0": 0.1, "3": 0.01}, eigenvalue_correction=correction).fit()
    solver.save(tmp_path / "kfac")
    loaded = KFACSolver.load(tmp_path / "kfac", objective)
    assert loaded.approximation.eigenvalue_correction == correction and loaded.layer_damping == solver.layer_damping
    for prefix in ["0", "3"]:
        for field in ["A", "S", "eigenvalues_A", "eigenvectors_A", "eigenvalues_S", "eigenvectors_S"]:
            assert torch.equal(getattr(loaded.approximation.factors[prefix], field), getattr(solver.approximation.factors[prefix], field))
    rhs = torch.randn(3, objective.dim, dtype=DT)
    assert torch.equal(loaded.solve(rhs).solution, solver.solve(rhs).solution)
    assert torch.equal(loaded.approximation.to_dense(), solver.approximation.to_dense())
    other, _, _ = make_objective("conv", "cross_entropy", n=7)
    with pytest.raises(ValueError, match="training set of 8 examples"):
        KFACSolver.load(tmp_path / "kfac", other)
    save_tensors(tmp_path / "other", {"x": torch.zeros(1)}, {"class": "SomethingElse"})
    with pytest.raises(ValueError, match="not a 'KFACCurvature'"):
        KFACSolver.load(tmp_path / "other", objective)


# -- errors and options -----------------------------------------------------------------------
def test_unsupported_parameters_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    x, y = make_data("mlp", "cross_entropy", 4)
    with pytest.raises(ValueError, match=r"1\.weight.*1\.bias|belong to no such layer"):
        KFACSolver(TorchObjective(model, "cross_entropy", (x, y)))
    only_linear = TorchObjective(model, "cross_entropy", (x, y), params=["0.weight", "0.bias", "2.weight", "2.bias"])
    assert [layer.name for layer in KFACCurvature(only_linear).layers] == ["0", "2"]


def test_damping_dict_must_name_every_layer():
    objective, _, _ = make_objective("mlp", "cross_entropy", n=4)
    with pytest.raises(ValueError, match="missing"):
        KFACSolver(objective, damping={"0": 0.1})
    with pytest.raises(ValueError, match="unknown"):
        KFACSolver(objective, damping={"0": 0.1, "2": 0.1, "5": 1.0})


def test_singular_approximation_is_reported():
    objective, _, _ = make_objective("mlp", "cross_entropy", n=6)
    with pytest.raises(SingularKFACError, match="damping") as caught:
        KFACSolver(objective).solve(torch.ones(1, objective.dim, dtype=DT))
    assert isinstance(caught.value, NotPositiveDefiniteError) and caught.value.suggested_damping > 0


def test_custom_loss_needs_an_output_hessian():
    model, (x, y) = make_model("mlp"), make_data("mlp", "squared_error", 6)

    def half_squared_error(outputs, batch):
        return 0.5 * ((outputs - batch[1]) ** 2).sum(dim=1)

    objective = TorchObjective(model, half_squared_error, (x, y))
    with pytest.raises(ValueError, match="output_hessian"):
        KFACSolver(objective)
    reference = KFACCurvature(TorchObjective(model, "squared_error", (x, y))).to_dense()
    torch.testing.assert_close(KFACCurvature(objective, output_hessian="squared_error").to_dense(), reference)
    identity = lambda outputs, batch: torch.eye(3, dtype=DT).expand(len(outputs), 3, 3)  # noqa: E731
    torch.testing.assert_close(KFACCurvature(objective, output_hessian=identity).to_dense(), reference)


def test_shared_layers_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="more than once"):
        KFACSolver(TorchObjective(Tied().to(DT), "cross_entropy", (x, y))).fit()


def test_layers_whose_forward_never_runs_are_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.hidden(x)), self.head.weight, self.head.bias)

    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="never ran"):
        KFACSolver(TorchObjective(Functional().to(DT), "cross_entropy", (x, y))).fit()


def test_one_backward_per_seed_when_batched_backward_fails(monkeypatch):
    objective, _, _ = make_objective("conv", "cross_entropy", n=5)
    expected = KFACCurvature(objective, eigenvalue_correction=True).to_dense()
    original = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    torch.testing.assert_close(KFACCurvature(objective, eigenvalue_correction=True).to_dense(), expected, rtol=1e-12, atol=1e-14)
