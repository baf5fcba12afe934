"""Curvatures of the form M = (1/n) sum_i M_i + lambda I, swept over the training data in chunks.

The shared machinery of :class:`~influencekit.curvature.ggn.GaussNewtonOperator` and
:class:`~influencekit.curvature.fisher.EmpiricalFisherOperator`: full-data products
(dividing by the true n, so batching never changes a result) and the mini-batch
products of stochastic solvers.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor
from torch.func import vmap

from influencekit.curvature.base import CurvatureOperator
from influencekit.data import Batch, reshape_leading
from influencekit.losses import cast_floats
from influencekit.linalg import check_directions, check_mini_batches
from influencekit.objectives.torch_objective import TorchObjective


class ExampleSumCurvature(CurvatureOperator):
    """A curvature M = (1/n) sum_i M_i + lambda I built from per-example terms M_i.

    Subclasses implement :meth:`summed_product`, the products (sum_{i in batch} M_i) v
    for one batch; this class sweeps the training data in the objective's chunks
    (dividing by the true n, so the batching never changes a result), adds the
    weight decay lambda and provides the mini-batch products of stochastic
    solvers.

    Args:
        objective: the training objective at the trained parameters; its
            dtype is the dtype of every product.
    """

    def __init__(self, objective: TorchObjective):
        if not isinstance(objective, TorchObjective):
            raise TypeError(
                f"{type(self).__name__} needs a TorchObjective (model outputs and a loss of the outputs), "
                f"got {type(objective).__name__}"
            )
        self.objective = objective
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.n_train = objective.n_train
        self.weight_decay = objective.weight_decay

    @abstractmethod
    def summed_product(self, batch: Batch, vectors: Tensor) -> Tensor:
        """(sum_{i in batch} M_i) v for every row v of ``vectors`` (k, p) -> (k, p); no 1/n, no lambda."""

    def matvec(self, vectors: Tensor) -> Tensor:
        """Rows (M v_j) over the full training set; vectors (k, p) -> (k, p)."""
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        total = torch.zeros_like(vectors)
        for chunk in self.objective.train.chunks():
            total += self.summed_product(cast_floats(chunk, self.dtype), vectors)
        return total / self.n_train + self.weight_decay * vectors

    def sampled_matvec(self, indices: Tensor, vectors: Tensor) -> Tensor:
        """Mini-batch products, one mini-batch per vector.

        Row j is (M_{B_j} + lambda I) v_j with M_{B_j} = (1/B) sum_{i in B_j} M_i
        and B_j = ``indices[j]`` (repeats allowed).

        Args:
            indices: training indices, shape (k, B), or (g, B) shared by groups of k / g rows
                (:func:`~influencekit.linalg.check_mini_batches`).
            vectors: shape (k, p).
        Returns:
            shape (k, p).
        """
        vectors = check_directions(vectors, self.dim).to(self.dtype)
        indices = check_mini_batches(indices, vectors.shape[0])
        k, b = indices.shape
        batches = reshape_leading(cast_floats(self.objective.train.gather(indices), self.dtype), (k, b))

        def one(batch: Batch, v: Tensor) -> Tensor:
            return self.summed_product(batch, v.unsqueeze(0))[0]

        return vmap(one)(batches, vectors) / b + self.weight_decay * vectors
