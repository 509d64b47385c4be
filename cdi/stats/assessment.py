"""Everything an audit concludes from its features: the test, and the checks that make it defensible.

- the test itself (cross-fitted scorer, Welch statistic; exact permutation p-value by default);
- the paper's Welch p-value of the same scores, kept for comparison with published numbers;
- the null check (two random halves of U through the whole pipeline);
- the distribution-shift guard (model-free image statistics, P vs U);
- effect size with bootstrap CI, per-feature AUC, standardised coefficients;
- the power curve and the recommended set size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cdi.stats.hypothesis import DatasetInferenceTest, welch_one_sided
from cdi.stats.null_check import NullCheckResult, null_check
from cdi.stats.power import PowerCurve, power_curve
from cdi.stats.progress import prefixed
from cdi.stats.shift import shift_check

log = logging.getLogger(__name__)



@dataclass
class Assessment:
    test: DatasetInferenceTest
    test_name: str
    welch_p_value: float
    null: NullCheckResult
    shift: dict[str, Any]
    power: PowerCurve | None
    warnings: list[str] = field(default_factory=list)


def assess(
    X: np.ndarray,
    labels: np.ndarray,
    image_stats: np.ndarray | None,
    *,
    alpha: float = 0.01,
    folds: int = 5,
    seed: int = 0,
    test: str = "permutation",
    n_permutations: int = 1000,
    power_resamples: int = 100,
    C: float = 1.0,
    penalty: str = "l2",
) -> Assessment:
    fitted = DatasetInferenceTest(
        n_splits=folds, C=C, penalty=penalty, alpha=alpha, random_state=seed, test=test, n_permutations=n_permutations
    ).fit(X, labels)
    scores = fitted.scores_
    welch = welch_one_sided(scores[labels == 1], scores[labels == 0])
    with prefixed("null check: "):
        null = null_check(X[labels == 0], **fitted.get_params())
    shift: dict[str, Any]
    if image_stats is None:
        shift = {"auc": None, "p_value": None, "flagged": False, "skipped": True, "reason": "not computed"}
    else:
        try:
            with prefixed("shift check: "):
                found = shift_check(image_stats[labels == 1], image_stats[labels == 0], n_splits=folds,
                                    random_state=seed)
            shift = {"auc": found.auc, "p_value": found.p_value, "flagged": found.flagged, "skipped": False,
                     "reason": None}
        except ValueError as exc:
            shift = {"auc": None, "p_value": None, "flagged": False, "skipped": True, "reason": str(exc)}
    power = None
    if power_resamples > 0:
        # Welch per resample keeps the curve to seconds; it approximates the permutation test's power.
        power = power_curve(X, labels, n_resamples=power_resamples, alpha=alpha, test="welch",
                            random_state=seed, n_splits=folds, C=C, penalty=penalty)
    warnings = []
    if shift["flagged"]:
        warnings.append(
            f"P and U differ in model-free image statistics (shift guard AUC {shift['auc']:.2f}, "
            f"p = {shift['p_value']:.3g}): a 'used' verdict may reflect this distribution shift, not training. "
            "Use a control set from the same source, period and processing as the suspect set."
        )
    if null.flagged:
        warnings.append(
            f"The null check (two random halves of the control set) was significant (p = {null.p_value:.3g}): "
            "the pipeline may be miscalibrated on these data; treat the verdict with caution."
        )
    return Assessment(fitted, test, welch.p_value, null, shift, power, warnings)


def evidence_fields(assessment: Assessment, feature_names: Sequence[str]) -> dict[str, Any]:
    """The result-JSON fields of an assessment beyond the p-value and verdict."""
    fitted, null, power = assessment.test, assessment.null, assessment.power
    effect = fitted.effect_size_
    return {
        "welch_p_value": float(assessment.welch_p_value),
        "null_check": {"p_value": None if null.skipped else float(null.p_value), "flagged": bool(null.flagged),
                       "skipped": bool(null.skipped), "reason": null.reason},
        "shift_check": assessment.shift,
        "effect_size": {"value": float(effect.hedges_g), "ci_low": float(effect.ci_low),
                        "ci_high": float(effect.ci_high), "measure": "hedges_g"},
        "power_curve": power.rows() if power is not None else [],
        "recommended_n": None if power is None or power.recommended_n is None else int(power.recommended_n),
        "feature_auc": {name: float(v) for name, v in zip(feature_names, fitted.feature_auc_)},
        "coefficients": {name: float(v) for name, v in zip(feature_names, fitted.coef_)},
        "warnings": list(assessment.warnings),
    }
