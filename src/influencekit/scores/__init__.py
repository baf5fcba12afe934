"""Influence score matrices that do not fit in one process: see :mod:`influencekit.scores.matrix`."""

from influencekit.scores.matrix import ScoreMatrixSpec, ScoreRunReport, compute_score_matrix

__all__ = ["ScoreMatrixSpec", "ScoreRunReport", "compute_score_matrix"]
