"""The last stage of the data flow, reports a person can read: one self-contained HTML file per run.

* :mod:`~influencekit.reports.html` -- the renderer, and :func:`report_from_scores` for any
  :class:`~influencekit.scores.InfluenceScores` (your own model and data).
* :mod:`~influencekit.reports.experiments` -- the reports of the built-in commands.
"""

from influencekit.reports import html
from influencekit.reports.html import *  # noqa: F403

__all__ = list(html.__all__)
