"""TRAK against closed forms on softmax regression (exact margin gradients) and against retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influencekit.evaluation import linear_datamodeling_score, subset_masks
from influencekit.objectives.softmax_regression import fit_softmax_regression
from influencekit.scores.trak import TRAK, TRAKFeatures, ensemble_scores, gaussian_projection, margin_objective


def _data(n: int, d: int = 4, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = 1.5 * rng.normal(size=(classes, d))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(size=(n, d))
    return torch.from_numpy(x), torch.from_numpy(y)


class _PinnedSoftmax(torch.nn.Module):
    """Softmax regression with the last class's logit pinned at 0: logits [x V^T, 0], V (C - 1, d).

    The same probabilities as W (C, d) when V = W[:-1] - W[-1]; unlike W, V is identifiable, so the
    margin gradients of n >= (C - 1) d points span the parameter space and (G^T G)^-1 exists.
    """

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter((weights[:-1] - weights[-1]).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.weight.T
        return torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)


def _linear(weights: torch.Tensor) -> torch.nn.Module:
    return _PinnedSoftmax(weights).eval()


def _closed_form_margin_gradients(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f = log p_y - log(1 - p_y), and grad_V f = ((e_y - p) / (1 - p_y))[:C-1] x^T flattened like V; p_y."""
    logits = x @ weights.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p_y = p[np.arange(len(y)), y]
    residual = np.eye(weights.shape[0])[y] - p
    gradients = (residual / (1 - p_y)[:, None])[:, :-1, None] * x[:, None, :]
    return np.log(p_y) - np.log1p(-p_y), gradients.reshape(len(y), -1), p_y


def _setting(n: int = 60, seed: int = 0):
    x, y = _data(n + 8, seed=seed)
    weights = fit_softmax_regression(x[:n], y[:n], 0.05).weights
    return weights, (x[:n], y[:n]), (x[n:], y[n:])


def test_margin_and_its_gradients_match_the_closed_form():
    weights, train, _ = _setting()
    objective = margin_objective(_linear(weights), train)
    margins, gradients, _ = _closed_form_margin_gradients(weights.numpy(), train[0].numpy(), train[1].numpy())
    np.testing.assert_allclose(objective.measurement_values(train).numpy(), margins, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(objective.measurement_gradients(train).numpy(), gradients, rtol=1e-10, atol=1e-12)


def test_trak_with_a_full_rank_projection_equals_the_explicit_least_squares_formula():
    """k >= p: phi(z)^T (Phi^T Phi)^-1 Phi^T = g_z^T (G^T G)^-1 G^T (the projection cancels), times Q = 1 - p_i."""
    weights, train, tests = _setting()
    p = (weights.shape[0] - 1) * weights.shape[1]
    _, g_train, p_train = _closed_form_margin_gradients(weights.numpy(), train[0].numpy(), train[1].numpy())
    _, g_test, _ = _closed_form_margin_gradients(weights.numpy(), tests[0].numpy(), tests[1].numpy())
    expected = g_test @ np.linalg.solve(g_train.T @ g_train, g_train.T) * (1 - p_train)[None, :]
    objective = margin_objective(_linear(weights), train)
    square = TRAK(objective, projection_dim=p, seed=1).scores(tests)
    np.testing.assert_allclose(square.margin_effect.numpy(), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    wide = TRAK(objective, projection_dim=3 * p, seed=2, relative_damping=1e-9).scores(tests)  # lambda -> 0 limit
    np.testing.assert_allclose(wide.margin_effect.numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(square.loss_sign.numpy(), -square.margin_effect.numpy())
    with pytest.raises(ValueError, match="relative_damping >= "):
        TRAK(objective, projection_dim=3 * p, seed=2)  # Phi^T Phi (24 x 24) has rank 8


def test_damping_shrinks_towards_the_scaled_gradient_product():
    """Large lambda: tau -> phi_z^T Phi^T Q / lambda, i.e. g_z^T g_i (1 - p_i) / lambda up to the JL error."""
    weights, train, tests = _setting()
    objective = margin_objective(_linear(weights), train)
    trak = TRAK(objective, projection_dim=24, seed=0, relative_damping=1e8)
    features = trak.features
    phi_test = (objective.measurement_gradients(tests) @ features.projection)
    assert trak.damping == pytest.approx(1e8 * float((features.train**2).sum()) / 24, rel=1e-12)
    expected = (phi_test @ features.train.T) * features.out_to_loss[None, :] / trak.damping
    np.testing.assert_allclose(trak.scores(tests).margin_effect.numpy(), expected.numpy(), rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()))


def test_projection_is_seeded_tiled_and_narrows_to_its_prefix():
    dim, k = 5000, 600  # two row tiles and three column tiles
    first = gaussian_projection(dim, k, seed=3)
    np.testing.assert_array_equal(first.numpy(), gaussian_projection(dim, k, seed=3).numpy())
    assert not torch.equal(first, gaussian_projection(dim, k, seed=4))
    np.testing.assert_allclose(gaussian_projection(dim, 300, seed=3).numpy(), (first[:, :300] * 2**0.5).numpy(), rtol=1e-6)
    # entries N(0, 1/k): mean 0 and variance 1/k within 5 standard errors over 3e6 entries
    entries = first.double().reshape(-1) * k**0.5
    assert abs(float(entries.mean())) < 5 / len(entries) ** 0.5
    assert abs(float(entries.var()) - 1) < 5 * (2 / len(entries)) ** 0.5
    assert (first[:, :256] - first[:, 256:512]).abs().max() > 0.1  # tiles differ


def test_features_do_not_depend_on_the_chunk_size_and_narrowing_matches_recomputing():
    weights, train, _ = _setting()
    objective = margin_objective(_linear(weights), train)
    small = TRAKFeatures.compute(objective, 40, seed=5, rows=7)
    large = TRAKFeatures.compute(objective, 40, seed=5, rows=64)
    np.testing.assert_allclose(small.train.numpy(), large.train.numpy(), rtol=1e-12, atol=1e-14)
    narrowed = large.narrow(20)
    direct = TRAKFeatures.compute(objective, 20, seed=5)
    np.testing.assert_allclose(narrowed.train.numpy(), direct.train.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(narrowed.out_to_loss.numpy(), direct.out_to_loss.numpy())


def test_sign_against_retraining_loss_and_margin_outputs_give_the_same_lds():
    """Retrain softmax regression on random halves: -tau predicts the test losses (LDS > 0), tau the margins."""
    weights, train, tests = _setting(n=80, seed=1)
    n = len(train[1])
    masks = subset_masks(n, 24, 0.5, seed=0)
    losses, margins = [], []
    for mask in masks:
        refit = _linear(fit_softmax_regression(train[0][mask], train[1][mask], 0.05, num_classes=3).weights)
        with torch.no_grad():
            logits = refit(tests[0])
        losses.append(torch.nn.functional.cross_entropy(logits, tests[1], reduction="none").numpy())
        margins.append(margin_objective(refit, train).measurement_values(tests).numpy())
    losses, margins = np.stack(losses, 1), np.stack(margins, 1)
    scores = TRAK(margin_objective(_linear(weights), train), projection_dim=8, seed=0).scores(tests)
    on_loss = linear_datamodeling_score(scores.loss_sign.numpy(), masks, losses, n_bootstrap=0).lds
    on_margin = linear_datamodeling_score(scores.margin_effect.numpy(), masks, margins, n_bootstrap=0).lds
    assert on_loss == pytest.approx(on_margin, abs=1e-12)  # the loss is a decreasing function of the margin
    assert on_loss > 0.5
    assert linear_datamodeling_score(scores.margin_effect.numpy(), masks, losses, n_bootstrap=0).lds < -0.5


def test_ensemble_averages_kernels_and_weights_apart():
    """TRAK over M models: mean_m(kernel_m) * mean_m(Q_m), computed here from two models' explicit parts."""
    weights, train, tests = _setting()
    first = TRAK(margin_objective(_linear(weights), train), projection_dim=8, seed=0).scores(tests)
    second = TRAK(margin_objective(_linear(1.3 * weights), train), projection_dim=8, seed=0).scores(tests)
    both = ensemble_scores([first, second])
    expected = 0.5 * (first.kernel + second.kernel) * (0.5 * (first.out_to_loss + second.out_to_loss))[None, :]
    np.testing.assert_allclose(both.margin_effect.numpy(), expected.numpy(), rtol=1e-12)
    assert not np.allclose(both.margin_effect.numpy(), 0.5 * (first.margin_effect + second.margin_effect).numpy(), rtol=1e-3)
    np.testing.assert_array_equal(ensemble_scores([first]).margin_effect.numpy(), first.margin_effect.numpy())


def test_bfloat16_projection_is_within_its_rounding_of_the_float32_one():
    weights, train, tests = _setting()
    objective = margin_objective(_linear(weights), train)
    low = TRAKFeatures.compute(objective, 64, seed=2, projection_dtype=torch.bfloat16)
    assert low.projection.dtype == torch.bfloat16
    reference = gaussian_projection(objective.dim, 64, seed=2).double()  # the same draws, kept in float32
    # bfloat16 keeps 8 significant bits: each entry of P within 2^-8 relative of its float32 draw
    np.testing.assert_allclose(low.projection.double().numpy(), reference.numpy(), rtol=2.0**-8, atol=0)
    exact = objective.measurement_gradients(train) @ reference  # float64 product of the float64 gradients
    error = (low.train - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(error.max()) < 1e-2  # inputs and output rounded at 2^-8 each, errors of random sign
    high = TRAKFeatures.compute(objective, 64, seed=2, projection_dtype=torch.float32)
    kernels = [TRAK(objective, features=f, relative_damping=0.1).scores(tests).kernel for f in (low, high)]
    assert float((kernels[0] - kernels[1]).norm() / kernels[1].norm()) < 2e-2


def test_scores_from_precomputed_test_features_equal_scores_of_the_tests():
    weights, train, tests = _setting()
    objective = margin_objective(_linear(weights), train)
    trak = TRAK(objective, projection_dim=30, seed=1, relative_damping=0.3)
    direct = trak.scores(tests)
    phi = trak.test_features(tests)
    np.testing.assert_allclose(phi.numpy(), (objective.measurement_gradients(tests) @ trak.features.projection).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(trak.scores_of_features(phi).kernel.numpy(), direct.kernel.numpy())
