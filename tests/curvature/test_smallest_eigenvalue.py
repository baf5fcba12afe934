"""Matrix-free smallest eigenvalue (ARPACK Lanczos on Hessian-vector products) against an explicit eigendecomposition."""

import torch
from torch import nn

from influencekit.curvature import DenseOperator, HessianOperator
from influencekit.curvature.spectrum import smallest_eigenvalue
from influencekit.objectives.torch_objective import TorchObjective


def test_smallest_eigenvalue_of_an_indefinite_hessian_by_hvps_matches_eigvalsh(single_thread):
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()  # untrained: H is indefinite
    objective = TorchObjective(model, "cross_entropy", (x, y), weight_decay=1e-3)
    eigenvalues = torch.linalg.eigvalsh(objective.hessian())
    assert eigenvalues[0] < 0  # the case the diagnostic is for
    estimate = smallest_eigenvalue(HessianOperator(objective))
    assert estimate.converged and 0 < estimate.matvecs
    assert abs(estimate.smallest - float(eigenvalues[0])) <= 1e-8 * float(eigenvalues.abs().max())
    assert estimate.damping_needed == -estimate.smallest  # H + lambda I is positive definite for lambda above it


def test_damping_needed_is_zero_for_a_positive_definite_matrix():
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    eigenvalues = torch.linspace(0.5, 4.0, 30, dtype=torch.float64)
    estimate = smallest_eigenvalue(DenseOperator(q @ torch.diag(eigenvalues) @ q.T))
    assert abs(estimate.smallest - 0.5) <= 1e-9 and estimate.damping_needed == 0.0
