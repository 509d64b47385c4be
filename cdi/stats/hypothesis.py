"""The dataset-inference test: a one-sided test (Welch or permutation) on out-of-fold scores.

Method section 5, steps 3-4. H1 is directional: mean score(P) > mean score(U).
The reference code runs a two-sided test and ignores the direction flag, so a significant
difference in the wrong direction counts as detection and a right-direction p is doubled;
cdi is one-sided.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score

from cdi.stats.effect import effect_size, per_feature_auc
from cdi.stats.permutation import check_permutation_options, cross_fitted_permutation_test
from cdi.stats.scoring import (
    CrossFittedScorer,
    check_alpha,
    FeatureValueError,
    OptionValueError,
)

log = logging.getLogger(__name__)

#: The tests, by the one name the CLI, the result JSON, params and the report use.
TESTS = ("welch", "permutation")


@dataclass(frozen=True, kw_only=True)
class TestResult:
    """Outcome of a hypothesis test on membership scores."""

    __test__ = False  # not a pytest test class despite the name

    test: str = "welch"  # or "permutation"
    statistic: float
    p_value: float
    df: float
    alternative: str = "greater"


def _check_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or scores.size < 2:
        raise FeatureValueError(
            f"{name} must be a 1-D array of at least 2 scores, got shape {scores.shape}"
        )
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))
        raise FeatureValueError(f"{name} has non-finite values at positions {bad[:5].tolist()}")
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
    """Cross-fitted scoring of P vs U followed by a one-sided test; verdict at `alpha`.

    `test="welch"` (default, the paper's protocol): one-sided Welch t-test on the out-of-fold
    scores. It treats them as independent; they are not (each fold model was trained on the other
    folds' images), and under H0 the false-positive rate measured about 1.5-2.7x alpha
    (tests/stats/test_hypothesis.py). Read its p_value_ as the paper's statistic.

    `test="permutation"`: the whole cross-fitted pipeline is re-run on `n_permutations` label
    permutations (folds drawn as the original) and the observed Welch t of the out-of-fold scores
    is ranked among theirs, p = (1 + #{T_b >= T}) / (1 + B) >= 1 / (1 + B); exact under
    exchangeability of P and U (see cdi.stats.permutation). `n_jobs` parallelises it (joblib).

    Attributes (after fit): `scores_` out-of-fold P(member) per image, `result_` the TestResult,
    `statistic_`, `p_value_`, `df_` (NaN for the permutation test), `auc_` (ROC AUC of `scores_`,
    P vs U), `coef_` (mean standardised logistic coefficients), `verdict_` ("used" if p_value_ <
    alpha else "not_detected"), `scorer_` the fitted CrossFittedScorer, `effect_size_` (Hedges' g of
    `scores_` with a 95 % percentile bootstrap CI of 1000 resamples), `feature_auc_` (single-feature
    AUC, P vs U, per column), `permutation_statistics_` (the B null Welch t statistics; None for
    the Welch test). For the permutation test `statistic_` comes from exactly converged fits and
    may differ from the Welch t of `scores_` (lbfgs at its default tolerance) by ~1e-2.
    """

    def __init__(
        self,
        n_splits: int = 5,
        C: float = 1.0,
        penalty: str | None = "l2",
        max_iter: int = 1000,
        alpha: float = 0.01,
        random_state: int | None = 0,
        test: str = "welch",
        n_permutations: int = 1000,
        n_jobs: int | None = None,
    ) -> None:
        self.n_splits = n_splits
        self.C = C
        self.penalty = penalty
        self.max_iter = max_iter
        self.alpha = alpha
        self.random_state = random_state
        self.test = test
        self.n_permutations = n_permutations
        self.n_jobs = n_jobs

    def check_params(self) -> None:
        check_alpha(self.alpha)
        if self.test not in TESTS:
            raise OptionValueError(f"test must be one of {TESTS}, got {self.test!r}")
        if self.test != "permutation":
            return
        check_permutation_options(self.n_permutations, "welch")
        smallest_p = 1.0 / (1 + self.n_permutations)
        if smallest_p >= self.alpha:
            log.warning(
                "n_permutations=%s: the smallest permutation p-value 1/(1 + B) = %.3g is not below "
                "alpha = %s, so the test can never reject; use B >= %d",
                self.n_permutations, smallest_p, self.alpha, int(np.ceil(1.0 / self.alpha)),
            )

    def run_test(self, X, y, scores=None) -> tuple[TestResult, np.ndarray | None]:
        """The test alone (no effect sizes): its TestResult and, if permutation, null statistics.

        `scores` are the out-of-fold scores when the caller has them already (Welch only).
        """
        if self.test == "welch":
            if scores is None:
                scores = self._scorer().fit(X, y).oof_scores_
            y = np.asarray(y).astype(int)
            return welch_one_sided(scores[y == 1], scores[y == 0]), None
        statistic, permutation_statistics, p_value = cross_fitted_permutation_test(
            X,
            y,
            statistic="welch",
            n_permutations=self.n_permutations,
            n_splits=self.n_splits,
            C=self.C,
            penalty=self.penalty,
            max_iter=self.max_iter,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
        )
        result = TestResult(
            test="permutation", statistic=statistic, p_value=p_value, df=float("nan")
        )
        return result, permutation_statistics

    def _scorer(self) -> CrossFittedScorer:
        return CrossFittedScorer(
            n_splits=self.n_splits,
            C=self.C,
            penalty=self.penalty,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )

    def fit(self, X, y) -> DatasetInferenceTest:
        """Run the test on features X; y is 1 for suspect (P) and 0 for control (U)."""
        self.check_params()
        scorer = self._scorer().fit(X, y)
        y = np.asarray(y).astype(int)
        scores = scorer.oof_scores_
        result, permutation_statistics = self.run_test(X, y, scores)

        self.scorer_ = scorer
        self.scores_ = scores
        self.coef_ = scorer.coef_
        self.n_features_in_ = scorer.n_features_in_
        self.result_ = result
        self.statistic_ = result.statistic
        self.p_value_ = result.p_value
        self.df_ = result.df
        self.permutation_statistics_ = permutation_statistics
        self.auc_ = float(roc_auc_score(y, scores))
        self.effect_size_ = effect_size(
            scores[y == 1], scores[y == 0], random_state=self.random_state
        )
        self.feature_auc_ = per_feature_auc(X, y)
        self.verdict_ = "used" if result.p_value < self.alpha else "not_detected"
        return self


__all__ = ["DatasetInferenceTest", "TestResult", "welch_one_sided"]
