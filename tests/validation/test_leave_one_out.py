"""Batched fixed-Hessian Newton refits against independent from-scratch fits."""

import pytest
import torch

from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.validation.leave_one_out import (
    SoftmaxRefitProblem,
    _loo_gradients,
    _loo_gradients_at_optimum,
    refit_leave_one_out,
    softmax_test_losses,
)


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(3)
    n, d, c, lam = 300, 12, 4, 0.05
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = (x[:, :c] + 0.8 * torch.randn(n, c, generator=generator, dtype=torch.float64)).argmax(1)
    fit = fit_softmax_regression(x, y, lam, num_classes=c, tol=1e-12)
    hessian = SoftmaxRegressionObjective(fit.weights, x, y, lam).hessian()
    return SoftmaxRefitProblem(x, y, lam, fit.weights, torch.linalg.cholesky(hessian), tol=1e-11)


def test_gradient_at_the_optimum_needs_no_data_pass(problem):
    removed = torch.tensor([0, 7, 299])
    weights = problem.optimum.expand(3, *problem.optimum.shape).clone()
    torch.testing.assert_close(
        _loo_gradients_at_optimum(problem, removed), _loo_gradients(problem, weights, removed), rtol=0, atol=1e-14
    )


def test_refits_equal_fits_from_scratch_without_the_point(problem):
    removed = [0, 5, 123, 299]
    refits = refit_leave_one_out(problem, removed)
    n = len(problem.targets)
    for result in refits:
        keep = torch.arange(n) != result["removed"]
        scratch = fit_softmax_regression(problem.inputs[keep], problem.targets[keep], problem.weight_decay,
                                          num_classes=problem.optimum.shape[0], tol=1e-12)
        assert result["gradient_norm"] <= problem.tol
        error = (result["weights"] - scratch.weights).norm() / (scratch.weights - problem.optimum).norm()
        assert error < 1e-8  # relative to how far removal moved the optimum
        losses = softmax_test_losses(torch.stack([result["weights"], scratch.weights]), problem.inputs[:5], problem.targets[:5])
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)


def test_refit_that_cannot_converge_raises(problem):
    stingy = SoftmaxRefitProblem(problem.inputs, problem.targets, problem.weight_decay, problem.optimum,
                                 problem.hessian_cholesky, tol=1e-11, max_steps=0)
    with pytest.raises(RuntimeError, match="refit"):
        refit_leave_one_out(stingy, [3])
