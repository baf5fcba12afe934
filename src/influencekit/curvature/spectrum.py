"""Eigen-spectrum diagnostics of a curvature matrix."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator


@dataclass(frozen=True)
class SpectrumSummary:
    """Summary of the eigenvalues of a symmetric matrix.

    ``zero`` counts |eigenvalue| <= ``zero_tolerance`` (p * eps * max|eigenvalue|);
    ``negative`` and ``between_zero_and_one`` exclude those; ``at_least_one``
    counts eigenvalues >= 1. ``condition_number`` is max/min when min > 0,
    else infinity.
    """

    min: float
    max: float
    condition_number: float
    negative: int
    zero: int
    between_zero_and_one: int
    at_least_one: int
    zero_tolerance: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def table(self) -> str:
        """The counts as a Markdown table, like the one in Koh & Liang reproductions."""
        return (
            "| eig < 0 | eig = 0 | 0 < eig < 1 | eig >= 1 | min | max | condition |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {self.negative} | {self.zero} | {self.between_zero_and_one} | {self.at_least_one} "
            f"| {self.min:.4g} | {self.max:.4g} | {self.condition_number:.4g} |"
        )


def spectrum_summary(eigenvalues: Tensor) -> SpectrumSummary:
    eig = eigenvalues.detach().to(torch.float64).cpu()
    scale = float(eig.abs().max())
    tol = eig.numel() * float(torch.finfo(eigenvalues.dtype).eps) * scale
    lo, hi = float(eig.min()), float(eig.max())
    return SpectrumSummary(
        min=lo,
        max=hi,
        condition_number=hi / lo if lo > tol else float("inf"),
        negative=int((eig < -tol).sum()),
        zero=int((eig.abs() <= tol).sum()),
        between_zero_and_one=int(((eig > tol) & (eig < 1)).sum()),
        at_least_one=int((eig >= 1).sum()),
        zero_tolerance=tol,
    )


def lanczos_ritz_values(operator: CurvatureOperator, steps: int = 80, seed: int = 0) -> Tensor:
    """Ritz values of ``steps`` Lanczos iterations (full re-orthogonalisation), ascending.

    The extreme Ritz values converge to the extreme eigenvalues from inside the
    spectrum, fast even where the ends of the spectrum are tight clusters (where
    eigen*vector* solvers such as ARPACK stall).
    """
    gen = torch.Generator().manual_seed(seed)
    steps = min(steps, operator.dim)
    basis = torch.zeros(steps, operator.dim, dtype=operator.dtype)
    q = torch.randn(operator.dim, generator=gen, dtype=operator.dtype)
    basis[0] = q / q.norm()
    alphas, betas = [], []
    for j in range(steps):
        w = operator.matvec(basis[j : j + 1])[0]
        alphas.append(float(basis[j] @ w))
        w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if j + 1 == steps or beta < 1e-12 * abs(alphas[-1]):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
    tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(tridiagonal)


def extreme_eigenvalues(
    operator: CurvatureOperator, inverse: CurvatureOperator | None = None, steps: int = 80, seed: int = 0
) -> tuple[float, float]:
    """Smallest and largest eigenvalue of a symmetric operator by Lanczos, matrix-free.

    With ``inverse`` (an operator applying M^{-1}, M positive definite) the
    smallest eigenvalue is 1 / the largest of M^{-1}, which converges in a few
    steps even when the bottom of the spectrum is clustered.
    """
    ritz = lanczos_ritz_values(operator, steps, seed)
    if inverse is not None:
        return 1.0 / float(lanczos_ritz_values(inverse, steps, seed)[-1]), float(ritz[-1])
    return float(ritz[0]), float(ritz[-1])


@dataclass(frozen=True)
class LanczosEstimate:
    """The smallest eigenvalue of a symmetric operator by ARPACK's Lanczos, and what it cost.

    Attributes:
        smallest: the estimate of lambda_min.
        damping_needed: max(0, -smallest): H + lambda I is positive definite for every lambda > damping_needed.
        matvecs: operator products used.
        seconds: wall time.
        converged: ARPACK met ``tol``; False: ``smallest`` is the best Ritz value it had
            (from inside the spectrum, so it errs towards larger values).
    """

    smallest: float
    damping_needed: float
    matvecs: int
    seconds: float
    converged: bool


def smallest_eigenvalue(
    operator: CurvatureOperator, *, tol: float = 1e-6, maxiter: int = 30, ncv: int | None = None, seed: int = 0
) -> LanczosEstimate:
    """lambda_min of a symmetric operator, matrix-free: ``scipy.sparse.linalg.eigsh(which="SA")`` on its ``matvec``.

    ``damping_needed`` = max(0, -lambda_min) is the damping that makes M + lambda I positive
    definite (any lambda above it): the number to quote when a non-convex model's curvature is
    indefinite. Costs ``matvecs`` products (a Hessian-vector product each for a
    :class:`~influencekit.curvature.HessianOperator`); no p x p matrix is formed.

    Args:
        operator: symmetric (p, p) operator (``dim``, ``dtype``, ``matvec`` on (k, p) blocks).
        tol: ARPACK's relative accuracy of the eigenvalue.
        maxiter: ARPACK restarts (at most ``maxiter * ncv`` products); ncv: Lanczos vectors (default min(p, 64)).
            Where the bottom of the spectrum is a tight cluster (weight decay on directions the data do not
            reach: many eigenvalues equal to it) ARPACK stalls; the estimate is then the smallest Ritz value of
            80 fully re-orthogonalised Lanczos steps (:func:`lanczos_ritz_values`), ``converged`` False.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    start = time.perf_counter()
    p = operator.dim
    count = 0

    def matmat(block: np.ndarray) -> np.ndarray:
        nonlocal count
        vectors = torch.as_tensor(np.asarray(block, dtype=np.float64).reshape(p, -1).T.copy(), dtype=operator.dtype)
        count += vectors.shape[0]
        return operator.matvec(vectors).to(torch.float64).numpy().T

    linear = LinearOperator((p, p), matvec=matmat, matmat=matmat, dtype=np.float64)
    start_vector = np.random.default_rng(seed).standard_normal(p)
    if p < 3:  # too small for ARPACK: the dense eigenvalues of the operator's matrix
        value, converged = float(np.linalg.eigvalsh(matmat(np.eye(p)))[0]), True
    else:
        try:
            value = float(eigsh(linear, k=1, which="SA", tol=tol, maxiter=maxiter, ncv=ncv or min(p, 64), v0=start_vector,
                                return_eigenvectors=False)[0])
            converged = True
        except ArpackNoConvergence as error:
            found = [float(v) for v in error.eigenvalues]
            value = min(found + [float(lanczos_ritz_values(operator, min(p, 80), seed)[0])])
            converged = False
    return LanczosEstimate(value, max(0.0, -value), count, time.perf_counter() - start, converged)
