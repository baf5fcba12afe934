"""The empirical Fisher information of a :class:`~influencekit.objectives.TorchObjective`.

    F = (1/n) sum_i g_i g_i^T + lambda I ,   g_i = grad_theta l_i(theta) ,

with l_i the per-example training loss at the *observed* target and lambda the
objective's weight decay.

Choice of g_i: the per-example loss gradient WITHOUT the L2 term. The L2 term
(lambda/2)||theta||^2 contributes its exact curvature lambda I instead, as in
every curvature of this library. Using the training gradients g_i + lambda theta
would add lambda (theta gbar^T + gbar theta^T) + lambda^2 theta theta^T
(gbar = mean g_i), terms that are no curvature and depend on the scale of theta.

Naming: some libraries (e.g. pyDVL's inverse-harmonic-mean influence, after
Kwon et al. 2023) call (1/n) sum_i g_i g_i^T the "Gauss-Newton" matrix; we
don't. In this library Gauss-Newton means the generalised Gauss-Newton
J^T H_out J of :class:`~influencekit.curvature.ggn.GaussNewtonOperator`. The
GGN equals the *true* Fisher (targets drawn from the model's predictive
distribution) for cross-entropy and squared error; the empirical Fisher uses
the observed targets instead and differs from both in general. F - lambda I is
positive semi-definite of rank at most n.

Products F v = (1/n) J_l^T (J_l v) + lambda v, with J_l the (n, p) Jacobian of
the vector of per-example losses: J_l v by forward mode and J_l^T u by reverse
mode, per chunk of the training data, so per-example gradients are never
materialised.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import jvp, vjp, vmap

from influencekit.curvature.example_sum import ExampleSumCurvature
from influencekit.data import Batch


class EmpiricalFisherOperator(ExampleSumCurvature):
    """Empirical Fisher F = (1/n) sum_i g_i g_i^T + lambda I (see the module docstring).

    ``matvec`` sweeps the training set; ``sampled_matvec`` gives the mini-batch
    products (F_B + lambda I) v that LiSSA needs; ``to_dense`` builds the
    explicit (p, p) matrix (small p only).

    Args:
        objective: a :class:`~influencekit.objectives.TorchObjective`;
            g_i is the gradient of its training loss ``losses(theta, batch)``.
    """

    def summed_product(self, batch: Batch, vectors: Tensor) -> Tensor:
        theta = self.objective.parameters_vector()

        def losses_of(t: Tensor) -> Tensor:
            return self.objective.losses(t, batch)

        _, pullback = vjp(losses_of, theta)

        def one(v: Tensor) -> Tensor:
            return pullback(jvp(losses_of, (theta,), (v,))[1])[0]

        return vmap(one)(vectors)
