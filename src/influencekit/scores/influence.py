"""Influence scores: which training points move a test measurement, and by how much.

Sign and scale conventions (Koh & Liang 2017), with n training points,
H the Hessian of the regularised objective R (plus any solver damping),
g_test = grad m(z_test) the gradient of the measurement at a test point and
g_i = grad l(z_i) + lambda theta the training gradient of z_i:

* ``influence_on_loss``  I_up,loss(z_i, z_test) = - g_test^T H^{-1} g_i.
  The derivative of m(z_test) when z_i is up-weighted by eps in the
  objective (1/n) sum l + eps l(z_i). Negative: up-weighting z_i lowers the
  test loss (z_i is *helpful*); positive: *harmful*.
* ``predicted_loss_change`` = -(1/n) I_up,loss = (1/n) g_test^T H^{-1} g_i:
  the first-order change m(z_test; theta_{-i}) - m(z_test; theta) when z_i
  is *removed* and the model refit. Positive: removing z_i raises the test loss.
* ``influence_on_params`` I_up,params(z_i) = - H^{-1} g_i (shape (p,)).

Other libraries often report <H^{-1} g_test, g_i> (no minus sign) or divide by n;
``influence_on_loss`` is neither.

Worked example (tested): ridge regression with one feature, objective
(1/n) sum 0.5 (w x_i - y_i)^2 + (lambda/2) w^2, so H = mean(x^2) + lambda and
g_i = (w x_i - y_i) x_i + lambda w. For a test point, I_up,loss(z_i) =
-g_test g_i / H.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from influencekit.checks import check_finite_batch, check_finite_rows, check_not_empty
from influencekit.data import Batch, batch_size
from influencekit.errors import NonFiniteError
from influencekit.objectives.base import Objective
from influencekit.solvers.base import SolveResult, Solver
from influencekit.solvers.convergence import check_solve


@dataclass(frozen=True)
class TopK:
    """The k most helpful and most harmful training points for each test point.

    ``helpful_*``: most negative I_up,loss first (removing them raises the test loss most).
    ``harmful_*``: most positive I_up,loss first. All shapes (m, k).
    """

    helpful_indices: Tensor
    helpful_influence: Tensor
    harmful_indices: Tensor
    harmful_influence: Tensor


@dataclass
class InfluenceScores:
    """I_up,loss of every training point on each test point.

    Attributes:
        influence_on_loss: I_up,loss, shape (m_test, n_train).
        n_train: n.
        inverse_hvp: the solve of H^{-1} g_test (its rows are s_test), with residuals.
        test_measurements: m(z_test) at theta, shape (m_test,).
    """

    influence_on_loss: Tensor
    n_train: int
    inverse_hvp: SolveResult
    test_measurements: Tensor

    @property
    def predicted_loss_change(self) -> Tensor:
        """-(1/n) I_up,loss: predicted m(z_test; theta_{-i}) - m(z_test; theta), shape (m, n)."""
        return -self.influence_on_loss / self.n_train

    def top_k(self, k: int) -> TopK:
        k = min(k, self.n_train)
        helpful = torch.topk(self.influence_on_loss, k, dim=1, largest=False)
        harmful = torch.topk(self.influence_on_loss, k, dim=1, largest=True)
        return TopK(helpful.indices, helpful.values, harmful.indices, harmful.values)

    def most_influential(self, k: int) -> Tensor:
        """Indices of the k largest |I_up,loss| per test point, shape (m, k)."""
        return torch.topk(self.influence_on_loss.abs(), min(k, self.n_train), dim=1).indices


class InfluenceFunction:
    """Influence of training points through an :class:`Objective` and an iHVP solver.

    Every solve goes through one check (:func:`~influencekit.solvers.convergence.check_solve`):
    a non-finite solution raises :class:`~influencekit.errors.NonFiniteError`; an iterative
    solve that reports an unconverged row raises
    :class:`~influencekit.solvers.convergence.IndefiniteCurvatureError` (negative curvature,
    naming a damping that fixes it) or :class:`~influencekit.errors.UnconvergedSolveError`,
    or only warns with ``allow_unconverged=True``. Test batches must be non-empty and
    finite, and so must the test and training gradients (errors name the example and
    parameter).

    Args:
        objective: the training objective at the trained parameters.
        solver: solves (H + damping) x = b for blocks of right-hand sides.
        allow_unconverged: accept unconverged iterative solves with a warning.
    """

    def __init__(self, objective: Objective, solver: Solver, *, allow_unconverged: bool = False):
        self.objective = objective
        self.solver = solver
        self.allow_unconverged = allow_unconverged

    def _solve(self, rhs: Tensor) -> SolveResult:
        result = self.solver.solve(rhs)
        check_solve(self.solver, rhs, result, allow_unconverged=self.allow_unconverged)
        return result

    def inverse_hvp_of_test(self, test_batch: Batch) -> SolveResult:
        """s_test = H^{-1} grad m(z_test) for every test example (rows, shape (m, p))."""
        check_not_empty(batch_size(test_batch), "test data")
        check_finite_batch(test_batch, "test data")
        grads = self.objective.measurement_gradients(test_batch)
        check_finite_rows(grads, "measurement gradient", "test example", getattr(self.objective, "space", None))
        return self._solve(grads)

    def scores(self, test_batch: Batch) -> InfluenceScores:
        """I_up,loss of all training points on every example of ``test_batch``."""
        solve = self.inverse_hvp_of_test(test_batch)
        dots = self.objective.train_gradient_dots(solve.solution)
        self._check_training_dots(dots)
        return InfluenceScores(-dots, self.objective.n_train, solve, self.objective.measurement_values(test_batch))

    def _check_training_dots(self, dots: Tensor) -> None:
        """Name the first training example (and parameter) whose gradient makes a score non-finite."""
        bad = ~torch.isfinite(dots)
        if bool(bad.any()):
            example = int(bad.any(dim=0).nonzero()[0])
            gradient = self.objective.train_gradients(torch.tensor([example]))
            space = getattr(self.objective, "space", None)
            check_finite_rows(gradient, "training gradient", "training example", space, example)
            raise NonFiniteError(
                f"the influence of training example {example} is not finite although its gradient is: the product "
                "with s_test overflows; compute in float64 (model.double()) or add damping"
            )

    def influence_on_params(self, train_indices: Sequence[int] | Tensor) -> Tensor:
        """I_up,params = -H^{-1} g_i for each index, shape (k, p)."""
        grads = self.objective.train_gradients(torch.as_tensor(train_indices))
        return -self._solve(grads).solution

    def self_influence(self, train_indices: Sequence[int] | Tensor) -> Tensor:
        """I_up,loss(z_i, z_i) = -grad l(z_i)^T H^{-1} g_i for each index, shape (k,).

        Non-positive when H is positive definite and lambda = 0; its magnitude
        is the usual "self-influence" used to find mislabelled examples.
        """
        indices = torch.as_tensor(train_indices)
        grads = self.objective.train_gradients(indices)
        loss_grads = grads - self.objective.weight_decay * self.objective.parameters_vector()
        return -(loss_grads * self._solve(grads).solution).sum(dim=1)
