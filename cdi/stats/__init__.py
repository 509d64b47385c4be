"""Statistics: cross-fitted membership scores, the one-sided dataset-inference test (Welch or
permutation), effect sizes, power curves, the null check and the distribution-shift guard.

Never imports torch: it works on feature arrays (and, for the shift guard, uint8 pixel arrays) only.
"""

from __future__ import annotations

from cdi.stats.effect import EffectSize, effect_size, hedges_g, per_feature_auc
from cdi.stats.hypothesis import DatasetInferenceTest, TestResult, welch_one_sided
from cdi.stats.null_check import NullCheckResult, null_check
from cdi.stats.permutation import cross_fitted_permutation_test, permutation_p_value
from cdi.stats.power import PowerCurve, default_sizes, power_curve
from cdi.stats.scoring import CrossFittedScorer
from cdi.stats.shift import (
    IMAGE_STATISTIC_NAMES,
    ShiftCheckResult,
    ShiftGuard,
    image_statistics,
    shift_check,
)

__all__ = [
    "IMAGE_STATISTIC_NAMES",
    "CrossFittedScorer",
    "DatasetInferenceTest",
    "EffectSize",
    "NullCheckResult",
    "PowerCurve",
    "ShiftCheckResult",
    "ShiftGuard",
    "TestResult",
    "cross_fitted_permutation_test",
    "default_sizes",
    "effect_size",
    "hedges_g",
    "image_statistics",
    "null_check",
    "per_feature_auc",
    "permutation_p_value",
    "power_curve",
    "shift_check",
    "welch_one_sided",
]
