"""Null check: the same test on two random halves of the control set must not fire."""

from __future__ import annotations

import numpy as np

from cdi.stats import DatasetInferenceTest, NullCheckResult, null_check


def test_iid_controls_are_not_flagged_for_most_seeds():
    """U: 60 i.i.d. N(0, I) images, d=5; 20 seeds at the default alpha 0.01: at most 2 flagged
    (expected about 0.2-0.4 with Welch's measured size 0.01-0.02)."""
    flagged = 0
    for seed in range(20):
        X_control = np.random.default_rng(seed).standard_normal((60, 5))
        result = null_check(X_control, random_state=seed)
        assert isinstance(result, NullCheckResult) and not result.skipped
        assert 0.0 < result.p_value <= 1.0
        assert result.flagged == (result.p_value < 0.01)
        flagged += result.flagged
    assert flagged <= 2


def test_null_check_runs_the_audits_own_test_settings():
    X_control = np.random.default_rng(1).standard_normal((41, 3))  # odd: halves of 20 and 21
    audit = DatasetInferenceTest(test="permutation", n_permutations=49, alpha=0.05, n_splits=4)
    result = null_check(X_control, **audit.get_params())
    assert (result.test, result.alpha, result.n_control) == ("permutation", 0.05, 41)
    assert result.p_value * 50 == round(result.p_value * 50)  # a permutation p, k / (1 + B)
    assert result == null_check(X_control, **audit.get_params())  # seeded


def test_too_few_controls_skip_the_check_with_a_reason():
    X_control = np.random.default_rng(3).standard_normal((9, 4))
    result = null_check(X_control)  # n_splits=5 needs 10
    assert result.skipped and not result.flagged and result.p_value is None
    assert "9" in result.reason and "2 * n_splits = 10" in result.reason
    assert not null_check(X_control, n_splits=4).skipped
