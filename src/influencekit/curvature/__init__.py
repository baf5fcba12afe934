"""Stage 3 of the data flow, curvature: the matrix M whose damped inverse influence needs, as a linear
operator on blocks of vectors (``matvec(V)``: V (k, p) -> rows M v_j).

One file per curvature kind, all on :class:`CurvatureOperator`:

* :class:`HessianOperator` -- H = (1/n) sum_i hess l_i + lambda I, of any objective.
* :class:`GaussNewtonOperator` -- the generalised Gauss-Newton J^T H_out J (PSD).
* :class:`EmpiricalFisherOperator` -- (1/n) sum_i g_i g_i^T + lambda I.
* :class:`KFACCurvature` -- K-FAC / EK-FAC, the Kronecker-factored GGN per layer.
* :class:`BlockDiagonalOperator` -- the block-diagonal part of any of them (per layer / tensor).
* :class:`DenseOperator` -- an explicit matrix.
* :mod:`~influencekit.curvature.spectrum` -- eigenvalue diagnostics (Lanczos, summaries).
"""

from influencekit.curvature.base import CurvatureOperator, DenseOperator
from influencekit.curvature.block_diagonal import (
    BlockDiagonalOperator,
    CurvatureBlock,
    blocks_from_groups,
    blocks_per_module,
    blocks_per_tensor,
)
from influencekit.curvature.example_sum import ExampleSumCurvature
from influencekit.curvature.fisher import EmpiricalFisherOperator
from influencekit.curvature.ggn import GaussNewtonOperator
from influencekit.curvature.hessian import HessianOperator
from influencekit.curvature.kfac import KFACCurvature, KFACFactors, KFACLayer
from influencekit.curvature.spectrum import SpectrumSummary, extreme_eigenvalues, spectrum_summary

__all__ = [
    "BlockDiagonalOperator",
    "CurvatureBlock",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "ExampleSumCurvature",
    "GaussNewtonOperator",
    "HessianOperator",
    "KFACCurvature",
    "KFACFactors",
    "KFACLayer",
    "SpectrumSummary",
    "blocks_from_groups",
    "blocks_per_module",
    "blocks_per_tensor",
    "extreme_eigenvalues",
    "spectrum_summary",
]
