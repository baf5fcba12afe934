"""Reports a person can read: one self-contained HTML file per run (:mod:`influencekit.reports.html`)."""

from influencekit.reports.html import (
    SIGN_CONVENTION,
    Example,
    ExampleGroup,
    Report,
    Scatter,
    SolverEvidence,
    draw_example,
    example_png,
    influence_example,
    influence_groups,
    removal_sentence,
    render_html,
    report_from_scores,
    write_report,
)

__all__ = [
    "SIGN_CONVENTION",
    "Example",
    "ExampleGroup",
    "Report",
    "Scatter",
    "SolverEvidence",
    "draw_example",
    "example_png",
    "influence_example",
    "influence_groups",
    "removal_sentence",
    "render_html",
    "report_from_scores",
    "write_report",
]
