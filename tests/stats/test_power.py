"""Power curve: per n, the fraction of resamples with p < alpha and the median p."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.stats import DatasetInferenceTest, PowerCurve, default_sizes, power_curve


def _data(n_per_side, d=5, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * n_per_side, d))
    y = np.r_[np.ones(n_per_side, dtype=int), np.zeros(n_per_side, dtype=int)]
    X[y == 1, 0] += shift
    return X, y


def test_power_grows_with_n_and_recommended_n_is_read_off_the_table():
    """Feature 0 shifted by 0.8 sd, pools of 100 a side, Welch at alpha 0.05, 30 resamples per n.
    Measured power 0.30, 0.47, 0.97 at n = 10, 25, 60; asserted: power at 60 >= 0.8, power at 10
    <= 0.6, and each step down by at most 0.1 (resampling noise)."""
    X, y = _data(100, shift=0.8, seed=7)
    curve = power_curve(X, y, sizes=[60, 10, 25], n_resamples=30, alpha=0.05, random_state=1)

    assert isinstance(curve, PowerCurve)
    np.testing.assert_array_equal(curve.n, [10, 25, 60])  # sorted
    assert curve.p_values.shape == (3, 30)
    np.testing.assert_array_equal(curve.power, np.mean(curve.p_values < 0.05, axis=1))
    np.testing.assert_array_equal(curve.median_p, np.median(curve.p_values, axis=1))
    assert curve.power[-1] >= 0.8 and curve.power[0] <= 0.6
    assert np.all(np.diff(curve.power) >= -0.1)
    assert curve.median_p[-1] < curve.median_p[0]
    reached = [n for n, power in zip(curve.n, curve.power) if power >= 0.8]
    assert curve.recommended_n == min(reached)
    assert [row["n"] for row in curve.rows()] == [10, 25, 60]


def test_power_stays_near_alpha_under_h0():
    """P, U i.i.d. (pools of 100, d=5), permutation test B=99 at alpha 0.05 (exact size 0.04),
    50 resamples per n: power <= 0.15 at every n and <= 0.10 on average; no n is recommended."""
    X, y = _data(100, seed=3)
    curve = power_curve(
        X, y, sizes=[10, 20, 40], n_resamples=50, alpha=0.05, test="permutation",
        n_permutations=99, random_state=3,
    )
    assert np.all(curve.power <= 0.15) and curve.power.mean() <= 0.10
    assert np.all(curve.median_p > 0.2)
    assert curve.recommended_n is None


def test_same_seed_same_curve_and_audit_settings_are_reused():
    X, y = _data(20, shift=1.0, seed=4)
    audit = DatasetInferenceTest(n_splits=3, alpha=0.05, random_state=9)
    first = power_curve(X, y, sizes=[6, 12], n_resamples=5, **audit.get_params())
    again = power_curve(X, y, sizes=[6, 12], n_resamples=5, **audit.get_params())
    np.testing.assert_array_equal(first.p_values, again.p_values)
    assert first.alpha == 0.05 and first.test == "welch"


def test_default_sizes_run_geometrically_from_2_n_splits_to_the_smaller_set():
    sizes = default_sizes(100, 120, n_splits=5)
    assert sizes[0] == 10 and sizes[-1] == 100 and len(sizes) == 5
    assert np.all(np.diff(np.log(sizes)) == pytest.approx(np.log(10) / 4, abs=0.1))
    np.testing.assert_array_equal(default_sizes(7, 30, n_splits=5), [7])


@pytest.mark.parametrize("sizes", [[4, 10], [10, 21], [2.5]])
def test_sizes_outside_n_splits_and_the_smaller_set_are_rejected(sizes):
    X, y = _data(20, seed=5)
    with pytest.raises(ValueError, match="sizes"):
        power_curve(X, y, sizes=sizes, n_resamples=2)
