"""Pipeline-level null check: the same test run on two random halves of the control set U.

Both halves are drawn from one set, so H0 holds by construction; a small p-value there means the
pipeline itself (not membership) rejects, e.g. because of the Welch test's anti-conservatism or
structure inside U (duplicates, mixed sources). The reference never retrains the scorer under H0
(method section 5, "known weaknesses").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdi.stats.hypothesis import DatasetInferenceTest


@dataclass(frozen=True, kw_only=True)
class NullCheckResult:
    """Outcome of the null check. `p_value` is None and `flagged` False when it was skipped."""

    p_value: float | None
    flagged: bool
    alpha: float
    test: str
    n_control: int
    skipped: bool = False
    reason: str = ""


def null_check(X_control, *, random_state: int | None = 0, **params) -> NullCheckResult:
    """Split the control features X_control into two random halves and test one against the other.

    `params` are DatasetInferenceTest parameters (pass `audit.get_params()` to reuse an audit's
    settings: test, alpha, n_splits, n_permutations, ...); `random_state` seeds the split and the
    test. Flagged when p < alpha. With fewer than 2 * n_splits controls the check is skipped: the
    result says so in `reason` (no exception).
    """
    estimator = DatasetInferenceTest(random_state=random_state, **params)
    X_control = np.asarray(X_control, dtype=float)
    n_control = X_control.shape[0] if X_control.ndim == 2 else 0
    needed = 2 * estimator.n_splits
    if n_control < needed:
        return NullCheckResult(
            p_value=None,
            flagged=False,
            alpha=estimator.alpha,
            test=estimator.test,
            n_control=n_control,
            skipped=True,
            reason=(
                f"the control set has {n_control} images; the null check needs at least "
                f"2 * n_splits = {needed} to split it into two halves of >= n_splits each"
            ),
        )
    order = np.random.default_rng(random_state).permutation(n_control)
    half = n_control // 2
    y = np.zeros(n_control, dtype=int)
    y[order[:half]] = 1  # the pseudo-suspect half
    estimator.fit(X_control, y)
    return NullCheckResult(
        p_value=float(estimator.p_value_),
        flagged=bool(estimator.p_value_ < estimator.alpha),
        alpha=float(estimator.alpha),
        test=estimator.test,
        n_control=n_control,
    )


__all__ = ["NullCheckResult", "null_check"]
