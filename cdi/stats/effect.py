"""Effect sizes for reports: Hedges' g of the out-of-fold scores with a bootstrap CI, and the
single-image ROC AUC of each feature (method section 6).

A p-value says whether P scores higher than U; the effect size says by how much, in pooled
standard deviations, and does not shrink towards 0 as the sets grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from cdi.stats.scoring import FeatureValueError, is_positive_integer, OptionValueError


@dataclass(frozen=True, kw_only=True)
class EffectSize:
    """Hedges' g of scores P vs U and its percentile bootstrap confidence interval."""

    hedges_g: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int


def _hedges_g_rows(suspect: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Hedges' g per row of (m, n_suspect) and (m, n_control) arrays.

    g = J * (mean_P - mean_U) / s_pooled, s_pooled^2 = ((n_P - 1) s_P^2 + (n_U - 1) s_U^2)
    / (n_P + n_U - 2), J = 1 - 3 / (4 (n_P + n_U) - 9) (Hedges 1981, small-sample correction).
    Zero pooled spread gives 0 when the means are equal and +-inf otherwise.
    """
    n_suspect, n_control = suspect.shape[1], control.shape[1]
    difference = suspect.mean(axis=1) - control.mean(axis=1)
    sum_of_squares = (n_suspect - 1) * suspect.var(axis=1, ddof=1) + (n_control - 1) * control.var(
        axis=1, ddof=1
    )
    pooled = np.sqrt(sum_of_squares / (n_suspect + n_control - 2))
    correction = 1.0 - 3.0 / (4.0 * (n_suspect + n_control) - 9.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = correction * difference / pooled
    g[(pooled == 0.0) & (difference == 0.0)] = 0.0
    return g


def _check_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or scores.size < 2 or not np.isfinite(scores).all():
        raise FeatureValueError(
            f"{name} must be a 1-D array of at least 2 finite scores, got shape {scores.shape}"
        )
    return scores


def hedges_g(scores_suspect, scores_control) -> float:
    """Hedges' g (bias-corrected standardised mean difference) of scores P minus U."""
    suspect = _check_scores(scores_suspect, "scores_suspect")
    control = _check_scores(scores_control, "scores_control")
    return float(_hedges_g_rows(suspect[None, :], control[None, :])[0])


def effect_size(
    scores_suspect,
    scores_control,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    random_state: int | None = 0,
) -> EffectSize:
    """Hedges' g with a percentile bootstrap CI; P and U are resampled separately (stratified).

    The bootstrap resamples the given scores; it does not refit the cross-fitted classifier.
    """
    suspect = _check_scores(scores_suspect, "scores_suspect")
    control = _check_scores(scores_control, "scores_control")
    if not is_positive_integer(n_resamples):
        raise OptionValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise OptionValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(random_state)
    resampled_suspect = suspect[rng.integers(0, suspect.size, (n_resamples, suspect.size))]
    resampled_control = control[rng.integers(0, control.size, (n_resamples, control.size))]
    boot = _hedges_g_rows(resampled_suspect, resampled_control)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return EffectSize(
        hedges_g=hedges_g(suspect, control),
        ci_low=float(low),
        ci_high=float(high),
        confidence=float(confidence),
        n_resamples=int(n_resamples),
    )


def per_feature_auc(X, y) -> np.ndarray:
    """ROC AUC of each feature column alone, P (y=1) vs U (y=0); ties count 1/2.

    0.5 is chance; below 0.5 the feature is lower on P. Mann-Whitney U / (n_P n_U) on mid-ranks.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise FeatureValueError(
            f"X must be (n_images, n_features) and y (n_images,), got {X.shape} and {y.shape}"
        )
    suspect = y == 1
    n_suspect, n_control = int(suspect.sum()), int((y == 0).sum())
    if n_suspect + n_control != y.size or n_suspect == 0 or n_control == 0:
        raise FeatureValueError(
            "y must hold 1 for suspect (P) and 0 for control (U), both present"
        )
    ranks = stats.rankdata(X, axis=0)
    return (ranks[suspect].sum(axis=0) - n_suspect * (n_suspect + 1) / 2) / (n_suspect * n_control)


__all__ = ["EffectSize", "effect_size", "hedges_g", "per_feature_auc"]
