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
share memory with the numpy outputs; inputs are never modified.
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


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D tensors (m, k) x (k, n) -> (m, n), through OpenBLAS when both are plain CPU floats."""
    a_np, b_np = _numpy_view(a), _numpy_view(b)
    if a_np is None or b_np is None or a.dtype != b.dtype or a.dim() != 2 or b.dim() != 2:
        return a @ b
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
