"""fit_to_local_optimum: the explicit Gauss-Newton matrix, and leaving a saddle point for a minimum."""

import torch
from torch import nn

from influencekit.curvature.ggn import GaussNewtonOperator
from influencekit.models.fitting import fit_to_local_optimum, gauss_newton_matrix
from influencekit.objectives.torch_objective import TorchObjective


def test_gauss_newton_matrix_matches_the_matrix_free_operator():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=0.01, chunk_size=7)  # several chunks
    expected = GaussNewtonOperator(objective).to_dense()
    torch.testing.assert_close(gauss_newton_matrix(objective), expected, rtol=0, atol=1e-14)


def test_fit_started_at_a_saddle_ends_at_a_minimum():
    # f(x) = w2 w1 x, squared error: theta = 0 has zero gradient and Hessian [[wd, -c], [-c, wd]]
    # with c = mean(x y) > wd, a saddle. Newton (or L-BFGS, or Gauss-Newton) alone stays there.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 1, generator=gen, dtype=torch.float64)
    y = 2 * x + 0.1 * torch.randn(50, 1, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.zero_()
    wd = 0.01
    start = TorchObjective(model.double(), "squared_error", (x, y), weight_decay=wd)
    assert float(start.objective_gradient().norm()) == 0.0
    assert float(torch.linalg.eigvalsh(start.hessian())[0]) < -1.0
    fit = fit_to_local_optimum(model, "squared_error", x, y, wd, tol=1e-12, adam_epochs=0, lbfgs_max_iter=5)
    assert fit.at_local_optimum and fit.negative_curvature_steps >= 1
    assert fit.gradient_norm <= 1e-12 and fit.spectrum.negative == 0 and fit.spectrum.min > 0
    w1, w2 = (float(v) for v in fit.objective.theta)
    # closed form: at a minimum |w1| = |w2|, so the L2 term is wd |u| with u = w1 w2, and
    # u minimises 0.5 mean((u x - y)^2) + wd |u|: u = (mean(x y) - wd) / mean(x^2)
    sxx, sxy = float((x * x).mean()), float((x * y).mean())
    assert abs(abs(w1) - abs(w2)) < 1e-9
    assert abs(w1 * w2 - (sxy - wd) / sxx) < 1e-9
    assert fit.objective.objective_value() < start.objective_value()
