"""The generalised Gauss-Newton matrix of a :class:`~influencekit.objectives.TorchObjective`.

With f_i(theta) the model outputs of training example i (any shape, or a pytree
of tensors), J_i = d f_i / d theta and H_out,i the Hessian of the per-example
loss l_i with respect to those outputs,

    G = (1/n) sum_i J_i^T H_out,i J_i + lambda I ,

where lambda is the objective's weight decay (the exact curvature of the L2 term
(lambda/2)||theta||^2, included exactly as in
:class:`~influencekit.curvature.hessian.HessianOperator`). G drops the term
sum_k (d l_i / d f_ik) hess f_ik of the Hessian, so it is positive
semi-definite whenever every H_out,i is (cross-entropy, squared error, any
loss convex in the outputs), and it equals the Hessian for a model linear in
theta.

Products are computed matrix-free: J v by forward mode (``torch.func.jvp``),
H_out u by forward-over-reverse on ``loss(outputs, batch)`` with respect to the
outputs (generic: no per-loss formula), and J^T w by reverse mode
(``torch.func.vjp``), vectorised over the k vectors with ``torch.func.vmap``.
The loss must be per-example (l_i depends on the outputs of example i only),
as everywhere in this library.

The sweep over the training data is :class:`~influencekit.curvature.example_sum.ExampleSumCurvature`'s.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from influencekit.curvature.example_sum import ExampleSumCurvature
from influencekit.data import Batch


class GaussNewtonOperator(ExampleSumCurvature):
    """Generalised Gauss-Newton G = (1/n) sum_i J_i^T H_out,i J_i + lambda I (see the module docstring).

    ``matvec`` sweeps the training set; ``sampled_matvec`` gives the mini-batch
    products (G_B + lambda I) v that LiSSA needs; ``to_dense`` builds the
    explicit (p, p) matrix from products with unit vectors (small p only).

    Args:
        objective: a :class:`~influencekit.objectives.TorchObjective`
            whose ``outputs(theta, batch)`` and ``loss(outputs, batch)`` define
            f_i and l_i.
    """

    def summed_product(self, batch: Batch, vectors: Tensor) -> Tensor:
        theta = self.objective.parameters_vector()

        def outputs_of(t: Tensor) -> Any:
            return self.objective.outputs(t, batch)

        def summed_loss(outputs: Any) -> Tensor:
            return self.objective.loss(outputs, batch).sum()

        outputs, pullback = vjp(outputs_of, theta)

        def one(v: Tensor) -> Tensor:
            jv = jvp(outputs_of, (theta,), (v,))[1]
            h_jv = jvp(grad(summed_loss), (outputs,), (jv,))[1]
            return pullback(h_jv)[0]

        return vmap(one)(vectors)
