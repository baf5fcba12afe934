"""Linear-algebra plumbing: blocks of vectors, and dense kernels routed to the faster BLAS.

:func:`check_directions` validates the (k, p) blocks of row vectors every operator and
solver takes.

PyTorch's CPU wheels call MKL, numpy and SciPy call OpenBLAS. On the AMD EPYC
machines this project is developed and tested on, OpenBLAS runs a float64 GEMM
of W1's shape (55,000 x 784 times 784 x 500) at 29 GFLOP/s per core against
MKL's 20, and a Cholesky solve with 50 right-hand sides in 0.30 s against
0.54 s (``benchmarks/RESULTS.md``). The closed-form paths (softmax regression,
its exact leave-one-out refits, the direct solver) use these two functions for
their large products; autograd paths stay in torch. Results are tensors that
share memory with the numpy outputs; inputs are never modified, except by the
in-place :func:`symmetrize_` and :class:`PackedCholesky`, which take the matrix over
so that a p x p matrix never needs a second copy.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor


def _numpy_view(tensor: Tensor) -> np.ndarray | None:
    if tensor.device.type != "cpu" or tensor.requires_grad or tensor.dtype not in (torch.float64, torch.float32):
        return None
    return tensor.numpy()


def transposed_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^T b for a (K, M), b (K, N) -> (M, N), computed as (b^T a)^T (a transposed view of the result).

    The same product, but OpenBLAS runs the second form far faster when M is small and
    K large: the gradient of a softmax regression, M = C = 10, K = n = 5,000, N = d = 784,
    takes 0.016 s against 0.34 s (2 cores); M = 100: 0.043 s against 0.25 s; and at
    M = 5,000, K = 1,024 still 0.39 s against 0.50 s.
    """
    return (b.T @ a).T


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors (m, k) x (k, n) -> (m, n), through OpenBLAS when both are plain CPU floats.

    When ``a`` is the transpose of a row-major array (``x.T``), :func:`transposed_product`.
    """
    a_np, b_np = _numpy_view(a), _numpy_view(b)
    if a_np is None or b_np is None or a.dtype != b.dtype or a.dim() != 2 or b.dim() != 2:
        return a @ b
    if a_np.T.flags.c_contiguous and not a_np.flags.c_contiguous:
        return torch.from_numpy(transposed_product(a_np.T, b_np))
    return torch.from_numpy(a_np @ b_np)


def cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """Rows x_j = (L L^T)^{-1} b_j for a lower Cholesky factor L (p, p) and rhs rows b_j (k, p) -> (k, p).

    LAPACK's potrs on whichever triangle is Fortran-ordered in memory (no copy
    of the factor): L itself, or L^T when L is stored row-major.
    """
    factor_np, rhs_np = _numpy_view(factor), _numpy_view(rhs)
    if factor_np is None or rhs_np is None or factor.dtype != rhs.dtype:
        y = torch.linalg.solve_triangular(factor, rhs.T, upper=False)
        return torch.linalg.solve_triangular(factor.T, y, upper=True).T
    if factor_np.flags.f_contiguous:
        triangle, lower = factor_np, True
    else:
        triangle, lower = np.asfortranarray(factor_np.T), False
    solution = scipy.linalg.cho_solve((triangle, lower), rhs_np.T, check_finite=False)
    return torch.from_numpy(np.ascontiguousarray(solution.T))


def check_directions(directions: Tensor, dim: int, name: str = "vectors") -> Tensor:
    """Validate a block of vectors, returning it as a 2-D tensor (k, p)."""
    if directions.dim() == 1:
        directions = directions.unsqueeze(0)
    if directions.dim() != 2 or directions.shape[1] != dim:
        raise ValueError(f"{name} must have shape (k, {dim}), got {tuple(directions.shape)}")
    return directions


def check_mini_batches(indices: Tensor, k: int, *, expand: bool = True) -> Tensor:
    """Validate the mini-batch indices of a product with k vectors (``sampled_matvec``).

    ``indices`` is (g, B) with g dividing k: consecutive groups of k / g rows share a
    mini-batch, row j uses indices[j // (k / g)]. g = k: one mini-batch per row;
    g = 1, or a 1-D (B,): one for every row (LiSSA with T repeats passes g = T).
    Returns (g, B) long; with ``expand``, (k, B) (row j's own batch), for
    implementations that gather a batch per row anyway.
    """
    indices = torch.as_tensor(indices).long()
    if indices.dim() == 1:
        indices = indices.unsqueeze(0)
    if indices.dim() != 2 or indices.shape[0] == 0 or k % indices.shape[0] or indices.shape[1] == 0:
        raise ValueError(f"need mini-batch indices of shape (g, B) with g dividing k = {k} (or (B,)) and B >= 1, "
                         f"got {tuple(indices.shape)}")
    return indices.repeat_interleave(k // indices.shape[0], dim=0) if expand else indices


def symmetrize_(matrix: Tensor, block: int = 1024) -> Tensor:
    """Replace a square matrix by (M + M^T) / 2 in place, ``block`` x ``block`` tiles at a time; returns it.

    Curvatures built from products with unit vectors are symmetric only up to
    round-off; this removes the asymmetry without the two p x p temporaries of
    ``0.5 * (M + M.T)``.
    """
    p = matrix.shape[0]
    for i in range(0, p, block):
        for j in range(i, p, block):
            upper, lower = matrix[i : i + block, j : j + block], matrix[j : j + block, i : i + block]
            mean = 0.5 * (upper + lower.T)
            upper.copy_(mean)
            lower.copy_(mean.T)
    return matrix


class PackedCholesky:
    """A symmetric matrix M and the Cholesky factor L of M + shift I in M's own p x p memory.

    LAPACK's layout trick: the factorisation overwrites one triangle and leaves the
    other, so the row-major buffer holds L in its lower triangle and M's strict
    upper triangle above it; M's diagonal is kept apart (p numbers). Solves read
    L, products with M read the upper triangle (BLAS symm), and nothing of size
    p^2 is ever copied: half the memory of keeping M and L separately.

    Args:
        matrix: symmetric float matrix (p, p), C-contiguous; it is taken over (overwritten).
        shift: added to the diagonal before factorising (damping).

    Attributes:
        info: 0 on success, else the order k > 0 of the first leading minor of
            M + shift I that is not positive definite (the buffer is then unusable).
    """

    def __init__(self, matrix: Tensor, shift: float = 0.0):
        array = _numpy_view(matrix)
        if array is None or not array.flags.c_contiguous or matrix.shape[0] != matrix.shape[1]:
            raise ValueError("PackedCholesky needs a square, C-contiguous float32/float64 CPU matrix")
        self.buffer = matrix
        self.diagonal = matrix.diagonal().clone()
        self._lapack = scipy.linalg.get_lapack_funcs("potrf", (array,))
        self._symm = scipy.linalg.get_blas_funcs("symm", (array,))
        matrix.diagonal().add_(shift)
        # The column-major view is the same symmetric matrix; its upper factor U (U^T U) read row-major is L.
        _, self.info = self._lapack(array.T, lower=0, overwrite_a=1, clean=0)
        self.info = int(self.info)

    def solve(self, rhs: Tensor) -> Tensor:
        """Rows x_j = (M + shift I)^{-1} b_j; rhs (k, p) -> (k, p)."""
        return cholesky_solve(self.buffer, rhs)

    def matvec(self, vectors: Tensor) -> Tensor:
        """Rows M v_j (without the shift); vectors (k, p) -> (k, p)."""
        factor_diagonal = self.buffer.diagonal().clone()
        self.buffer.diagonal().copy_(self.diagonal)
        try:  # column-major view: M's triangle is the lower one
            product = self._symm(1.0, self.buffer.numpy().T, np.asfortranarray(vectors.to(self.buffer.dtype).numpy().T), side=0, lower=1)
        finally:
            self.buffer.diagonal().copy_(factor_diagonal)
        return torch.from_numpy(np.ascontiguousarray(product.T))
