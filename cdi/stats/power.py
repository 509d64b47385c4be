"""Power curve: how often the whole pipeline detects at alpha with n images of P and n of U.

The paper summarises resamples by the mean p-value and calls "samples needed" the smallest n with
mean p <= 0.01. An owner gets one draw, so cdi reports, per n, the power (fraction of resamples
with p < alpha) and the median p, and recommends the smallest n with power >= 0.8 (method
section 5, "known weaknesses").

Resamples are subsets of the same P and U, so they are not independent: near n = min(|P|, |U|)
they overlap almost entirely and the power there says little beyond the full-set verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed

from cdi.stats.hypothesis import DatasetInferenceTest
from cdi.stats.progress import report, reporting
from cdi.stats.scoring import FeatureValueError, is_positive_integer, OptionValueError


@dataclass(frozen=True, kw_only=True)
class PowerCurve:
    """Per sample size n (images per side): median p, power at alpha, all p-values."""

    n: np.ndarray  # (S,) images of P and of U per resample
    median_p: np.ndarray  # (S,)
    power: np.ndarray  # (S,) fraction of resamples with p < alpha
    p_values: np.ndarray  # (S, n_resamples)
    alpha: float
    test: str
    n_resamples: int
    target_power: float
    recommended_n: int | None  # smallest n with power >= target_power, None if none

    def rows(self) -> list[dict[str, float]]:
        """One {n, median_p, power} dict per sample size, for tables and tracking."""
        return [
            {"n": int(n), "median_p": float(m), "power": float(p)}
            for n, m, p in zip(self.n, self.median_p, self.power)
        ]


def default_sizes(n_suspect: int, n_control: int, n_splits: int = 5, count: int = 5) -> np.ndarray:
    """A geometric grid of `count` sizes from 2 * n_splits to min(|P|, |U|) (fewer if they tie)."""
    high = min(n_suspect, n_control)
    low = min(2 * n_splits, high)
    return np.unique(np.round(np.geomspace(low, high, count)).astype(int))


def _p_value(X, y, params) -> float:
    """p-value of the whole pipeline on one resample (no effect sizes: they are not needed)."""
    result, _ = DatasetInferenceTest(**params).run_test(X, y)
    return result.p_value


def _silenced(runs):
    """Yield from `runs` with progress reports of each resample's own fit silenced."""
    iterator = iter(runs)
    while True:
        with reporting(None):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def power_curve(
    X,
    y,
    sizes=None,
    *,
    n_resamples: int = 100,
    alpha: float = 0.01,
    test: str = "welch",
    target_power: float = 0.8,
    random_state: int | None = 0,
    n_jobs: int | None = None,
    **params,
) -> PowerCurve:
    """Power and median p of DatasetInferenceTest(test, alpha, **params) per sample size.

    For each n in `sizes` (default: `default_sizes`), `n_resamples` times: draw n images of P and n
    of U without replacement and run the whole pipeline (cross-fitting with folds seeded afresh,
    then the test). `params` are further DatasetInferenceTest parameters (`**audit.get_params()`
    reuses an audit's settings). Everything is seeded by `random_state`; resamples run in parallel
    with joblib (`n_jobs`: None one process, -1 all cores), each test single-threaded.
    """
    template = DatasetInferenceTest(alpha=alpha, test=test, **params)
    template.check_params()
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    suspect, control = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if X.ndim != 2 or y.shape != (X.shape[0],) or suspect.size + control.size != y.size:
        raise FeatureValueError(
            f"X must be (n_images, n_features) and y (n_images,) of 1 (P) and 0 (U), got "
            f"{X.shape} and {y.shape}"
        )
    n_splits = template.n_splits
    largest = min(suspect.size, control.size)
    sizes = default_sizes(suspect.size, control.size, n_splits) if sizes is None else sizes
    sizes = np.unique(np.asarray(sizes))  # sorted, once each
    if (
        sizes.ndim != 1
        or sizes.size == 0
        or not np.issubdtype(sizes.dtype, np.integer)
        or sizes.min() < n_splits
        or sizes.max() > largest
    ):
        raise OptionValueError(
            f"sizes must be integers between n_splits={n_splits} and min(|P|, |U|)={largest}, "
            f"got {sizes.tolist()}"
        )
    if not is_positive_integer(n_resamples):
        raise OptionValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0.0 < target_power <= 1.0:
        raise OptionValueError(f"target_power must be in (0, 1], got {target_power!r}")

    # Every draw is made here, up front, so the result does not depend on n_jobs.
    rng = np.random.default_rng(random_state)
    tasks = []
    for n in sizes:
        for _ in range(n_resamples):
            rows = np.r_[
                rng.choice(suspect, n, replace=False), rng.choice(control, n, replace=False)
            ]
            seed = int(rng.integers(2**31 - 1))
            tasks.append((rows, {**template.get_params(), "random_state": seed, "n_jobs": None}))
    jobs = (delayed(_p_value)(X[rows], y[rows], task_params) for rows, task_params in tasks)
    if n_jobs in (None, 1):
        runs = (job[0](*job[1], **job[2]) for job in jobs)
    else:
        runs = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)  # in order, as they finish
    p_values = []
    for p_value in _silenced(runs):
        p_values.append(p_value)
        report("power curve", len(p_values), len(tasks), "resamples")
    p_values = np.asarray(p_values, dtype=float).reshape(len(sizes), n_resamples)

    power = np.mean(p_values < alpha, axis=1)
    reached = np.flatnonzero(power >= target_power)
    return PowerCurve(
        n=sizes.astype(int),
        median_p=np.median(p_values, axis=1),
        power=power,
        p_values=p_values,
        alpha=float(alpha),
        test=test,
        n_resamples=int(n_resamples),
        target_power=float(target_power),
        recommended_n=int(sizes[reached].min()) if reached.size else None,
    )


__all__ = ["PowerCurve", "default_sizes", "power_curve"]
