"""Permutation test of the whole cross-fitted pipeline: formula, seeding, size under H0, power."""

from __future__ import annotations

import math

import joblib
import numpy as np
import pytest
from builders import labelled_gaussians as _data
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from cdi.stats import (
    DatasetInferenceTest,
    cross_fitted_permutation_test,
    permutation_p_value,
)


def _reference_welch_t(X, labels, fold_ids, n_splits=5):
    """Plain loop: per fold StandardScaler + tightly converged L2 logistic regression, then the
    textbook Welch t of the out-of-fold scores (label 1 minus label 0)."""
    scores = np.empty(len(labels))
    for fold in range(n_splits):
        train, held_out = fold_ids != fold, fold_ids == fold
        scaler = StandardScaler().fit(X[train])
        model = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000)
        model.fit(scaler.transform(X[train]), labels[train])
        scores[held_out] = model.predict_proba(scaler.transform(X[held_out]))[:, 1]
    a, b = scores[labels == 1], scores[labels == 0]
    return (a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)


# --- the p-value -------------------------------------------------------------------------------


def test_p_value_formula_counts_ties_as_at_least_as_extreme():
    # (1 + #{T_b >= 2}) / (1 + B) with null [1, 2, 3, 0, 2]: (1 + 3) / 6
    assert permutation_p_value(2.0, [1.0, 2.0, 3.0, 0.0, 2.0]) == pytest.approx(4 / 6)
    assert permutation_p_value(9.0, [1.0, 2.0, 3.0]) == pytest.approx(1 / 4)  # the lower bound
    assert permutation_p_value(-9.0, [1.0, 2.0, 3.0]) == 1.0


def test_obvious_difference_reaches_the_lower_bound_1_over_1_plus_b():
    X, y = _data(20, 20, shift=6.0, seed=1)
    statistic, null, p_value = cross_fitted_permutation_test(X, y, n_permutations=49)
    assert null.shape == (49,)
    assert p_value == 1 / 50
    assert statistic > null.max()
    assert p_value == (1 + np.sum(null >= statistic)) / (1 + null.size)


def test_same_seed_same_p_and_n_jobs_does_not_change_the_result():
    X, y = _data(25, 30, seed=2)
    first = cross_fitted_permutation_test(X, y, n_permutations=120, random_state=5)
    again = cross_fitted_permutation_test(X, y, n_permutations=120, random_state=5)
    with joblib.parallel_config(backend="threading"):  # cheap workers; loky gives the same
        parallel = cross_fitted_permutation_test(
            X, y, n_permutations=120, random_state=5, n_jobs=2
        )
    other = cross_fitted_permutation_test(X, y, n_permutations=120, random_state=6)
    assert first[2] == again[2] == parallel[2]
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_allclose(first[1], parallel[1], rtol=0, atol=1e-12)
    assert not np.array_equal(first[1], other[1])


def test_every_statistic_re_runs_the_whole_cross_fitted_pipeline():
    """Observed and null statistics equal a plain per-fold refit (scaler + logistic regression)
    with the labels and folds shuffled together as documented; tolerance 1e-6 on t."""
    X, y = _data(18, 22, d=4, shift=0.5, seed=3)
    X[:, 2] = X[:, 2] * 30.0 + 5.0  # scale differences make the per-fold standardisation matter
    random_state = 7
    statistic, null, _ = cross_fitted_permutation_test(
        X, y, n_permutations=3, random_state=random_state
    )

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=random_state)
    fold_ids = np.empty(len(y), dtype=int)
    for fold, (_, held_out) in enumerate(folds.split(X, y)):
        fold_ids[held_out] = fold
    assert statistic == pytest.approx(_reference_welch_t(X, y, fold_ids), abs=1e-6)
    # the documented seeding: B permutations from default_rng(random_state), drawn up front
    rng = np.random.default_rng(random_state)
    permutations = rng.permuted(np.tile(np.arange(len(y)), (3, 1)), axis=1)
    for b, permutation in enumerate(permutations):
        labels, permuted_folds = y[permutation], fold_ids[permutation]
        for fold in range(5):  # the permuted folds are still class-balanced
            counts = [np.sum((permuted_folds == fold) & (labels == c)) for c in (0, 1)]
            assert abs(counts[0] - 22 / 5) < 1 and abs(counts[1] - 18 / 5) < 1
        reference = _reference_welch_t(X, labels, permuted_folds)
        assert null[b] == pytest.approx(reference, abs=1e-6)


def test_estimator_runs_the_permutation_test_and_keeps_the_welch_default():
    X, y = _data(25, 25, shift=1.0, seed=4)
    assert DatasetInferenceTest().test == "welch"
    audit = DatasetInferenceTest(test="permutation", n_permutations=99, alpha=0.05).fit(X, y)
    statistic, null, p_value = cross_fitted_permutation_test(X, y, n_permutations=99)
    assert audit.p_value_ == p_value and audit.statistic_ == statistic
    np.testing.assert_array_equal(audit.permutation_statistics_, null)
    assert (audit.result_.test, audit.result_.alternative) == ("permutation", "greater")
    assert math.isnan(audit.df_)
    assert audit.verdict_ == ("used" if p_value < 0.05 else "not_detected")
    # the observed t is the Welch t of the out-of-fold scores (up to lbfgs' default tolerance)
    scores = audit.scores_
    welch_t = stats.ttest_ind(scores[y == 1], scores[y == 0], equal_var=False).statistic
    assert statistic == pytest.approx(welch_t, rel=1e-2)
    assert DatasetInferenceTest().fit(X, y).permutation_statistics_ is None


def test_other_penalties_use_the_same_definition():
    X, y = _data(15, 15, d=3, shift=3.0, seed=5)
    statistic, null, p_value = cross_fitted_permutation_test(X, y, penalty="l1", n_permutations=9)
    assert null.shape == (9,) and np.isfinite(null).all()
    assert p_value == 0.1  # 1 / (1 + 9): a 3 sd shift beats every permutation


@pytest.mark.parametrize(
    ("params", "option"),
    [({"test": "t"}, "test"), ({"test": "permutation", "n_permutations": 0}, "n_permutations")],
)
def test_invalid_test_options_are_rejected(params, option):
    X, y = _data(10, 10, seed=6)
    with pytest.raises(ValueError, match=option):
        DatasetInferenceTest(**params).fit(X, y)


# --- statistical behaviour (seeded; tolerances stated) ------------------------------------------


def test_false_positive_rate_under_h0_is_within_the_binomial_band():
    """H0: P, U i.i.d. N(0, I), 15 a side, d=3, B=99; 1000 seeds; verdict p < 0.05.

    With B=99 the exact size of p < 0.05 is 4/100 = 0.04 (p takes values k/100), so the
    rejections must fall in the 99 % binomial band of Binom(1000, 0.04), [25, 57]. The Welch test
    on the same seeds rejects 73 times (0.073): this test tells the two apart.
    """
    reps, alpha, n_permutations = 1000, 0.05, 99
    size = math.ceil(alpha * (n_permutations + 1) - 1) / (n_permutations + 1)
    rejections = 0
    for seed in range(reps):
        X, y = _data(15, 15, d=3, seed=seed)
        _, _, p_value = cross_fitted_permutation_test(
            X, y, n_permutations=n_permutations, random_state=seed
        )
        rejections += p_value < alpha
    low, high = stats.binom.ppf([0.005, 0.995], reps, size)
    assert low <= rejections <= high, f"{rejections}/{reps} rejected, band [{low:.0f}, {high:.0f}]"


def test_power_under_h1_one_feature_shifted_by_one_sd():
    """H1: feature 0 of P shifted by 1 sd, 40 a side, d=5, B=99; 30 seeds; power at 0.05 >= 0.8.

    (Measured 0.91 over 100 seeds. Note p < alpha needs (1 + #exceed) / (1 + B) < alpha: at
    alpha = 0.01 use B >= 199, and B = 199 then demands that no permutation reaches T.)
    """
    detected = 0
    for seed in range(30):
        X, y = _data(40, 40, shift=1.0, seed=2000 + seed)
        _, _, p_value = cross_fitted_permutation_test(X, y, n_permutations=99, random_state=seed)
        detected += p_value < 0.05
    assert detected / 30 >= 0.8
