"""LDS, LOO correlation and mislabel detection against cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from influencekit.curvature import HessianOperator
from influencekit.evaluation import (
    PerSubsetTrainer,
    detection_auc,
    flip_labels,
    fraction_found,
    group_effects,
    leave_one_out_correlation,
    leave_one_out_effects,
    linear_datamodeling_score,
    mislabel_detection,
    rowwise_spearman,
    subset_masks,
    subset_outputs,
)
from influencekit.scores.influence import InfluenceFunction
from influencekit.solvers import DirectSolver
from influencekit.objectives.torch_objective import TorchObjective


def test_subset_masks_sizes_and_seeding():
    masks = subset_masks(40, 6, 0.25, seed=3)
    assert masks.shape == (6, 40) and (masks.sum(1) == 10).all()
    np.testing.assert_array_equal(masks[:4], subset_masks(40, 4, 0.25, seed=3))
    assert not np.array_equal(masks, subset_masks(40, 6, 0.25, seed=4))
    with pytest.raises(ValueError, match="fraction"):
        subset_masks(40, 6, 1.0, seed=0)


def test_rowwise_spearman_matches_scipy():
    import scipy.stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    b[0] = a[0] ** 3  # monotone: 1
    a[1, :10] = 0.0  # ties
    expected = [scipy.stats.spearmanr(a[i], b[i])[0] for i in range(5)]
    np.testing.assert_allclose(rowwise_spearman(a, b), expected, atol=1e-12)
    assert rowwise_spearman(a, b)[0] == pytest.approx(1.0)


def test_lds_of_the_true_additive_effects_is_one_and_its_negation_minus_one():
    rng = np.random.default_rng(1)
    n, m = 60, 7
    tau = rng.normal(size=(m, n))
    masks = subset_masks(n, 30, 0.5, seed=0)
    actual = 3.0 + group_effects(tau, masks)  # a model whose outputs are exactly additive
    result = linear_datamodeling_score(tau, masks, actual, n_bootstrap=50)
    assert result.lds == pytest.approx(1.0)
    assert result.ci == pytest.approx((1.0, 1.0))
    assert linear_datamodeling_score(-tau, masks, actual, n_bootstrap=0).lds == pytest.approx(-1.0)


def test_lds_of_a_random_scorer_is_near_zero_and_its_interval_covers_zero():
    rng = np.random.default_rng(2)
    n, m, num_subsets = 80, 200, 40
    masks = subset_masks(n, num_subsets, 0.5, seed=0)
    actual = group_effects(rng.normal(size=(m, n)), masks)
    result = linear_datamodeling_score(rng.normal(size=(m, n)), masks, actual, n_bootstrap=200, seed=1)
    # mean of m independent correlations over M subsets: sd about 1 / sqrt(m (M - 1))
    assert abs(result.lds) < 4 / math.sqrt(m * (num_subsets - 1))
    assert result.ci[0] < 0 < result.ci[1]
    assert result.ci_test_points[0] < result.lds < result.ci_test_points[1]


def _ridge_setting(weight_decay: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d, m = 40, 3, 5
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    x_test = rng.normal(size=(m, d))
    y_test = x_test @ rng.normal(size=d)
    return x, y, x_test, y_test, weight_decay


class _RidgeTrainer:
    """Exact refit of R(w) = mean 0.5 (x w - y)^2 + (lambda/2)||w||^2 on each subset; output: test squared error."""

    def __init__(self, x, y, x_test, y_test, weight_decay):
        self.x, self.y, self.x_test, self.y_test, self.weight_decay = x, y, x_test, y_test, weight_decay

    def fit(self, indices: np.ndarray) -> np.ndarray:
        xs, ys = self.x[indices], self.y[indices]
        k = len(indices)
        return np.linalg.solve(xs.T @ xs / k + self.weight_decay * np.eye(xs.shape[1]), xs.T @ ys / k)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return 0.5 * (self.x_test @ self.fit(indices) - self.y_test) ** 2


def _ridge_influence(setting) -> np.ndarray:
    """I_up,loss (m, n) with the package's InfluenceFunction and the exact Hessian of the ridge objective."""
    x, y, x_test, y_test, weight_decay = setting
    model = torch.nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(_RidgeTrainer(*setting).fit(np.arange(len(y))))[None])
    as_batch = lambda a, b: (torch.from_numpy(a), torch.from_numpy(b)[:, None])  # noqa: E731
    objective = TorchObjective(model, "squared_error", as_batch(x, y), weight_decay=weight_decay)
    solver = DirectSolver(HessianOperator(objective).to_dense())
    return InfluenceFunction(objective, solver).scores(as_batch(x_test, y_test)).influence_on_loss.numpy()


def test_lds_of_exact_influence_on_ridge_regression_is_near_one_for_small_groups():
    """Ridge: removing a few points moves w by O(k/n), where first-order influence is accurate."""
    setting = _ridge_setting(weight_decay=0.1)
    trainer = PerSubsetTrainer(_RidgeTrainer(*setting))
    n = len(setting[1])
    masks = subset_masks(n, 40, 0.9, seed=0)  # remove 4 of 40
    actual = subset_outputs(trainer, masks)
    result = linear_datamodeling_score(_ridge_influence(setting), masks, actual, n_bootstrap=0)
    assert result.lds > 0.95
    shuffled = np.random.default_rng(0).permutation(_ridge_influence(setting).T).T
    assert linear_datamodeling_score(shuffled, masks, actual, n_bootstrap=0).lds < 0.5


def test_leave_one_out_correlation_of_exact_influence_on_ridge_and_the_sign():
    setting = _ridge_setting(weight_decay=0.1, seed=1)
    n = len(setting[1])
    removed = np.arange(0, n, 2)
    actual = leave_one_out_effects(PerSubsetTrainer(_RidgeTrainer(*setting)), n, removed)
    predicted = -_ridge_influence(setting)[:, removed] / n  # predicted_loss_change
    result = leave_one_out_correlation(predicted, actual)
    assert result.pearson > 0.98
    assert leave_one_out_correlation(-predicted, actual).pearson < -0.98


def test_subset_outputs_cache_resumes(tmp_path):
    calls = []

    def trainer(masks):
        calls.append(len(masks))
        return masks.astype(float) @ np.arange(masks.shape[1], dtype=float)[:, None]

    masks = subset_masks(10, 5, 0.5, seed=0)
    first = subset_outputs(trainer, masks, cache_dir=tmp_path, fingerprint="t", batch_size=2)
    np.testing.assert_allclose(first[0], masks @ np.arange(10))
    again = subset_outputs(trainer, masks, cache_dir=tmp_path, fingerprint="t", batch_size=2)
    np.testing.assert_array_equal(first, again)
    assert calls == [2, 2, 1]  # the second call trained nothing


def test_flip_labels_changes_exactly_the_requested_fraction_to_other_classes():
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    noisy, flipped = flip_labels(labels, 0.1, 10, seed=0)
    assert flipped.sum() == 100
    assert (noisy[flipped] != labels[flipped]).all() and (noisy[~flipped] == labels[~flipped]).all()
    assert set(np.unique(noisy)) <= set(range(10))


def test_auc_of_a_perfect_an_inverted_and_a_random_scorer():
    rng = np.random.default_rng(5)
    n = 4000
    _, flipped = flip_labels(rng.integers(0, 10, size=n), 0.1, 10, seed=1)
    perfect = flipped + 0.01 * rng.random(n)
    assert detection_auc(perfect, flipped) == 1.0
    assert detection_auc(-perfect, flipped) == 0.0
    assert fraction_found(perfect, flipped, 0.1) == 1.0
    n1, n0 = int(flipped.sum()), int((~flipped).sum())
    sd = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    random_auc = detection_auc(rng.random(n), flipped)
    assert abs(random_auc - 0.5) < 4 * sd
    # inspecting 20% at random finds about 20% of the flipped points (hypergeometric sd < 0.03 here)
    assert abs(fraction_found(rng.random(n), flipped, 0.2) - 0.2) < 0.12


def test_auc_counts_ties_as_half_and_matches_pairwise_definition():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.3, 0.5])
    flipped = np.array([False, True, False, True, False, False])
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores[flipped] for b in scores[~flipped]]
    assert detection_auc(scores, flipped) == pytest.approx(np.mean(pairs))
    result = mislabel_detection(scores, flipped, (0.5,))
    assert result.found == {0.5: 1.0}  # top 3: 0.9, 0.5 (index 1), 0.5 (index 2)


def test_evaluate_lds_with_a_per_subset_trainer_on_dask_free_cache(tmp_path):
    from influencekit.evaluation import evaluate_lds

    tau = np.random.default_rng(3).normal(size=(4, 30))
    trainer = PerSubsetTrainer(lambda indices: tau[:, indices].sum(axis=1))  # exactly additive outputs
    result = evaluate_lds(trainer, tau, num_subsets=12, n_bootstrap=20, cache_dir=tmp_path, fingerprint="additive")
    assert result.lds == pytest.approx(1.0)
    assert evaluate_lds(trainer, tau[:, ::-1], num_subsets=12, n_bootstrap=0).lds < 0.9


def test_lds_intervals_contain_the_estimate_when_it_is_near_one():
    """Re-ranking bootstrap resamples biases a near-perfect Spearman down; resampling rank pairs does not."""
    rng = np.random.default_rng(7)
    n, m, num_subsets = 100, 300, 50
    tau = rng.normal(size=(m, n))
    masks = subset_masks(n, num_subsets, 0.5, seed=0)
    actual = group_effects(tau, masks) + 0.3 * rng.normal(size=(m, num_subsets))
    result = linear_datamodeling_score(tau, masks, actual, n_bootstrap=300, seed=0)
    assert 0.95 < result.lds < 1.0
    for low, high in (result.ci, result.ci_subsets, result.ci_test_points):
        assert low < result.lds < high
