"""The training objective at fixed parameters, as the rest of the library uses it.

An :class:`Objective` is the single interface between a model family and the
influence machinery (curvature operators, solvers, scores). With ``theta`` the
flat vector of the p attributed parameters, ``l_i`` the per-example training
loss and ``lambda`` the L2 weight decay, the training objective is

    R(theta) = (1/n) sum_i l_i(theta) + (lambda / 2) ||theta||^2 .

Following Koh & Liang (2017), the *training gradient* of example i is that of
its total loss ``L_total(z_i) = l_i + (lambda/2)||theta||^2``, i.e.
``grad l_i + lambda theta``, so that the training gradients average to grad R.
The Hessian is that of R. A *measurement* m(z, theta) (default: the training
loss without the L2 term) defines test gradients.

Two implementations exist: :class:`influencekit.objectives.TorchObjective`
(any ``nn.Module``, via ``torch.func``) and
:class:`influencekit.objectives.SoftmaxRegressionObjective`
(closed forms for multinomial logistic regression, tested against the generic
path).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from influencekit.data import Batch


@runtime_checkable
class Objective(Protocol):
    """A regularised empirical risk R at fixed parameters theta (shape (p,))."""

    n_train: int
    weight_decay: float

    @property
    def dim(self) -> int:
        """Number p of attributed parameters."""

    @property
    def dtype(self) -> torch.dtype: ...

    def parameters_vector(self) -> Tensor:
        """theta, shape (p,)."""

    def objective_value(self) -> float:
        """R(theta)."""

    def objective_gradient(self) -> Tensor:
        """grad R(theta), shape (p,)."""

    def train_gradients(self, indices: Tensor) -> Tensor:
        """Training gradients grad l_i + lambda theta for ``indices``, shape (len(indices), p)."""

    def train_gradient_dots(self, directions: Tensor) -> Tensor:
        """<grad l_i + lambda theta, v_j> for every training example i and direction j.

        Args:
            directions: V, shape (k, p).
        Returns:
            shape (k, n_train).
        """

    def measurement_gradients(self, batch: Batch) -> Tensor:
        """Gradients of the measurement for each example of ``batch``, shape (m, p)."""

    def measurement_values(self, batch: Batch) -> Tensor:
        """The measurement for each example of ``batch``, shape (m,)."""

    def hvp(self, vectors: Tensor) -> Tensor:
        """Hessian of R times each row of ``vectors`` (k, p) -> (k, p), over all data."""

    def sampled_hvp(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Mini-batch Hessian-vector products, one mini-batch per vector or one for all.

        Row j of the result is (H_{B_j} + lambda I) v_j where
        H_{B_j} = (1/B) sum_{i in B_j} hess l_i and B_j = ``indices[j]``.

        Args:
            indices: training indices, shape (k, B); or (g, B) with g dividing k, each
                mini-batch shared by k / g consecutive rows ((B,): one for all; see
                :func:`influencekit.linalg.check_mini_batches`).
            vectors: shape (k, p).
        """

    def hessian(self) -> Tensor:
        """The explicit Hessian of R, shape (p, p). Only for small p."""
