"""Stage 4 of the data flow, inverse-Hessian-vector products: each solver solves (M + damping I) X^T = B^T
for a block B (k, p) of right-hand sides, M a curvature operator, and returns the evidence with the solution.

Every solver follows one contract (:mod:`influencekit.solvers.base`):
``Solver(curvature, *, damping=..., ..., measure_residuals=True)``, ``solve(rhs) -> SolveResult``,
``setup_seconds``, and ``save(path) -> Path`` / ``load(path, ...)`` where a fit is worth keeping.
"""

from influencekit._deprecation import alias_getattr
from influencekit.solvers.arnoldi import ArnoldiSolver
from influencekit.solvers.base import NotPositiveDefiniteError, SolveResult, Solver
from influencekit.solvers.block_cg import BlockCGSolver
from influencekit.solvers.block_diagonal import BlockDiagonalSolver
from influencekit.solvers.cg import CGSolver, KrylovSolver
from influencekit.solvers.convergence import IndefiniteCurvatureError
from influencekit.solvers.datainf import DataInfSolver
from influencekit.solvers.direct import DirectSolver
from influencekit.solvers.kfac import KFACSolver, SingularKFACError
from influencekit.solvers.lissa import LiSSADivergenceError, LiSSASettings, LiSSASolver
from influencekit.solvers.nystrom import NystromApproximation, NystromSketchSolver, randomized_nystrom
from influencekit.solvers.parallel_lissa import ChainDivergedError, ParallelLiSSASolver
from influencekit.solvers.preconditioners import JacobiPreconditioner, KFACPreconditioner, NystromPreconditioner

__all__ = [
    "ArnoldiSolver",
    "BlockCGSolver",
    "BlockDiagonalSolver",
    "CGSolver",
    "ChainDivergedError",
    "DataInfSolver",
    "DirectSolver",
    "IndefiniteCurvatureError",
    "JacobiPreconditioner",
    "KFACPreconditioner",
    "KFACSolver",
    "KrylovSolver",
    "LiSSADivergenceError",
    "LiSSASettings",
    "LiSSASolver",
    "NotPositiveDefiniteError",
    "NystromApproximation",
    "NystromPreconditioner",
    "NystromSketchSolver",
    "ParallelLiSSASolver",
    "SingularKFACError",
    "SolveResult",
    "Solver",
    "randomized_nystrom",
]

DEPRECATED_NAMES = {
    "ConjugateGradient": "influencekit.solvers.cg:CGSolver",
    "BlockConjugateGradient": "influencekit.solvers.block_cg:BlockCGSolver",
    "LiSSA": "influencekit.solvers.lissa:LiSSASolver",
    "ParallelLiSSA": "influencekit.solvers.parallel_lissa:ParallelLiSSASolver",
    "KFACOperator": "influencekit.curvature.kfac:KFACCurvature",
    "IHVPSolver": "influencekit.solvers.base:Solver",
}
"""Old solver names, kept for one release with a DeprecationWarning."""

__getattr__ = alias_getattr(__name__, DEPRECATED_NAMES)
