"""Effect sizes: Hedges' g of the out-of-fold scores with a bootstrap CI, per-feature AUC."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from cdi.stats import DatasetInferenceTest, EffectSize, effect_size, hedges_g, per_feature_auc


def test_hedges_g_equals_the_textbook_formula():
    suspect, control = [0.62, 0.71, 0.55, 0.80, 0.67], [0.48, 0.52, 0.60, 0.41, 0.57, 0.50, 0.45]
    n_s, n_c = len(suspect), len(control)
    mean_s, mean_c = sum(suspect) / n_s, sum(control) / n_c
    ss_s = sum((x - mean_s) ** 2 for x in suspect)
    ss_c = sum((x - mean_c) ** 2 for x in control)
    pooled_sd = math.sqrt((ss_s + ss_c) / (n_s + n_c - 2))
    correction = 1 - 3 / (4 * (n_s + n_c) - 9)
    assert hedges_g(suspect, control) == pytest.approx(correction * (mean_s - mean_c) / pooled_sd)
    assert hedges_g(control, suspect) == pytest.approx(-hedges_g(suspect, control))


def test_bootstrap_ci_covers_the_true_effect_in_a_gaussian_case():
    """N(0.5, 1) vs N(0, 1), 40 a side, true standardised difference 0.5; 400 seeds, 1000
    resamples each: the 95 % CI covers 0.5 at a rate inside the 99 % band of Binom(400, 0.95)."""
    reps, delta = 400, 0.5
    covered = 0
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        result = effect_size(rng.normal(delta, 1, 40), rng.normal(0, 1, 40), random_state=seed)
        assert result.ci_low <= result.hedges_g <= result.ci_high
        covered += result.ci_low <= delta <= result.ci_high
    low, high = stats.binom.ppf([0.005, 0.995], reps, 0.95)
    assert low <= covered <= high, f"coverage {covered}/{reps}, band [{low:.0f}, {high:.0f}]"


def test_bootstrap_is_seeded_and_frozen():
    rng = np.random.default_rng(1)
    suspect, control = rng.normal(0.3, 1, 30), rng.normal(0, 1, 25)
    first = effect_size(suspect, control, random_state=3)
    assert first == effect_size(suspect, control, random_state=3)
    assert first != effect_size(suspect, control, random_state=4)
    assert (first.confidence, first.n_resamples) == (0.95, 1000)
    narrow = effect_size(suspect, control, confidence=0.5, random_state=3)
    assert first.ci_low < narrow.ci_low < narrow.ci_high < first.ci_high
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.hedges_g = 0.0  # type: ignore[misc]


def test_per_feature_auc_matches_a_pairwise_loop_with_ties_counted_half():
    rng = np.random.default_rng(2)
    X = rng.integers(0, 4, size=(23, 3)).astype(float)  # many ties
    X[:, 2] = rng.standard_normal(23)
    y = np.r_[np.ones(10, dtype=int), np.zeros(13, dtype=int)]
    rng.shuffle(y)
    expected = []
    for column in X.T:
        pairs = [(s > c) + 0.5 * (s == c) for s in column[y == 1] for c in column[y == 0]]
        expected.append(sum(pairs) / len(pairs))
    np.testing.assert_allclose(per_feature_auc(X, y), expected, rtol=0, atol=1e-12)


def test_estimator_reports_effect_size_and_feature_auc():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 4))
    y = np.r_[np.ones(30, dtype=int), np.zeros(30, dtype=int)]
    X[y == 1, 1] += 1.5
    audit = DatasetInferenceTest(random_state=2).fit(X, y)
    assert isinstance(audit.effect_size_, EffectSize)
    scores = audit.scores_
    assert audit.effect_size_ == effect_size(scores[y == 1], scores[y == 0], random_state=2)
    assert audit.effect_size_.ci_low > 0
    np.testing.assert_array_equal(audit.feature_auc_, per_feature_auc(X, y))
    assert np.argmax(audit.feature_auc_) == 1
