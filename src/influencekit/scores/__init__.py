"""Stage 5 of the data flow, scores: influence of training points on test measurements.

* :mod:`~influencekit.scores.influence` -- I_up,loss = -g_test^T H^-1 g_i for all training
  points (:class:`InfluenceFunction`, :class:`InfluenceScores`), I_up,params, self-influence.
* :mod:`~influencekit.scores.perturbation` -- I_pert,loss, the gradient of the test loss
  with respect to a training input.
* :mod:`~influencekit.scores.fastif` -- FastIF: influence restricted to kNN-preselected
  candidates, and its recall@m.
* :mod:`~influencekit.scores.trak` -- TRAK (Park et al. 2023): projected margin gradients of one
  model or an ensemble, for classifiers (:class:`TRAK`, :func:`ensemble_scores`).
* :mod:`~influencekit.scores.matrix` -- score matrices larger than memory: many test points
  x all training points into zarr, resumable, on Dask (``influencekit score``).
"""

from influencekit.scores.fastif import (
    FastIFResult,
    RecallTable,
    candidate_influence,
    fastif_recall_table,
    fastif_top_m,
    top_m_among,
)
from influencekit.scores.influence import InfluenceFunction, InfluenceScores, TopK
from influencekit.scores.matrix import ScoreMatrixSpec, ScoreRunReport, compute_score_matrix
from influencekit.scores.perturbation import perturbation_influence, perturbation_influence_from_inverse_hvp
from influencekit.scores.trak import TRAK, TRAKFeatures, TRAKScores, ensemble_scores

__all__ = [
    "FastIFResult",
    "InfluenceFunction",
    "InfluenceScores",
    "RecallTable",
    "ScoreMatrixSpec",
    "ScoreRunReport",
    "TRAK",
    "TRAKFeatures",
    "TRAKScores",
    "TopK",
    "candidate_influence",
    "compute_score_matrix",
    "ensemble_scores",
    "fastif_recall_table",
    "fastif_top_m",
    "perturbation_influence",
    "perturbation_influence_from_inverse_hvp",
    "top_m_among",
]
