"""influencekit: which training examples made my model predict this?

Data flows one way: model + loss + data (:class:`TorchObjective` or a closed-form
objective) -> gradients -> curvature operator -> iHVP solver -> scores
(:class:`InfluenceFunction`) -> validation and reports.
"""

from influencekit.curvature import DenseOperator, HessianOperator, spectrum_summary
from influencekit.data import DataSource
from influencekit.errors import (
    DtypeCastWarning,
    DtypeError,
    EmptyDataError,
    InfluenceInputError,
    LabelRangeError,
    NondeterministicDataError,
    NonFiniteError,
    NonSequentialSamplerError,
    TrainModeError,
    UnconvergedSolveError,
    UnconvergedSolveWarning,
)
from influencekit.influence import InfluenceFunction, InfluenceScores, TopK
from influencekit.models.softmax_regression import SoftmaxRegressionObjective
from influencekit.solvers import (
    ConjugateGradient,
    DirectSolver,
    LiSSA,
    LiSSADivergenceError,
    NotPositiveDefiniteError,
    SolveResult,
)
from influencekit.solvers.convergence import IndefiniteCurvatureError
from influencekit.torch_objective import TorchObjective

__all__ = [
    "ConjugateGradient",
    "DataSource",
    "DenseOperator",
    "DirectSolver",
    "DtypeCastWarning",
    "DtypeError",
    "EmptyDataError",
    "HessianOperator",
    "IndefiniteCurvatureError",
    "InfluenceFunction",
    "InfluenceInputError",
    "InfluenceScores",
    "LabelRangeError",
    "LiSSA",
    "LiSSADivergenceError",
    "NonFiniteError",
    "NonSequentialSamplerError",
    "NondeterministicDataError",
    "NotPositiveDefiniteError",
    "SoftmaxRegressionObjective",
    "SolveResult",
    "TopK",
    "TorchObjective",
    "TrainModeError",
    "UnconvergedSolveError",
    "UnconvergedSolveWarning",
    "spectrum_summary",
]
