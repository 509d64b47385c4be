"""Calibration of the whole pipeline on a model with known members and non-members.

From features of known members M and non-members N (each image's features computed once):
- null audits: suspect and control both drawn from N, disjoint, scorer retrained each time; the
  false-positive rate at each alpha with an exact (Clopper-Pearson) binomial confidence interval;
- power vs n: suspect from M, control from N;
- power vs contamination r: a fraction r of the suspect set replaced by non-members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import stats

from cdi.stats.hypothesis import DatasetInferenceTest


@dataclass
class CalibrationResult:
    false_positive: list[dict[str, Any]] = field(default_factory=list)  # per test and alpha
    power_vs_n: list[dict[str, Any]] = field(default_factory=list)
    power_vs_contamination: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _p_value(X_s: np.ndarray, X_c: np.ndarray, test: str, n_permutations: int, seed: int, folds: int) -> float:
    X = np.vstack([X_s, X_c])
    y = np.r_[np.ones(len(X_s), dtype=int), np.zeros(len(X_c), dtype=int)]
    return float(DatasetInferenceTest(n_splits=folds, random_state=seed, test=test,
                                      n_permutations=n_permutations).fit(X, y).p_value_)


def binomial_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def calibrate_features(
    X_members: np.ndarray,
    X_nonmembers: np.ndarray,
    *,
    n_null: int = 500,
    null_size: int | None = None,
    alphas: Sequence[float] = (0.01, 0.05),
    sizes: Sequence[int] | None = None,
    contamination: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    n_resamples: int = 100,
    tests: Sequence[str] = ("welch", "permutation"),
    n_permutations: int = 199,
    folds: int = 5,
    random_state: int = 0,
) -> CalibrationResult:
    rng = np.random.default_rng(random_state)
    n_m, n_n = len(X_members), len(X_nonmembers)
    from cdi.errors import ImageSetError, OptionError

    given = null_size is not None
    null_size = null_size or min(50, n_n // 2)
    if given and (null_size < 2 * folds or 2 * null_size > n_n):
        raise OptionError(f"null_size {null_size}: each null audit takes two disjoint sets of null_size non-members "
                          f"with at least {2 * folds} images each, so it must lie between {2 * folds} and {n_n // 2} "
                          f"for {n_n} non-members")
    if null_size < 2 * folds:
        raise ImageSetError(f"--nonmembers: {n_n} non-member image(s); null audits need at least {4 * folds} "
                            f"(two disjoint halves of {2 * folds}); add non-member images")
    result = CalibrationResult(settings={
        "n_null": n_null, "null_size": null_size, "alphas": list(alphas), "n_resamples": n_resamples,
        "tests": list(tests), "n_permutations": n_permutations, "folds": folds, "random_state": random_state,
        "n_members": n_m, "n_nonmembers": n_n,
    })
    # Null audits: both sets from non-members, disjoint.
    for test in tests:
        p_values = []
        for i in range(n_null):
            order = rng.permutation(n_n)
            s, c = order[:null_size], order[null_size : 2 * null_size]
            p_values.append(_p_value(X_nonmembers[s], X_nonmembers[c], test, n_permutations, i, folds))
        p_values = np.asarray(p_values)
        for alpha in alphas:
            k = int((p_values < alpha).sum())
            low, high = binomial_ci(k, n_null)
            result.false_positive.append({"test": test, "alpha": alpha, "rejections": k, "n_audits": n_null,
                                          "rate": k / n_null, "ci_low": low, "ci_high": high})
    max_n = min(n_m, n_n // 2)
    sizes = sorted(set(int(n) for n in (sizes or np.unique(np.geomspace(2 * folds, max_n, 5).astype(int)))))
    main_test, alpha = tests[0], alphas[0]

    def power_at(n: int, r: float) -> dict[str, Any]:
        p_values = []
        for i in range(n_resamples):
            n_bad = int(round(r * n))
            members = rng.choice(n_m, n - n_bad, replace=False)
            order = rng.permutation(n_n)
            impostors, control = order[:n_bad], order[n_bad : n_bad + n]
            suspect = np.vstack([X_members[members], X_nonmembers[impostors]])
            p_values.append(_p_value(suspect, X_nonmembers[control], main_test, n_permutations, i, folds))
        p_values = np.asarray(p_values)
        return {"n": n, "contamination": r, "test": main_test, "alpha": alpha,
                "power": float((p_values < alpha).mean()), "median_p": float(np.median(p_values))}

    result.power_vs_n = [power_at(n, 0.0) for n in sizes if n <= max_n]
    n_fixed = sizes[-1] if sizes else max_n
    result.power_vs_contamination = [power_at(n_fixed, r) for r in contamination]
    return result
