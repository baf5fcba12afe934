"""The Hessian of the regularised training objective."""

from __future__ import annotations

from torch import Tensor

from influencekit.curvature.base import CurvatureOperator
from influencekit.linalg import symmetrize_
from influencekit.objectives.base import Objective


class HessianOperator(CurvatureOperator):
    """H = (1/n) sum_i hess l_i(theta) + lambda I of an :class:`Objective`.

    ``matvec`` sweeps the full training set; ``sampled_matvec`` gives the
    mini-batch estimate (H_B + lambda I) v used by stochastic solvers (LiSSA).
    """

    def __init__(self, objective: Objective):
        self.objective = objective
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.n_train = objective.n_train

    def matvec(self, vectors: Tensor) -> Tensor:
        return self.objective.hvp(vectors)

    def sampled_matvec(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Rows (H_{B_j} + lambda I) v_j with B_j = indices[j]; indices (k, B), or (g, B) shared by groups of k / g rows."""
        return self.objective.sampled_hvp(indices, vectors)

    def to_dense(self, block: int = 512) -> Tensor:
        return symmetrize_(self.objective.hessian())
