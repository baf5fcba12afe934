"""Evaluation of attribution methods at the field's standard.

* :mod:`~influencekit.evaluation.lds`: linear datamodeling score (Park et al. 2023)
  with bootstrap confidence intervals.
* :mod:`~influencekit.evaluation.loo`: leave-one-out correlation.
* :mod:`~influencekit.evaluation.mislabel`: mislabelled-data detection (AUC, fraction found).
* :mod:`~influencekit.evaluation.retrain`: test outputs of models retrained on subsets,
  for any model, on Dask, cached and resumable.

The metric functions are pure (arrays in, numbers out); training is done by a
user-supplied *subset trainer* (see :class:`~influencekit.evaluation.retrain.SubsetTrainer`).
"""

from influencekit.evaluation.api import evaluate_lds
from influencekit.evaluation.lds import LDSResult, group_effects, linear_datamodeling_score, rowwise_spearman, subset_masks
from influencekit.evaluation.loo import LOOResult, leave_one_out_correlation, leave_one_out_effects
from influencekit.evaluation.mislabel import MislabelResult, detection_auc, flip_labels, fraction_found, mislabel_detection
from influencekit.evaluation.retrain import PerSubsetTrainer, SubsetTrainer, subset_outputs

__all__ = [
    "LDSResult",
    "LOOResult",
    "MislabelResult",
    "PerSubsetTrainer",
    "SubsetTrainer",
    "detection_auc",
    "evaluate_lds",
    "flip_labels",
    "fraction_found",
    "group_effects",
    "leave_one_out_correlation",
    "leave_one_out_effects",
    "linear_datamodeling_score",
    "mislabel_detection",
    "rowwise_spearman",
    "subset_masks",
    "subset_outputs",
]
