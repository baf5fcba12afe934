"""Preconditioners for (block) conjugate gradient on (M + damping I) x = b.

Each preconditioner is fitted once from a curvature M and is a callable applying
P^{-1} to a block of row vectors, (k, p) -> (k, p), as
``CGSolver(..., preconditioner=P)`` and
``BlockCGSolver(..., preconditioner=P)`` expect. P approximates
M + damping I, so fit it with the damping the solver uses. Which to pick:
:class:`KFACPreconditioner` for a ``TorchObjective`` whose parameters sit in
``nn.Linear`` / ``nn.Conv2d`` layers (one data pass, and CG then needs about
half the iterations on MNIST logistic regression); :class:`NystromPreconditioner`
when M has a few dominant eigenvalues; :class:`JacobiPreconditioner` when M is
badly scaled coordinate-wise. Both can be saved
and loaded (safetensors + JSON, see :mod:`influencekit.persistence`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from influencekit.curvature.base import CurvatureOperator, DenseOperator
from influencekit.curvature.kfac import KFACCurvature
from influencekit.linalg import check_directions
from influencekit.persistence import load_checked, save_tensors
from influencekit.solvers.kfac import KFACSolver
from influencekit.solvers.nystrom import NystromApproximation, SavedNystrom, randomized_nystrom

class JacobiPreconditioner:
    """P = diag(M) + damping I, with diag(M) estimated or exact.

    Hutchinson / Bekas et al. (2007) estimator: with s Rademacher probes z
    (entries +-1), diag(M) ~ (1/s) sum_z z * (M z), elementwise; all probes go
    through ONE ``matvec`` with a block (s, p). The estimate is unbiased; its
    error in entry i is about ||M[i, :]|| without M_ii, divided by sqrt(s), so it
    suits diagonally dominant matrices. ``exact=True`` reads the diagonal of a
    :class:`DenseOperator`, or else takes p products with unit vectors (in
    blocks of ``block_size``): exact, and cheap when p is small.

    A preconditioner must be positive definite, but a few probes can estimate a
    non-positive diagonal entry (the exact diagonal of a positive semi-definite M
    never is). Non-positive entries of diag + damping are replaced by the mean of
    |diag + damping|, a neutral scale; ``clamped`` counts them. Small positive
    but noisy estimates are kept, so prefer ``exact`` or more probes when M is far
    from diagonally dominant.

    Args:
        curvature: the operator M (p x p).
        damping: the damping of the system CG solves.
        num_probes: s, Rademacher probes (ignored when ``exact``).
        seed: seed of the probes.
        exact: compute diag(M) exactly instead of estimating it.
        block_size: unit vectors per product when ``exact`` on a non-dense operator.
        diagonal: diag(M) computed elsewhere or earlier (shape (p,), undamped); then
            ``curvature`` may be None and nothing is estimated.

    Attributes:
        diagonal: the (estimated) diagonal of M, shape (p,), undamped and unclamped.
        inverse: the applied 1 / (clamped diagonal + damping), shape (p,).
    """

    def __init__(
        self,
        curvature: CurvatureOperator | None,
        *,
        damping: float = 0.0,
        num_probes: int = 64,
        seed: int = 0,
        exact: bool = False,
        block_size: int = 256,
        diagonal: Tensor | None = None,
    ):
        if diagonal is None and not exact and num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        start = time.perf_counter()
        self.num_probes, self.seed, self.exact = int(num_probes), int(seed), bool(exact)
        if diagonal is not None:
            if diagonal.dim() != 1:
                raise ValueError(f"diagonal must have shape (p,), got {tuple(diagonal.shape)}")
        elif curvature is None:
            raise ValueError("JacobiPreconditioner needs a curvature, or a diagonal computed elsewhere")
        elif exact:
            diagonal = self._exact_diagonal(curvature, block_size)
        else:
            generator = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (num_probes, curvature.dim), generator=generator)
            probes = (2 * signs - 1).to(curvature.dtype)
            diagonal = (probes * curvature.matvec(probes)).mean(dim=0)
        self._set_state(diagonal, float(damping))
        self.setup_seconds = time.perf_counter() - start

    @staticmethod
    def _exact_diagonal(curvature: CurvatureOperator, block_size: int) -> Tensor:
        if isinstance(curvature, DenseOperator):
            return curvature.matrix.diagonal().clone()
        eye = torch.eye(curvature.dim, dtype=curvature.dtype)
        parts = [
            (curvature.matvec(eye[i : i + block_size]) * eye[i : i + block_size]).sum(dim=1)
            for i in range(0, curvature.dim, block_size)
        ]
        return torch.cat(parts)

    @classmethod
    def from_diagonal(cls, diagonal: Tensor, damping: float = 0.0) -> JacobiPreconditioner:
        """A preconditioner from a diagonal of M computed elsewhere (shape (p,), undamped), e.g. the
        exact GGN diagonal of :meth:`~influencekit.solvers.kfac.KFACSolver.exact_diagonal`."""
        return cls(None, damping=damping, exact=True, num_probes=0, seed=0, diagonal=diagonal.detach().clone())

    def _set_state(self, diagonal: Tensor, damping: float) -> None:
        self.diagonal, self.damping, self.dim = diagonal, damping, diagonal.shape[0]
        damped = diagonal + damping
        neutral = float(damped.abs().mean())
        if not neutral > 0:
            raise ValueError("the diagonal of M + damping I is zero: a Jacobi preconditioner does not exist")
        bad = damped <= 0
        self.clamped = int(bad.sum())
        self.inverse = 1.0 / torch.where(bad, torch.full_like(damped, neutral), damped)

    def __call__(self, vectors: Tensor) -> Tensor:
        """P^{-1} V for a block V (k, p): each row divided elementwise by the damped diagonal."""
        return check_directions(vectors, self.dim) * self.inverse

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the diagonal (safetensors) and damping, num_probes, seed, exact (JSON) into ``directory``."""
        return save_tensors(
            directory,
            {"diagonal": self.diagonal},
            {"class": type(self).__name__, "damping": self.damping, "num_probes": self.num_probes,
             "seed": self.seed, "exact": self.exact, "dim": self.dim},
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], curvature: CurvatureOperator | None = None) -> JacobiPreconditioner:
        """Rebuild a saved preconditioner; ``curvature``, if given, is only checked for its dimension."""
        tensors, arguments = load_checked(directory, cls.__name__, curvature)
        return cls(None, damping=arguments["damping"], num_probes=arguments["num_probes"], seed=arguments["seed"],
                   exact=arguments["exact"], diagonal=tensors["diagonal"])


class NystromPreconditioner(SavedNystrom):
    """Randomized Nystroem preconditioner (Frangella, Tropp & Udell 2023).

    With the rank-r approximation M ~ U Lambda U^T of
    :func:`~influencekit.solvers.nystrom.randomized_nystrom` (one block product
    with r vectors), lambda_r its smallest eigenvalue and mu = damping:

        P^{-1} = (lambda_r + mu) U (Lambda + mu I)^{-1} U^T + (I - U U^T).

    P maps the top-r eigen-directions of M + mu I to about lambda_r + mu and leaves
    the rest, so preconditioned CG converges like CG on a matrix of condition
    about (lambda_r + mu) / (lambda_min + mu): effective when M has r large
    eigenvalues (fast spectral decay) and mu is not tiny. Frangella et al. suggest
    r around the effective dimension of M at mu. M must be positive semi-definite.

    Args:
        curvature: positive semi-definite operator M (p x p).
        rank: r, in [1, p].
        damping: mu, the damping of the system CG solves; lambda_r + mu must be
            positive beyond round-off (p eps (lambda_1 + mu)).
        seed: seed of the Gaussian test matrix.
        approximation: the sketch of an earlier fit (what :meth:`load` passes); then
            ``curvature`` may be None and nothing is sketched.
    """

    def __init__(
        self,
        curvature: CurvatureOperator | None,
        *,
        rank: int,
        damping: float = 0.0,
        seed: int = 0,
        approximation: NystromApproximation | None = None,
    ):
        start = time.perf_counter()
        self.rank, self.seed = int(rank), int(seed)
        if approximation is None:
            if curvature is None:
                raise ValueError("NystromPreconditioner needs a curvature to sketch, or the approximation of an earlier fit")
            approximation = randomized_nystrom(curvature, self.rank, self.seed)
        self._set_state(approximation, float(damping))
        self.setup_seconds = time.perf_counter() - start

    def _set_state(self, approximation: NystromApproximation, damping: float) -> None:
        self.approximation, self.damping = approximation, damping
        self.dim = approximation.eigenvectors.shape[0]
        eigenvalues = approximation.eigenvalues
        smallest = float(eigenvalues[-1]) + damping
        tiny = self.dim * torch.finfo(eigenvalues.dtype).eps * (float(eigenvalues[0]) + abs(damping))
        if not smallest > tiny:
            raise ValueError(
                f"lambda_r + damping = {smallest:.3g} is numerically zero: the sketch found a zero eigenvalue "
                f"(rank {self.rank} exceeds the numerical rank of M); pass damping > 0 or a smaller rank"
            )
        self._scales = smallest / (eigenvalues + damping) - 1.0  # P^{-1} = I + U diag(scales) U^T

    def __call__(self, vectors: Tensor) -> Tensor:
        """P^{-1} V for a block V (k, p), costing O(k p r)."""
        u = self.approximation.eigenvectors
        v = check_directions(vectors, self.dim)
        return v + ((v @ u) * self._scales) @ u.T


class KFACPreconditioner:
    """P = the K-FAC (or EK-FAC) approximation of M + damping I, inverted in its Kronecker eigenbasis.

    Per layer, K-FAC (Martens & Grosse 2015) approximates the layer's block of the
    Gauss-Newton matrix G by A kron S (A: second moment of the layer's inputs,
    S: of the output-gradient pseudo-samples); with A = Q_A diag(a) Q_A^T and
    S = Q_S diag(s) Q_S^T, a layer's part V (out, columns) of a vector maps to
    P^{-1} V = Q_S [(Q_S^T V Q_A) / (s a^T + lambda + damping)] Q_A^T,
    lambda the objective's weight decay (EK-FAC replaces s a^T by the exact
    second moments in that basis). Cross-layer blocks are dropped. Fitting is one
    pass over the training data plus one eigendecomposition per factor; applying
    P^{-1} costs two small matrix products per layer.

    For CG on the exact Hessian (or the GGN) of a
    :class:`~influencekit.objectives.TorchObjective`: P is positive definite when
    lambda + damping > 0, and CG then converges like CG on P^{-1/2} (M + damping I)
    P^{-1/2}, well conditioned where K-FAC is close to M (softmax regression,
    where G is the Hessian; near-optimal networks). Measured on W1 (MNIST
    logistic regression, 55,000 points, float32): 28 iterations against 58 for
    plain CG at rtol 1e-5, for a fit of 0.16 s on 10,000 examples (benchmarks/RESULTS.md).

    Args:
        objective: a ``TorchObjective`` whose attributed parameters all sit in
            supported layers (``nn.Linear``, ``nn.Conv2d``), or a
            :class:`~influencekit.curvature.kfac.KFACCurvature` (fitted here unless it is already).
        damping: the damping of the system CG solves (one number, or one per layer
            as {module name: damping}).
        eigenvalue_correction: EK-FAC instead of K-FAC (a second data pass).
        fit_examples: fit the factors on this many randomly drawn training examples
            (None: all). A preconditioner changes how fast CG converges, never what it
            converges to, so a subset suffices: on W1, factors from 10,000 of the
            55,000 examples give the same 28 iterations for a 5x cheaper fit.
        seed: seed of that draw.
        chunk_size: examples per forward/backward pass of the fit; the fit holds each
            layer's inputs for a chunk (chunk x locations x columns numbers). Larger
            chunks make fewer, larger matrix products (W1, all 55,000 examples: 0.55 s with
            4,096, 0.94 s with 1,024). These four are ignored when ``objective`` is a
            ``KFACCurvature``.

    Raises:
        SingularKFACError: lambda + damping leaves P numerically singular; the
            message names the damping to pass.
    """

    def __init__(
        self,
        objective: Any,
        *,
        damping: float | Mapping[str, float] = 0.0,
        eigenvalue_correction: bool = False,
        chunk_size: int = 4096,
        fit_examples: int | None = 10_000,
        seed: int = 0,
    ):
        start = time.perf_counter()
        if not isinstance(objective, KFACCurvature):
            objective = KFACCurvature(objective, eigenvalue_correction=eigenvalue_correction, chunk_size=chunk_size,
                                      fit_examples=fit_examples, seed=seed)
        solver = KFACSolver(objective, damping=damping, measure_residuals=False)
        if solver.approximation.factors is None:
            solver.fit()
        self.approximation, self.damping, self.dim = solver.approximation, solver.damping, solver.dim
        self._solver = solver
        solver.damped_eigenvalues()  # raises SingularKFACError, naming the damping, before any solve
        self.setup_seconds = time.perf_counter() - start

    def __call__(self, vectors: Tensor) -> Tensor:
        """P^{-1} V for a block V (k, p)."""
        return self._solver.inverse_matvec(vectors)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the Kronecker factors' eigendecompositions (safetensors) and the damping (JSON) into ``directory``."""
        return self._solver.save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], objective: Any) -> KFACPreconditioner:
        """Rebuild a saved preconditioner for ``objective`` (the same model and parameters)."""
        saved = KFACSolver.load(directory, objective)
        return cls(saved.approximation, damping=saved.damping)
