"""The linear-operator interface every curvature kind implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from influencekit.linalg import check_directions, symmetrize_


class CurvatureOperator(ABC):
    """A symmetric p x p matrix M known through products with blocks of vectors.

    ``matvec(V)`` takes V of shape (k, p) and returns rows (M v_j), shape (k, p).
    """

    dim: int
    dtype: torch.dtype

    @abstractmethod
    def matvec(self, vectors: Tensor) -> Tensor: ...

    def to_dense(self, block: int = 512) -> Tensor:
        """The explicit matrix (p, p), from products with ``block`` unit vectors at a time."""
        eye = torch.eye(self.dim, dtype=self.dtype)
        dense = torch.cat([self.matvec(eye[i : i + block]) for i in range(0, self.dim, block)])
        return symmetrize_(dense)

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors)


class DenseOperator(CurvatureOperator):
    """A curvature operator from an explicit symmetric matrix (p, p)."""

    def __init__(self, matrix: Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype

    def matvec(self, vectors: Tensor) -> Tensor:
        return check_directions(vectors, self.dim) @ self.matrix  # M symmetric: (M v)^T = v^T M

    def to_dense(self, block: int = 512) -> Tensor:
        return self.matrix
