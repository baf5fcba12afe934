"""A self-contained HTML report: the test point, the training examples that drove it, and the evidence.

One file, images embedded as base64 PNG ``data:`` URIs, no scripts, no external
references: it opens offline with nothing beside it. Sections:

* the test point (drawn, with its label, prediction and loss);
* groups of training examples (e.g. the top-k helpful and harmful), each drawn
  with its label, score and, where retraining measured it, the actual change;
* scatter plots (e.g. predicted vs. actual removal effect, with Pearson R and
  Spearman rho);
* the solver evidence (residuals, iterations, seconds), the curvature spectrum,
  warnings and the ``trustworthy`` flag;
* the settings and the command that reproduces the run.

Sign convention (Koh & Liang 2017), n training points:
I_up,loss(z, z_test) = -g_test^T H^{-1} g_z, negative = helpful (up-weighting z
lowers the test loss); the predicted effect of *removing* z is -(1/n) I_up,loss,
the first-order change of the test loss when z is removed and the model refit.

Examples are drawn by :func:`draw_example`: a tensor or array of shape (H, W),
(C, H, W) / (H, W, C) with C in {1, 3, 4}, or a flat vector whose length is a
square >= 64 (e.g. (784,) = 28 x 28) is drawn as an image; a string as text; a
mapping or any other vector as a table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from matplotlib.figure import Figure
from torch import Tensor

from influencekit.scores.influence import InfluenceScores
from influencekit.persistence import atomic_write

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

SIGN_CONVENTION = (
    "I_up,loss(z) = −g_testᵀ H⁻¹ g_z is the derivative of the test loss when training example z is up-weighted: "
    "negative = helpful (it pulls the test loss down), positive = harmful. The predicted effect of removing z "
    "and refitting is −(1/n) I_up,loss: positive means removing z would raise the test loss."
)


@dataclass
class Example:
    """One drawn example and its caption.

    Attributes:
        data: what :func:`draw_example` draws (tensor / array / string / mapping).
        heading: first caption line (e.g. "#1234 · label 7").
        details: further caption lines (scores).
        sentence: the plain-words reading of the score.
    """

    data: Any
    heading: str
    details: list[str] = field(default_factory=list)
    sentence: str = ""


@dataclass
class ExampleGroup:
    """A titled row of examples (e.g. the top-k helpful training points)."""

    title: str
    description: str
    examples: list[Example]
    anchor: str = ""


@dataclass
class Scatter:
    """One scatter panel of y against x (e.g. predicted against actual removal effect)."""

    title: str
    x: np.ndarray
    y: np.ndarray
    xlabel: str
    ylabel: str
    diagonal: bool = True

    def correlations(self) -> tuple[float, float]:
        """(Pearson R, Spearman rho) of x and y; NaN with fewer than 3 points or a constant series."""
        x, y = np.asarray(self.x, dtype=float), np.asarray(self.y, dtype=float)
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            return math.nan, math.nan
        return float(scipy.stats.pearsonr(x, y)[0]), float(scipy.stats.spearmanr(x, y)[0])


@dataclass
class SolverEvidence:
    """What one iHVP solve shows about itself.

    Attributes:
        name: solver name.
        seconds: wall time of the solve (and scoring, if so labelled by the caller).
        iterations: per right-hand side (None for direct solvers).
        residuals: ||(H + damping) s - g_test|| per right-hand side, relative to ||g_test||
            when ``relative`` (None: not measured).
        extra: further columns, e.g. {"R vs retraining": 0.99}.
    """

    name: str
    seconds: float | None = None
    iterations: Sequence[int] | None = None
    residuals: Sequence[float] | None = None
    relative: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Everything one report shows; render with :func:`render_html`, save with :func:`write_report`."""

    title: str
    test: Example
    groups: list[ExampleGroup]
    scatters: list[Scatter] = field(default_factory=list)
    scatter_caption: str = ""
    solvers: list[SolverEvidence] = field(default_factory=list)
    spectrum: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    trustworthy: bool | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    summary: str = ""
    sign_convention: str = SIGN_CONVENTION


# ---------------------------------------------------------------------------------------------- drawing examples


def _as_array(example: Any) -> np.ndarray | None:
    if isinstance(example, Tensor):
        return example.detach().cpu().to(torch.float64).numpy()
    if isinstance(example, np.ndarray) and example.dtype.kind in "biuf":
        return example.astype(np.float64)
    return None


def _image_of(example: Any, image_shape: Sequence[int] | None) -> np.ndarray | None:
    """The example as an (H, W) or (H, W, C) array in [0, 1], or None if it is not an image."""
    array = _as_array(example)
    if array is None:
        return None
    if image_shape is not None:
        array = array.reshape(tuple(image_shape))
    elif array.ndim == 1:
        side = math.isqrt(array.size)
        if side * side != array.size or array.size < 64:
            return None
        array = array.reshape(side, side)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        return None
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0 and hi <= 1:
        return array
    if lo >= 0 and hi <= 255:
        return array / 255.0
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)


def _png(write: Any) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def example_png(example: Any, *, image_shape: Sequence[int] | None = None, size: int = 112, cmap: str = "gray") -> bytes | None:
    """The example as PNG bytes, enlarged by an integer factor to about ``size`` pixels; None if it is not an image.

    Grey images use ``cmap`` on [0, 1] (values in [0, 255] are divided by 255,
    others scaled to their range); colour images are drawn as they are.
    """
    from matplotlib.image import imsave

    image = _image_of(example, image_shape)
    if image is None:
        return None
    factor = max(1, size // max(image.shape[:2]))
    image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return _png(lambda buffer: imsave(buffer, image, cmap=cmap, vmin=0.0, vmax=1.0, format="png"))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, Tensor):
        value = value.tolist()
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def draw_example(
    example: Any, *, image_shape: Sequence[int] | None = None, size: int = 112, cmap: str = "gray", alt: str = "example"
) -> str:
    """One example as an HTML fragment: an embedded ``<img>`` for images, ``<pre>`` for text, a ``<table>`` otherwise.

    Args:
        example: a tensor / array ((H, W), (C, H, W), (H, W, C), or a flat vector of
            square length >= 64 such as (784,)), a string, a mapping (drawn as a
            key/value table) or any other vector (a table of its first 16 values).
        image_shape: reshape a tensor to this shape first (e.g. (3, 32, 32)).
        size: displayed (and encoded) size of the longer image side in pixels, roughly.
        cmap: colour map of grey images.
        alt: the image's alternative text.
    """
    png = example_png(example, image_shape=image_shape, size=size, cmap=cmap)
    if png is not None:
        return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'
    if isinstance(example, str):
        text = example if len(example) <= 600 else example[:597] + "..."
        return f'<pre class="text">{html.escape(text)}</pre>'
    if isinstance(example, Mapping):
        rows = list(example.items())
    else:
        array = _as_array(example)
        if array is None:
            return f'<pre class="text">{html.escape(_format(example))}</pre>'
        flat = array.reshape(-1)
        rows = [(f"x[{i}]", float(v)) for i, v in enumerate(flat[:16])]
        if flat.size > 16:
            rows.append(("…", f"{flat.size - 16} more"))
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format(v))}</td></tr>" for k, v in rows)
    return f'<table class="tabular">{cells}</table>'


# ---------------------------------------------------------------------------------------------- influence captions


def removal_sentence(influence: float, n_train: int, actual: float | None = None, noun: str = "example") -> str:
    """The score in words: the predicted removal effect -(1/n) I_up,loss and, if measured, the actual one.

    >>> removal_sentence(-50.0, 1000)
    'Removing this example would raise the test loss by 0.05 (predicted).'
    """
    predicted = -influence / n_train
    direction = "raise" if predicted > 0 else "lower"
    sentence = f"Removing this {noun} would {direction} the test loss by {abs(predicted):.3g} (predicted)."
    if actual is not None:
        went = "up" if actual > 0 else "down"
        sentence += f" Retraining without it: the test loss went {went} by {abs(actual):.3g}."
    return sentence


def influence_example(
    data: Any, heading: str, influence: float, n_train: int, actual: float | None = None, noun: str = "example"
) -> Example:
    """An :class:`Example` captioned with I_up,loss, the predicted removal effect -(1/n) I_up,loss ("Δloss") and the measured one."""
    details = [f"I_up,loss {influence:+.4g}", f"predicted Δloss {-influence / n_train:+.3g}"]
    if actual is not None:
        details.append(f"retrained Δloss {actual:+.3g}")
    return Example(data, heading, details, removal_sentence(influence, n_train, actual, noun))


def _label_text(labels: Any, i: int) -> str:
    if labels is None:
        return ""
    value = labels[i]
    return f" · label {value.item() if isinstance(value, Tensor) else value}"


def influence_groups(
    influence: Tensor | np.ndarray,
    n_train: int,
    train_examples: Any,
    *,
    k: int = 10,
    train_labels: Any = None,
    train_ids: Any = None,
    actual_changes: Mapping[int, float] | None = None,
    noun: str = "example",
    what: str = "",
) -> list[ExampleGroup]:
    """The k most helpful (most negative I_up,loss) and k most harmful (most positive) training examples.

    Args:
        influence: I_up,loss of every training point on one test point, shape (n,).
        n_train: n of the predicted removal effect -(1/n) I_up,loss.
        train_examples: indexable by position (tensor (n, ...) or sequence).
        train_labels: indexable by position, or None.
        train_ids: the names of the positions shown to the reader (default: the positions).
        actual_changes: measured test-loss changes on removal, by position (those not measured are left out).
        what: appended to the group titles (e.g. " (exact solver)").
    """
    values = torch.as_tensor(np.asarray(influence, dtype=np.float64))
    k = min(k, values.numel())
    groups = []
    for title, largest, description, anchor in (
        ("Most helpful", False, "Most negative I_up,loss: these training examples pulled the test loss down; "
         "removing one would raise it.", "helpful"),
        ("Most harmful", True, "Most positive I_up,loss: these training examples pushed the test loss up; "
         "removing one would lower it.", "harmful"),
    ):
        positions = torch.topk(values, k, largest=largest).indices.tolist()
        examples = []
        for i in positions:
            name = i if train_ids is None else int(train_ids[i])
            actual = None if actual_changes is None else actual_changes.get(i)
            examples.append(influence_example(train_examples[i], f"#{name}{_label_text(train_labels, i)}",
                                              float(values[i]), n_train, actual, noun))
        groups.append(ExampleGroup(f"{title} {k} training {noun}s{what}", description, examples, anchor))
    return groups


def report_from_scores(
    scores: InfluenceScores,
    train_examples: Any,
    test_example: Any,
    *,
    test: int = 0,
    k: int = 10,
    train_labels: Any = None,
    test_label: Any = None,
    test_prediction: Any = None,
    train_ids: Any = None,
    test_id: Any = None,
    actual_changes: Mapping[int, float] | None = None,
    relative_residuals: Sequence[float] | Tensor | None = None,
    solver_name: str = "iHVP solve",
    spectrum: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    trustworthy: bool | None = None,
    title: str = "Influence report",
    settings: Mapping[str, Any] | None = None,
    command: str | None = None,
    figures: Sequence[tuple[str, bytes]] = (),
    noun: str | None = None,
) -> Report:
    """The report of row ``test`` of an :class:`InfluenceScores`, for any model.

    Args:
        scores: from :meth:`InfluenceFunction.scores`; row ``test`` is shown.
        train_examples: the training examples, indexable by position (tensor (n, ...) or sequence).
        test_example: the test example of that row.
        k: helpful and harmful examples shown.
        train_labels, test_label, test_prediction: shown in the captions (optional).
        train_ids, test_id: names shown instead of positions (e.g. dataset indices).
        actual_changes: test-loss changes measured by retraining without a training point, by position;
            with 3 or more, a predicted-vs-actual scatter is drawn.
        relative_residuals: ||(H + damping) s - g|| / ||g|| per test row, if the caller measured them
            (``scores.inverse_hvp.relative_residuals(gradients)``); otherwise the absolute residual norms are shown.
        spectrum: e.g. :meth:`SpectrumSummary.as_dict`.
        warnings: shown prominently; any warning makes the report untrustworthy.
        trustworthy: the caller's verdict; None: "not assessed" unless there are warnings.
        noun: "image" or "example" in the sentences (default: "image" when the test example draws as one).
    """
    solve = scores.inverse_hvp
    n = scores.n_train
    is_image = _image_of(test_example, None) is not None
    noun = noun or ("image" if is_image else "example")
    warnings = list(warnings)
    converged = solve.info.get("converged")
    if converged is not None and not bool(torch.as_tensor(converged).all()):
        warnings.append(f"{solver_name} did not converge for every test row (info['converged'] = {torch.as_tensor(converged).tolist()})")
    if solve.residual_norms is None and relative_residuals is None:
        warnings.append(f"{solver_name} did not measure its residuals: the accuracy of H⁻¹ g_test is unknown")
    if relative_residuals is not None:
        residuals, relative = [float(r) for r in torch.as_tensor(relative_residuals).reshape(-1)], True
    elif solve.residual_norms is not None:
        residuals, relative = [float(r) for r in solve.residual_norms], False
    else:
        residuals, relative = None, True
    evidence = SolverEvidence(
        solver_name, solve.seconds, None if solve.iterations is None else [int(i) for i in solve.iterations], residuals, relative
    )
    influence = scores.influence_on_loss[test]
    scatters = []
    if actual_changes is not None and len(actual_changes) >= 3:
        positions = sorted(actual_changes)
        predicted = (-influence[positions] / n).numpy()
        actual = np.array([actual_changes[i] for i in positions])
        scatters.append(Scatter(solver_name, actual, predicted, "actual change in test loss (retrained)",
                                "predicted change, −(1/n) I_up,loss"))
    details = []
    if test_label is not None:
        details.append(f"label {_plain(test_label)}")
    if test_prediction is not None:
        details.append(f"predicted {_plain(test_prediction)}")
    details.append(f"loss {float(scores.test_measurements[test]):.4g}")
    name = test if test_id is None else test_id
    return Report(
        title=title,
        test=Example(test_example, f"test #{name}", details),
        groups=influence_groups(influence, n, train_examples, k=k, train_labels=train_labels, train_ids=train_ids,
                                actual_changes=actual_changes, noun=noun),
        scatters=scatters,
        solvers=[evidence],
        spectrum=None if spectrum is None else dict(spectrum),
        warnings=warnings,
        trustworthy=False if warnings else trustworthy,
        settings=dict(settings or {}),
        command=command,
        figures=list(figures),
        summary=f"{n:,} training {noun}s scored for test #{name}.",
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


# ---------------------------------------------------------------------------------------------- rendering


def scatter_png(scatters: Sequence[Scatter]) -> bytes:
    """The scatter panels side by side (at most 3 per row), each titled with its Pearson R and Spearman rho."""
    cols = min(3, len(scatters))
    rows = -(-len(scatters) // cols)
    fig = Figure(figsize=(4.3 * cols, 4.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, panel in zip(axes, scatters):
        x, y = np.asarray(panel.x, dtype=float), np.asarray(panel.y, dtype=float)
        pearson, spearman = panel.correlations()
        if panel.diagonal and len(x):
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            pad = 0.05 * (hi - lo) or 1e-12
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)
        ax.axhline(0, color="0.85", lw=0.8, zorder=0)
        ax.axvline(0, color="0.85", lw=0.8, zorder=0)
        ax.scatter(x, y, s=10, alpha=0.7)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(f"{panel.title}\nPearson R = {pearson:.3f}, Spearman ρ = {spearman:.3f}", fontsize=10)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    for ax in axes[len(scatters):]:
        ax.set_axis_off()
    return _png(lambda buffer: fig.savefig(buffer, format="png", dpi=100))


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f4f5f7;margin:0}
main{max-width:1180px;margin:0 auto;padding:18px 22px 40px}
h1{font-size:1.5em;margin:.2em 0 .1em}h2{font-size:1.2em;margin:1.6em 0 .3em;border-bottom:1px solid #d5d9e0;padding-bottom:.2em}
nav a{margin-right:1em;color:#2456a6;text-decoration:none}
.badge{display:inline-block;padding:.15em .6em;border-radius:1em;font-weight:600;font-size:.9em}
.ok{background:#d8f2de;color:#14532d}.bad{background:#fde0dc;color:#7f1d1d}.unknown{background:#e5e7eb;color:#374151}
.convention{background:#fff;border-left:4px solid #2456a6;padding:.6em .9em;margin:.8em 0}
.warn{background:#fff4e5;border-left:4px solid #d97706;padding:.5em .9em;margin:.4em 0}
.test{display:flex;gap:18px;align-items:center;background:#fff;padding:12px;border-radius:8px}
.test img{width:168px;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(195px,1fr));gap:10px}
.card{background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card img{display:block;width:112px;height:auto;margin:0 auto 4px}
img{image-rendering:pixelated}
.card .head{font-weight:600}.card .num{font:12.5px ui-monospace,Menlo,Consolas,monospace;color:#374151}
.card .say{font-size:12.5px;margin-top:4px;color:#1d2330}
.helpful .card{border-top:3px solid #15803d}.harmful .card{border-top:3px solid #b91c1c}
.plot{max-width:100%;height:auto;background:#fff;image-rendering:auto}
table{border-collapse:collapse;background:#fff}th,td{padding:3px 9px;border:1px solid #e1e4ea;text-align:left;vertical-align:top}
td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
pre{background:#fff;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
pre.text{font-size:12.5px;margin:0}table.tabular{font-size:12px}
"""


def _example_html(example: Example, size: int) -> str:
    lines = "".join(f'<div class="num">{html.escape(line)}</div>' for line in example.details)
    say = f'<div class="say">{html.escape(example.sentence)}</div>' if example.sentence else ""
    drawn = draw_example(example.data, size=size, alt=example.heading)
    return f'<div class="card">{drawn}<div class="head">{html.escape(example.heading)}</div>{lines}{say}</div>'


def _number_list(values: Sequence[float] | Sequence[int] | None, integer: bool = False) -> str:
    if values is None:
        return "not measured"
    values = list(values)
    if not values:
        return "–"
    shown = max(values)
    text = str(int(shown)) if integer else f"{shown:.3g}"
    return text if len(values) == 1 else f"{text} (max of {len(values)})"


def _solver_table(solvers: Sequence[SolverEvidence]) -> str:
    extra_keys = list(dict.fromkeys(key for s in solvers for key in s.extra))
    head = ["solver", "seconds", "iterations", "residual", *extra_keys]
    rows = []
    for s in solvers:
        kind = "relative" if s.relative else "absolute"
        residual = _number_list(s.residuals) + ("" if s.residuals is None else f" {kind}")
        cells = [s.name, "–" if s.seconds is None else f"{s.seconds:.3g}",
                 "direct" if s.iterations is None else _number_list(s.iterations, integer=True), residual,
                 *[_format(s.extra.get(key, "–")) for key in extra_keys]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _key_value_table(values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def render_html(report: Report, *, image_size: int = 112) -> str:
    """The report as one self-contained HTML document (a string)."""
    if report.trustworthy is True:
        badge = '<span class="badge ok">trustworthy: yes</span>'
    elif report.trustworthy is False:
        badge = '<span class="badge bad">trustworthy: NO — see the warnings</span>'
    else:
        badge = '<span class="badge unknown">trustworthy: not assessed</span>'
    parts = [
        f"<header><h1>{html.escape(report.title)}</h1><p>{badge} {html.escape(report.summary)}</p>",
        '<nav><a href="#test">test point</a>'
        + "".join(f'<a href="#{g.anchor or f"group{i}"}">{html.escape(g.title.split(" training")[0].lower())}</a>'
                  for i, g in enumerate(report.groups))
        + ('<a href="#scatter">scatter</a>' if report.scatters else "")
        + '<a href="#evidence">evidence</a><a href="#settings">settings</a></nav></header>',
        f'<p class="convention"><b>How to read the scores.</b> {html.escape(report.sign_convention)}</p>',
    ]
    parts += [f'<p class="warn">⚠ {html.escape(w)}</p>' for w in report.warnings]
    details = "".join(f'<div class="num">{html.escape(d)}</div>' for d in report.test.details)
    parts.append(
        f'<h2 id="test">Test point</h2><div class="test">{draw_example(report.test.data, size=2 * image_size, alt=report.test.heading)}'
        f'<div><div class="head"><b>{html.escape(report.test.heading)}</b></div>{details}</div></div>'
    )
    for i, group in enumerate(report.groups):
        kind = group.anchor if group.anchor in ("helpful", "harmful") else ""
        cards = "".join(_example_html(e, image_size) for e in group.examples)
        parts.append(f'<h2 id="{group.anchor or f"group{i}"}">{html.escape(group.title)}</h2>'
                     f"<p>{html.escape(group.description)}</p><div class=\"grid {kind}\">{cards}</div>")
    if report.scatters:
        stats = "; ".join(f"{s.title}: R = {r:.3f}, ρ = {rho:.3f}" for s in report.scatters for r, rho in [s.correlations()])
        parts.append(f'<h2 id="scatter">Scatter plots</h2><p>{html.escape(report.scatter_caption)} {html.escape(stats)}.</p>'
                     f'<img class="plot" src="{_data_uri(scatter_png(report.scatters))}" alt="scatter plots">')
    for caption, png in report.figures:
        parts.append(f"<h2>{html.escape(caption)}</h2>"
                     f'<img class="plot" src="{_data_uri(png)}" alt="{html.escape(caption)}">')
    parts.append('<h2 id="evidence">Solver evidence</h2>')
    parts.append(_solver_table(report.solvers) if report.solvers else "<p>No solver evidence recorded.</p>")
    if report.spectrum:
        parts.append("<h3>Curvature spectrum</h3>" + _key_value_table(report.spectrum))
    parts.append("<p>Warnings: " + ("; ".join(html.escape(w) for w in report.warnings) if report.warnings else "none")
                 + f". Trustworthy: <b>{report.trustworthy if report.trustworthy is not None else 'not assessed'}</b>.</p>")
    parts.append('<h2 id="settings">Settings</h2>' + _key_value_table(report.settings))
    if report.command:
        parts.append(f"<h3>Reproduce</h3><pre>{html.escape(report.command)}</pre>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")


def write_report(report: Report, path: str | Path, *, image_size: int = 112) -> Path:
    """Render ``report`` and write it to ``path`` atomically (a directory gets ``report.html``); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.html"
    return atomic_write(path, render_html(report, image_size=image_size))
