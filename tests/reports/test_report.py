"""The HTML report: drawing examples, the sign convention in words, self-containment, and a real browser."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shlex

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from headless_chromium import external_references, is_not_blank, open_alone
from influencekit import DirectSolver, InfluenceFunction
from influencekit.cli import build_parser
from influencekit.objectives.softmax_regression import SoftmaxRegressionObjective, fit_softmax_regression
from influencekit.reports import draw_example, example_png, removal_sentence, render_html, report_from_scores, write_report
from influencekit.reports.experiments import command_line

WEIGHT_DECAY = 0.01


def _decode(png: bytes) -> np.ndarray:
    return imread(io.BytesIO(png))


def test_flat_vector_draws_as_a_square_image_enlarged_by_an_integer_factor():
    image = torch.zeros(784)
    image[3 * 28 + 5] = 1.0  # row 3, column 5
    pixels = _decode(example_png(image, size=112))
    assert pixels.shape[:2] == (112, 112)  # 28 x 28 enlarged 4 times
    grey = pixels[..., :3].mean(axis=2)
    assert np.all(grey[12:16, 20:24] == 1.0) and grey.sum() == 16.0  # only that pixel is white (cmap "gray")
    # (C, H, W) colour: a pure red image stays red
    red = torch.zeros(3, 10, 20)
    red[0] = 1.0
    rgb = _decode(example_png(red, size=100))
    assert rgb.shape[:2] == (50, 100) and np.allclose(rgb[..., :3].reshape(-1, 3), [1.0, 0.0, 0.0])
    # values in [0, 255] are divided by 255; an (H, W) array works the same way
    assert _decode(example_png(np.full((8, 8), 255.0), size=8))[..., :3].min() == 1.0


def test_text_and_tabular_examples_draw_as_text():
    assert draw_example("a <b>bold</b> review") == '<pre class="text">a &lt;b&gt;bold&lt;/b&gt; review</pre>'
    table = draw_example({"age": 41, "income": 5.25})
    assert "<th>age</th><td>41</td>" in table and "<th>income</th><td>5.25</td>" in table
    vector = draw_example(torch.arange(20.0))  # 20 is not a square: a table of values
    assert example_png(torch.arange(20.0)) is None
    assert "<th>x[15]</th><td>15</td>" in vector and "4 more" in vector and "<img" not in vector


def test_removal_sentence_states_the_sign_convention():
    # I_up,loss = -50 (helpful), n = 1000: removing it raises the test loss by -(1/n) I = 0.05
    assert removal_sentence(-50.0, 1000, noun="image") == "Removing this image would raise the test loss by 0.05 (predicted)."
    assert removal_sentence(30.0, 1000, actual=-0.02) == (
        "Removing this example would lower the test loss by 0.03 (predicted). "
        "Retraining without it: the test loss went down by 0.02."
    )


def _blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n flat 8 x 8 images in [0, 1]: class c has a bright 3 x 3 blob at a class-specific place, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.25 * torch.rand(n, 8, 8, generator=gen, dtype=torch.float64)
    for i, c in enumerate(labels.tolist()):
        r = 1 + 2 * c + int(torch.randint(0, 2, (1,), generator=gen))
        images[i, r : r + 3, 1 + 2 * c : 4 + 2 * c] += 0.7
    return images.reshape(n, 64).clamp(0, 1), labels


@pytest.fixture(scope="module")
def fitted_report():
    """A softmax regression on 80 synthetic 8 x 8 images, its report, and ground truth for the shown examples.

    Ground truth: I_up,loss = -g_test^T H^{-1} g_i by an explicit dense solve, and the
    actual test-loss change by refitting without each of the 3 most helpful and 3 most harmful points.
    """
    x, y = _blob_images(80, seed=0)
    x_test = 0.5 * (x[0] + x[1]).unsqueeze(0)  # half class 0, half class 1: uncertain
    y_test = torch.tensor([0])
    fit = fit_softmax_regression(x, y, WEIGHT_DECAY, num_classes=3)
    objective = SoftmaxRegressionObjective(fit.weights, x, y, WEIGHT_DECAY)
    scores = InfluenceFunction(objective, DirectSolver(objective.hessian())).scores((x_test, y_test))
    g_test = objective.measurement_gradients((x_test, y_test))[0]
    explicit = -objective.train_gradients(torch.arange(80)) @ torch.linalg.solve(objective.hessian(), g_test)
    order = torch.argsort(explicit)
    helpful, harmful = order[:10].tolist(), order.flip(0)[:10].tolist()
    base = float(objective.measurement_values((x_test, y_test))[0])
    actual = {}
    for i in helpful[:3] + harmful[:3]:
        keep = torch.arange(80) != i
        refit = fit_softmax_regression(x[keep], y[keep], WEIGHT_DECAY, num_classes=3)
        actual[i] = float(SoftmaxRegressionObjective(refit.weights, x[keep], y[keep], WEIGHT_DECAY)
                          .measurement_values((x_test, y_test))[0]) - base
    report = report_from_scores(
        scores, x, x_test[0], k=10, train_labels=y, test_label=0, test_prediction=int((x_test @ fit.weights.T).argmax()),
        actual_changes=actual, solver_name="Cholesky", settings={"weight_decay": WEIGHT_DECAY, "n": 80},
        command="python make_report.py --seed 0", trustworthy=True,
    )
    return report, explicit, helpful, harmful, actual


def _section(text: str, anchor: str) -> str:
    return text.split(f'id="{anchor}"')[1].split("<h2")[0]


def test_report_shows_the_top_examples_with_their_predicted_and_actual_removal_effects(fitted_report):
    report, explicit, helpful, harmful, actual = fitted_report
    text = render_html(report)
    for anchor, expected in (("helpful", helpful), ("harmful", harmful)):
        shown = [int(i) for i in re.findall(r'class="head">#(\d+) · label', _section(text, anchor))]
        assert shown == expected
    # the sign convention checked against retraining: removing a helpful point raised the test loss
    assert all(actual[i] > 0 for i in helpful[:3]) and all(actual[i] < 0 for i in harmful[:3])
    top = helpful[0]
    predicted = -float(explicit[top]) / 80
    assert predicted > 0
    assert (f"Removing this image would raise the test loss by {predicted:.3g} (predicted). "
            f"Retraining without it: the test loss went up by {actual[top]:.3g}.") in text
    worst = harmful[0]
    assert f"Removing this image would lower the test loss by {float(explicit[worst]) / 80:.3g} (predicted)." in text
    assert f"I_up,loss {float(explicit[worst]):+.4g}" in text
    # the predicted-vs-actual scatter over the 6 retrained points, with its correlations in the text
    (scatter,) = report.scatters
    np.testing.assert_allclose(scatter.x, [actual[i] for i in sorted(actual)])
    np.testing.assert_allclose(scatter.y, [-float(explicit[i]) / 80 for i in sorted(actual)], rtol=1e-8)
    pearson = float(np.corrcoef(scatter.x, scatter.y)[0, 1])
    assert pearson > 0.9 and f"R = {pearson:.3f}" in text
    assert "trustworthy: yes" in text and "python make_report.py --seed 0" in text and "<th>weight_decay</th>" in text


def test_report_is_self_contained(fitted_report, tmp_path):
    report = fitted_report[0]
    path = write_report(report, tmp_path)
    assert path == tmp_path / "report.html" and os.stat(path).st_mode & 0o044 == 0o044  # readable by others
    text = path.read_text(encoding="utf-8")
    assert external_references(text) == []
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 1 + 20 + 1  # test, top-k, scatter
    assert "<script" not in text
    # the checker does catch outside references
    leaky = text.replace("</main>", '<img src="figure.png"><a href="results.json">x</a><div style="background:url(a.png)"></div></main>')
    assert len(external_references(leaky)) == 3


def test_report_renders_in_headless_chromium_alone(fitted_report, tmp_path):
    path = write_report(fitted_report[0], tmp_path / "report.html")
    probe, screenshot = open_alone(path, tmp_path / "browser")
    widths = probe["natural_widths"]
    assert len(widths) == 22 and all(probe["decoded"])
    assert widths[0] == 224 and widths[1:21] == [112] * 20 and widths[21] > 400  # 8 x 8 images enlarged; the plot
    assert probe["alts"][-1] == "scatter plots"
    assert is_not_blank(screenshot)


def test_unconverged_or_unmeasured_solve_is_flagged_untrustworthy():
    x, y = _blob_images(30, seed=1)
    fit = fit_softmax_regression(x, y, WEIGHT_DECAY, num_classes=3)
    objective = SoftmaxRegressionObjective(fit.weights, x, y, WEIGHT_DECAY)
    scores = InfluenceFunction(objective, DirectSolver(objective.hessian())).scores((x[:1], y[:1]))
    scores.inverse_hvp = dataclasses.replace(scores.inverse_hvp, residual_norms=None, info={"converged": torch.tensor([False])})
    report = report_from_scores(scores, x, x[0], k=3, trustworthy=True)
    assert report.trustworthy is False and len(report.warnings) == 2
    text = render_html(report)
    assert "trustworthy: NO" in text and "did not converge" in text and "not measured" in text
    assert "⚠ iHVP solve did not measure its residuals" in text


def test_command_line_parses_back_to_the_same_arguments():
    argv = ["experiment", "fastif-recall", "--data-dir", "/data/mnist", "--out", "/tmp/out dir", "--ks", "100,500",
            "--test-indices", "8,3", "--knn-index", "hnsw", "--no-progress"]
    args = build_parser(("experiment", "fastif-recall")).parse_args(argv)
    command = command_line("experiment", "fastif-recall", args)
    assert command.startswith("influencekit experiment fastif-recall ") and "'/tmp/out dir'" in command
    again = build_parser(("experiment", "fastif-recall")).parse_args(shlex.split(command)[1:])
    assert vars(again) == vars(args)
    assert "--num-test" not in command  # defaults are left out


def test_text_examples_report_with_plain_sentences():
    from influencekit import InfluenceScores, SolveResult

    reviews = [f"review {i}: {'great' if i % 2 else 'awful'} <film>" for i in range(6)]
    influence = torch.tensor([[3.0, -1.0, 0.5, -4.0, 2.0, -0.5]], dtype=torch.float64)
    solve = SolveResult(torch.zeros(1, 2), torch.tensor([1e-9]), torch.tensor([7]), 0.01)
    scores = InfluenceScores(influence, 6, solve, torch.tensor([0.7]))
    text = render_html(report_from_scores(scores, reviews, "test review: fine", k=2, test_label="positive"))
    assert [int(i) for i in re.findall(r'class="head">#(\d+)', _section(text, "helpful"))] == [3, 1]
    assert [int(i) for i in re.findall(r'class="head">#(\d+)', _section(text, "harmful"))] == [0, 4]
    assert "review 3: great &lt;film&gt;" in text and "<img" not in text.split('id="test"')[1]
    # I_up,loss = -4, n = 6: removing #3 raises the test loss by 4/6
    assert "Removing this example would raise the test loss by 0.667 (predicted)." in text
    assert "1e-09 absolute" in text and "trustworthy: not assessed" in text and "label positive" in text
