"""The dataset-inference test: one-sided Welch t-test on out-of-fold scores of P vs U.

Method section 5, steps 3-4. H1 is directional: mean score(P) > mean score(U).
The reference code runs a two-sided test and ignores the direction flag, so a significant
difference in the wrong direction counts as detection and a right-direction p is doubled;
cdi is one-sided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score

from cdi.stats.scoring import CrossFittedScorer, _FeatureValueError, _OptionValueError


@dataclass(frozen=True, kw_only=True)
class TestResult:
    """Outcome of a hypothesis test on membership scores."""

    __test__ = False  # not a pytest test class despite the name

    test: str = "welch"
    statistic: float
    p_value: float
    df: float
    alternative: str = "greater"


def _check_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or scores.size < 2:
        raise _FeatureValueError(
            f"{name} must be a 1-D array of at least 2 scores, got shape {scores.shape}"
        )
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))
        raise _FeatureValueError(f"{name} has non-finite values at positions {bad[:5].tolist()}")
    return scores


def welch_one_sided(scores_suspect, scores_control) -> TestResult:
    """One-sided Welch t-test of H1: mean(scores_suspect) > mean(scores_control).

    Sizes may differ. Degenerate case: when both samples are constant (zero variance) the
    t statistic is 0/0 or x/0, so instead of NaN we return statistic 0 and p_value 1.0 when the
    means are equal (no evidence), statistic +inf and p_value 0.0 when suspect > control, and
    statistic -inf and p_value 1.0 when suspect < control; df is NaN (undefined) in all three.
    """
    suspect = _check_scores(scores_suspect, "scores_suspect")
    control = _check_scores(scores_control, "scores_control")
    # Both samples exactly constant (ptp, not var: var() of a constant may round to ~1e-33).
    if np.ptp(suspect) == 0.0 and np.ptp(control) == 0.0:
        difference = suspect[0] - control[0]
        if difference > 0:
            return TestResult(statistic=float("inf"), p_value=0.0, df=float("nan"))
        statistic = 0.0 if difference == 0 else float("-inf")
        return TestResult(statistic=statistic, p_value=1.0, df=float("nan"))

    result = stats.ttest_ind(suspect, control, equal_var=False, alternative="greater")
    # Welch-Satterthwaite: df = (v_s + v_c)^2 / (v_s^2 / (n_s - 1) + v_c^2 / (n_c - 1)), v = s^2 / n
    v_suspect = suspect.var(ddof=1) / suspect.size
    v_control = control.var(ddof=1) / control.size
    df = (v_suspect + v_control) ** 2 / (
        v_suspect**2 / (suspect.size - 1) + v_control**2 / (control.size - 1)
    )
    return TestResult(statistic=float(result.statistic), p_value=float(result.pvalue), df=float(df))


class DatasetInferenceTest(BaseEstimator):
    """Cross-fitted scoring of P vs U followed by the one-sided Welch test; verdict at `alpha`.

    Attributes (after fit): `scores_` out-of-fold P(member) per image, `result_` the TestResult,
    `statistic_`, `p_value_`, `df_`, `auc_` (ROC AUC of `scores_`, P vs U), `coef_` (mean
    standardised logistic coefficients), `verdict_` ("used" if p_value_ < alpha else
    "not_detected"), `scorer_` the fitted CrossFittedScorer.

    The Welch p-value treats the out-of-fold scores as independent; they are not (each fold model
    was trained on the other folds' images), and under H0 the false-positive rate measured about
    1.5-2.7x alpha (tests/stats/test_hypothesis.py). Read p_value_ as the paper's statistic.
    """

    def __init__(
        self,
        n_splits: int = 5,
        C: float = 1.0,
        penalty: str | None = "l2",
        max_iter: int = 1000,
        alpha: float = 0.01,
        random_state: int | None = 0,
    ) -> None:
        self.n_splits = n_splits
        self.C = C
        self.penalty = penalty
        self.max_iter = max_iter
        self.alpha = alpha
        self.random_state = random_state

    def fit(self, X, y) -> DatasetInferenceTest:
        """Run the test on features X; y is 1 for suspect (P) and 0 for control (U)."""
        alpha = self.alpha
        is_number = isinstance(alpha, (int, float, np.floating)) and not isinstance(alpha, bool)
        if not (is_number and 0.0 < alpha < 1.0):
            raise _OptionValueError(f"alpha must be a number in (0, 1), got {self.alpha!r}")
        scorer = CrossFittedScorer(
            n_splits=self.n_splits,
            C=self.C,
            penalty=self.penalty,
            max_iter=self.max_iter,
            random_state=self.random_state,
        ).fit(X, y)
        y = np.asarray(y).astype(int)
        scores = scorer.oof_scores_
        result = welch_one_sided(scores[y == 1], scores[y == 0])

        self.scorer_ = scorer
        self.scores_ = scores
        self.coef_ = scorer.coef_
        self.n_features_in_ = scorer.n_features_in_
        self.result_ = result
        self.statistic_ = result.statistic
        self.p_value_ = result.p_value
        self.df_ = result.df
        self.auc_ = float(roc_auc_score(y, scores))
        self.verdict_ = "used" if result.p_value < self.alpha else "not_detected"
        return self


__all__ = ["DatasetInferenceTest", "TestResult", "welch_one_sided"]
