"""The calibration harness on synthetic features with known members."""

from __future__ import annotations

import numpy as np

from cdi.stats.error_rates import binomial_ci, calibrate_features


def test_calibration_reports_nominal_false_positives_and_power_that_falls_with_contamination():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(60, 4))
    members[:, 0] += 1.2  # members are separable on one feature
    nonmembers = rng.normal(size=(120, 4))
    result = calibrate_features(members, nonmembers, n_null=200, null_size=30, alphas=(0.05,), sizes=[30],
                                contamination=(0.0, 0.75), n_resamples=30, tests=("welch",), random_state=1)
    (fp,) = result.false_positive
    # 99 % binomial band around the nominal 0.05 for 200 null audits; Welch may sit a little high.
    assert fp["rejections"] <= 200 * 0.05 + 3 * np.sqrt(200 * 0.05 * 0.95) + 6
    assert fp["ci_low"] <= fp["rate"] <= fp["ci_high"]
    clean, dirty = result.power_vs_contamination
    assert clean["power"] >= 0.8 and dirty["power"] < clean["power"]


def test_binomial_ci_is_exact_clopper_pearson():
    low, high = binomial_ci(0, 500)
    assert low == 0.0 and abs(high - (1 - 0.025 ** (1 / 500))) < 1e-9
