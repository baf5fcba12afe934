"""Parallel s_test: LiSSA chains on Dask workers reproduce the sequential LiSSA."""

from __future__ import annotations

import pickle

import pytest
import torch
from distributed import Client

from influencekit.curvature.hessian import HessianOperator
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.cluster import local_cluster
from influencekit.solvers.parallel_lissa import ChainDivergedError, ParallelLiSSASolver
from influencekit.solvers.lissa import LiSSASolver

SETTINGS = dict(scale=6.0, damping=0.01, depth=300, batch_size=2, seed=3)


def setup_module() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def problem() -> tuple[HessianOperator, torch.Tensor]:
    """The Hessian of a fitted 3-class softmax regression (n = 200, p = 30) and two test gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(202, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (202,), generator=g)
    fit = fit_softmax_regression(x[:200], y[:200], 0.1, num_classes=3)
    objective = SoftmaxRegressionObjective(fit.weights, x[:200], y[:200], 0.1)
    return HessianOperator(objective), objective.measurement_gradients((x[200:], y[200:]))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_two_dask_workers_equal_the_sequential_solver(problem):
    curvature, rhs = problem
    sequential = LiSSASolver(curvature, repeats=4, progress=False, **SETTINGS).solve(rhs)
    parallel = ParallelLiSSASolver(curvature, repeats=4, workers=2, progress=False, **SETTINGS).solve(rhs)
    assert parallel.solution.dtype == torch.float64
    assert relative_difference(parallel.solution, sequential.solution) <= 1e-12
    tasks = parallel.info["tasks"]
    assert [(t.first_repeat, t.repeats) for t in tasks] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert all(t.worker.startswith("tcp://") and t.seconds > 0 for t in tasks)
    assert parallel.info["chain_seconds"].shape == (4,)
    assert parallel.iterations.tolist() == [4 * 300, 4 * 300]
    torch.testing.assert_close(parallel.residual_norms, sequential.residual_norms, rtol=1e-9, atol=1e-14)


def test_an_existing_client_and_blocks_of_chains(problem):
    curvature, rhs = problem
    sequential = LiSSASolver(curvature, repeats=6, progress=False, **SETTINGS).solve(rhs)
    with local_cluster(2) as cluster, Client(cluster) as client:
        for chains_per_task in (2, 3):
            solver = ParallelLiSSASolver(curvature, repeats=6, client=client, chains_per_task=chains_per_task, progress=False, **SETTINGS)
            parallel = solver.solve(rhs)
            assert relative_difference(parallel.solution, sequential.solution) <= 1e-12
            assert len(parallel.info["tasks"]) == 6 // chains_per_task
            scattered = solver._scattered
            again = solver.solve(2 * rhs)  # a second solve reuses the curvature already on the workers
            assert solver._scattered is scattered
            assert relative_difference(again.solution, 2 * sequential.solution) <= 1e-12
        assert client.status == "running"  # the solver leaves a given client open


def test_in_process_reduction_with_an_odd_number_of_chains_and_auto_scale(problem):
    curvature, rhs = problem
    settings = {**SETTINGS, "scale": "auto"}
    sequential = LiSSASolver(curvature, repeats=5, progress=False, **settings)
    parallel = ParallelLiSSASolver(curvature, repeats=5, workers=0, progress=False, **settings)
    assert parallel.scale == sequential.scale
    result = parallel.solve(rhs)
    assert relative_difference(result.solution, sequential.solve(rhs).solution) <= 1e-12
    assert {t.worker for t in result.info["tasks"]} == {"in-process"}


def test_divergence_is_reported_with_a_picklable_error(problem):
    curvature, rhs = problem
    solver = ParallelLiSSASolver(curvature, scale=0.05, depth=2000, repeats=2, batch_size=4, workers=0, progress=False)
    with pytest.raises(ChainDivergedError, match="diverged") as excinfo:
        solver.solve(rhs)
    error = pickle.loads(pickle.dumps(excinfo.value))
    assert str(error) == str(excinfo.value) and error.suggested_scale > 0.05 and error.first_repeat == 0


def test_invalid_arguments(problem):
    curvature, _ = problem
    with pytest.raises(ValueError, match="divide"):
        ParallelLiSSASolver(curvature, repeats=5, chains_per_task=2, **SETTINGS)
    with pytest.raises(ValueError, match="not both"):
        ParallelLiSSASolver(curvature, repeats=2, client=object(), scheduler_address="tcp://x:1", **SETTINGS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        ParallelLiSSASolver(curvature, repeats=2, workers=-1, **SETTINGS)
