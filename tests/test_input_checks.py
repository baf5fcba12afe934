"""Bad input gets a one-line error naming the problem and where it is, never a silently wrong score."""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from influencekit import (
    CGSolver,
    DenseOperator,
    DirectSolver,
    DtypeCastWarning,
    DtypeError,
    EmptyDataError,
    HessianOperator,
    IndefiniteCurvatureError,
    InfluenceFunction,
    InfluenceInputError,
    LabelRangeError,
    NondeterministicDataError,
    NonFiniteError,
    NonSequentialSamplerError,
    NotPositiveDefiniteError,
    TorchObjective,
    TrainModeError,
    UnconvergedSolveError,
    UnconvergedSolveWarning,
)


def regression_data(n=20, d=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x, x @ torch.arange(1.0, d + 1, dtype=dtype)[:, None] + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)


def linear(d=3, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Linear(d, 1).to(dtype)


def classification_data(n=30, d=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def ridge_influence(x, y, **kwargs):
    objective = TorchObjective(linear(x.shape[1]), "squared_error", (x, y), weight_decay=0.1)
    return objective, InfluenceFunction(objective, DirectSolver(HessianOperator(objective)), **kwargs)


# -- non-finite values ---------------------------------------------------------------------------------------
def test_nan_pixel_in_training_inputs_names_the_example():
    x, y = regression_data()
    x[7, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"training data .*nan.* in inputs of example 7;"):
        TorchObjective(linear(), "squared_error", (x, y))


def test_nan_in_a_loader_batch_names_the_example_in_the_data_set():
    x, y = regression_data()
    y[13, 0] = float("inf")
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    with pytest.raises(NonFiniteError, match=r"training data .*inf.* in targets of example 13;"):
        TorchObjective(linear(), "squared_error", loader)


def test_inf_in_a_test_input_names_the_test_example():
    x, y = regression_data()
    _, influence = ridge_influence(x, y)
    x_test, y_test = regression_data(n=4, seed=1)
    x_test[1, 0] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"test data .*-inf.* in inputs of example 1;"):
        influence.scores((x_test, y_test))


def test_nan_parameter_is_named():
    x, y = regression_data()
    model = linear()
    with torch.no_grad():
        model.weight[0, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model parameter 'weight' is not finite at entry 2"):
        TorchObjective(model, "squared_error", (x, y))


def root_abs_error(outputs, batch):
    """sqrt(|residual|): its gradient is not finite where the residual is exactly 0."""
    return (outputs - batch[1]).abs().sqrt().reshape(-1)


def test_non_finite_test_gradient_names_example_and_parameter():
    x, y = regression_data()
    model = linear()
    objective = TorchObjective(model, "squared_error", (x, y), measurement=root_abs_error, weight_decay=0.1)
    influence = InfluenceFunction(objective, DirectSolver(HessianOperator(objective)))
    x_test, y_test = regression_data(n=4, seed=1)
    with torch.no_grad():
        y_test[2] = model(x_test[2])  # residual exactly 0 at test example 2
    with pytest.raises(NonFiniteError, match=r"measurement gradient of test example 2 is not finite .* parameter 'weight' \(entry 0\)"):
        influence.scores((x_test, y_test))


def test_non_finite_training_gradient_names_example_and_parameter():
    x, y = regression_data()
    model = linear()
    with torch.no_grad():
        y[11] = model(x[11])  # residual exactly 0 at training example 11
    objective = TorchObjective(model, root_abs_error, (x, y))
    identity = DenseOperator(torch.eye(objective.dim, dtype=torch.float64))  # keeps the solve finite
    influence = InfluenceFunction(objective, DirectSolver(identity))
    with pytest.raises(NonFiniteError, match=r"training gradient of training example 11 is not finite .* parameter 'weight'"):
        influence.scores(regression_data(n=2, seed=1))


# -- solves that did not converge ----------------------------------------------------------------------------
def untrained_mlp_objective():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = regression_data(n=40)
    return TorchObjective(model, "squared_error", (x, y))


def test_cg_on_an_indefinite_hessian_raises_with_a_damping_that_works():
    objective = untrained_mlp_objective()
    smallest = float(torch.linalg.eigvalsh(objective.hessian())[0])
    assert smallest < 0  # the untrained network is not at a minimum
    test = regression_data(n=3, seed=1)
    with pytest.raises(IndefiniteCurvatureError) as caught:
        InfluenceFunction(objective, CGSolver(HessianOperator(objective))).scores(test)
    error = caught.value
    assert isinstance(error, NotPositiveDefiniteError) and isinstance(error, UnconvergedSolveError)
    assert "negative curvature" in str(error) and "\n" not in str(error)
    torch.testing.assert_close(error.smallest, smallest, rtol=1e-6, atol=1e-9)  # p = 31 < 60 Lanczos steps: exact
    assert smallest + error.suggested_damping > 0
    assert f"damping={error.suggested_damping:.3g}" in str(error)
    damping = float(re.search(r"damping=([0-9.e+-]+)", str(error)).group(1))
    solver = CGSolver(HessianOperator(objective), damping=damping)
    scores = InfluenceFunction(objective, solver).scores(test)  # the suggested damping makes it solvable
    assert bool(scores.inverse_hvp.info["converged"].all())


def test_allow_unconverged_warns_instead():
    objective = untrained_mlp_objective()
    influence = InfluenceFunction(objective, CGSolver(HessianOperator(objective)), allow_unconverged=True)
    with pytest.warns(UnconvergedSolveWarning, match="negative curvature"):
        scores = influence.scores(regression_data(n=3, seed=1))
    assert not bool(scores.inverse_hvp.info["converged"].all())


def test_cg_stopped_at_maxiter_raises_with_a_maxiter_that_works():
    x, y = regression_data(n=50, d=6)
    x[:, 0] *= 30.0  # condition number ~ 1e3
    objective = TorchObjective(linear(6), "squared_error", (x, y), weight_decay=1e-3)
    test = regression_data(n=2, d=6, seed=1)
    with pytest.raises(UnconvergedSolveError, match=r"did not converge on 2 of 2 .*maxiter=2 ") as caught:
        InfluenceFunction(objective, CGSolver(HessianOperator(objective), maxiter=2)).influence_on_params([0, 1])
    assert not isinstance(caught.value, IndefiniteCurvatureError)
    maxiter = int(re.search(r"pass maxiter=(\d+)", str(caught.value)).group(1))
    solver = CGSolver(HessianOperator(objective), maxiter=maxiter)
    assert bool(InfluenceFunction(objective, solver).inverse_hvp_of_test(test).info["converged"].all())


# -- data order ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sampler",
    [SubsetRandomSampler(range(20)), WeightedRandomSampler(torch.ones(20), 20)],
    ids=["subset", "weighted"],
)
def test_non_sequential_samplers_are_refused(sampler):
    x, y = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, sampler=sampler)
    with pytest.raises(NonSequentialSamplerError, match=rf"{type(sampler).__name__} does not read .*shuffle=False"):
        TorchObjective(linear(), "squared_error", loader)


def test_custom_batch_sampler_is_refused_and_sequential_accepted():
    x, y = regression_data()
    dataset = TensorDataset(x, y)
    reversed_batches = [list(range(i, min(i + 5, 20)))[::-1] for i in range(0, 20, 5)]
    with pytest.raises(NonSequentialSamplerError, match="list does not read"):
        TorchObjective(linear(), "squared_error", DataLoader(dataset, batch_sampler=reversed_batches))
    sequential = DataLoader(dataset, batch_size=6, sampler=torch.utils.data.SequentialSampler(dataset))
    loaded = TorchObjective(linear(), "squared_error", sequential)
    assert loaded.objective_value() == pytest.approx(TorchObjective(linear(), "squared_error", (x, y)).objective_value(), rel=1e-12)


class NoisyDataset(Dataset):
    """Random augmentation: fresh noise on every read."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def test_batches_that_change_between_passes_are_refused_on_the_second_pass():
    x, y = regression_data()
    objective = TorchObjective(linear(), "squared_error", DataLoader(NoisyDataset(x, y), batch_size=8))
    with pytest.raises(NondeterministicDataError, match=r"batch 0 \(from example 0\) of the training data differs"):
        objective.objective_value()


# -- empty data, labels, train mode ---------------------------------------------------------------------------
def test_empty_training_and_test_data():
    x, y = regression_data()
    with pytest.raises(EmptyDataError, match="training data has no examples"):
        TorchObjective(linear(), "squared_error", (x[:0], y[:0]))
    _, influence = ridge_influence(x, y)
    with pytest.raises(EmptyDataError, match="test data has no examples"):
        influence.scores((x[:0], y[:0]))


def test_training_label_out_of_range_names_index_and_value():
    x, labels = classification_data()
    labels[5] = 3
    model = nn.Linear(4, 3).double()
    objective = TorchObjective(model, "cross_entropy", (x, labels), chunk_size=8)
    with pytest.raises(LabelRangeError, match=r"training data has label 3 at example 5, outside the 3 classes .*0\.\.2"):
        objective.objective_value()


def test_negative_test_label_is_refused_not_ignored():
    x, labels = classification_data()
    objective = TorchObjective(nn.Linear(4, 3).double(), "cross_entropy", (x, labels), weight_decay=0.1)
    influence = InfluenceFunction(objective, DirectSolver(HessianOperator(objective)))
    test_x, test_labels = classification_data(n=4, seed=1)
    test_labels[2] = -100  # cross_entropy's ignore_index: would score as loss 0
    with pytest.raises(LabelRangeError, match="test data has label -100 at example 2"):
        influence.scores((test_x, test_labels))


def test_train_mode_with_dropout_or_batch_norm_is_refused_unless_allowed():
    x, y = regression_data()
    for layer in (nn.Dropout(0.5), nn.BatchNorm1d(3)):
        model = nn.Sequential(nn.Linear(3, 3), layer, nn.Linear(3, 1)).double()
        with pytest.raises(TrainModeError, match=rf"module '1' \({type(layer).__name__}\) is in train mode.*model.eval\(\)"):
            TorchObjective(model, "squared_error", (x, y))
        TorchObjective(model, "squared_error", (x, y), allow_train_mode=True)
        TorchObjective(model.eval(), "squared_error", (x, y))
    plain = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).double().train()
    TorchObjective(plain, "squared_error", (x, y))  # train mode without random modules is fine


# -- dtypes ----------------------------------------------------------------------------------------------------
def test_float64_data_with_a_float32_model_is_cast_with_one_warning():
    x, y = regression_data()
    model = linear(dtype=torch.float32)
    with pytest.warns(DtypeCastWarning, match=r"inputs of the training data is torch.float64 .*model.double\(\)") as record:
        objective = TorchObjective(model, "squared_error", (x, y))
        value = objective.objective_value()
        objective.objective_value()
    assert len(record) == 1
    cast = TorchObjective(model, "squared_error", (x.float(), y.float()))
    assert objective.dtype == torch.float32
    assert value == cast.objective_value()  # the same numbers as casting the data by hand


def test_float32_data_with_a_float64_model_computes_in_float64_silently():
    x, y = regression_data(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective = TorchObjective(linear(), "squared_error", (x, y))
        gradient = objective.objective_gradient()
    assert gradient.dtype == torch.float64
    torch.testing.assert_close(gradient, TorchObjective(linear(), "squared_error", (x.double(), y.double())).objective_gradient())


def test_mixed_parameter_dtypes_are_refused():
    x, y = regression_data()
    model = nn.Sequential(nn.Linear(3, 3).double(), nn.Linear(3, 1).float())
    with pytest.raises(DtypeError, match=r"mix dtypes .*model.double\(\)"):
        TorchObjective(model, "squared_error", (x, y))


def test_every_input_error_is_a_value_error():
    for error in (NonFiniteError, EmptyDataError, LabelRangeError, TrainModeError, DtypeError, NonSequentialSamplerError,
                  NondeterministicDataError, UnconvergedSolveError, IndefiniteCurvatureError):
        assert issubclass(error, InfluenceInputError) and issubclass(error, ValueError)


def test_softmax_regression_objective_checks_its_data():
    from influencekit import SoftmaxRegressionObjective

    x, labels = classification_data()
    weights = torch.zeros(3, 4, dtype=torch.float64)
    bad_x = x.clone()
    bad_x[4, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="training data .* inputs of example 4"):
        SoftmaxRegressionObjective(weights, bad_x, labels, 0.1)
    labels[9] = 7
    with pytest.raises(LabelRangeError, match="label 7 at example 9, outside the 3 classes"):
        SoftmaxRegressionObjective(weights, x, labels, 0.1)
    with pytest.raises(EmptyDataError, match="training data has no examples"):
        SoftmaxRegressionObjective(weights, x[:0], labels[:0], 0.1)


def test_finite_values_whose_sum_overflows_are_accepted():
    x, y = regression_data()
    x[3, 0] = x[4, 0] = 1e308  # the sum overflows to inf; every value is finite
    TorchObjective(linear(), "squared_error", (x, y))


def test_block_diagonal_solve_names_the_indefinite_block_and_its_damping():
    from influencekit.curvature.block_diagonal import blocks_per_module
    from influencekit.solvers import BlockDiagonalSolver

    objective = untrained_mlp_objective()
    blocks = blocks_per_module(objective.model, objective.space)
    solver = BlockDiagonalSolver(HessianOperator(objective), blocks=blocks, make_solver=lambda op, name: CGSolver(op))
    with pytest.raises(IndefiniteCurvatureError, match=r"negative curvature in block '(\w+)'") as caught:
        InfluenceFunction(objective, solver).scores(regression_data(n=3, seed=1))
    name = re.search(r"in block '(\w+)'", str(caught.value)).group(1)
    index = blocks[name]
    block_smallest = float(torch.linalg.eigvalsh(objective.hessian()[index][:, index])[0])
    torch.testing.assert_close(caught.value.smallest, block_smallest, rtol=1e-6, atol=1e-9)
    assert block_smallest < 0 < block_smallest + caught.value.suggested_damping
