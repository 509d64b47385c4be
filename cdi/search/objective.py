"""The quantity a search maximises: detection power on calibration data, from cached features.

Calibration data are images whose membership is known (members vs non-members of a reference model,
by default the bundled demo) or a seeded held-out part of an owner's P and U. A trial scores its
feature subset on `n_resamples` seeded resamples of `n` images per side (the same resamples for
every trial, so trials are compared on common random numbers): cross-fitted scores, one-sided Welch
test (method doc, section 5). The objective is the mean of -log10 p (higher = stronger detection);
power at alpha (fraction of resamples with p < alpha) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cdi.errors import OptionError
from cdi.stats import CrossFittedScorer, welch_one_sided

#: p-values are clipped here before the log so that a perfect separation stays finite.
P_FLOOR = 1e-300


@dataclass
class CalibrationData:
    """Features of the calibration images: X (n, d) over `names`, y (1 member/P, 0 non-member/U)."""

    X: np.ndarray
    y: np.ndarray
    names: tuple[str, ...]
    sha256: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    def columns(self, features: Sequence[str]) -> np.ndarray:
        index = {name: j for j, name in enumerate(self.names)}
        missing = [f for f in features if f not in index]
        if missing:
            raise OptionError(f"calibration features lack {', '.join(missing)}; extract them first")
        return self.X[:, [index[f] for f in features]]


@dataclass(frozen=True)
class Score:
    strength: float  # mean -log10 p over resamples (maximised)
    power: float  # fraction of resamples with p < alpha
    median_p: float


def resamples(y: np.ndarray, n: int, n_resamples: int, seed: int) -> list[np.ndarray]:
    """`n_resamples` index sets of n images per side, drawn without replacement (seeded)."""
    members, nonmembers = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n = min(n, members.size, nonmembers.size)
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.choice(members, n, replace=False), rng.choice(nonmembers, n, replace=False)])
            for _ in range(n_resamples)]


def detection_score(X: np.ndarray, y: np.ndarray, draws: Sequence[np.ndarray], *, C: float, penalty: str,
                    folds: int, alpha: float = 0.01, seed: int = 0) -> Score:
    """Welch p of the cross-fitted pipeline on every resample, summarised."""
    p_values = []
    for r, rows in enumerate(draws):
        Xr, yr = X[rows], y[rows]
        scores = CrossFittedScorer(n_splits=folds, C=C, penalty=penalty, random_state=seed + r).fit(Xr, yr).oof_scores_
        p_values.append(welch_one_sided(scores[yr == 1], scores[yr == 0]).p_value)
    p = np.asarray(p_values)
    p = np.where(np.isfinite(p), p, 1.0)  # constant scores give NaN: no evidence
    return Score(
        strength=float(np.mean(-np.log10(np.clip(p, P_FLOOR, 1.0)))),
        power=float(np.mean(p < alpha)),
        median_p=float(np.median(p)),
    )


__all__ = ["CalibrationData", "P_FLOOR", "Score", "detection_score", "resamples"]
