"""The quantity a search maximises: detection power on calibration data, from cached features.

Calibration data are images whose membership is known (members vs non-members of a reference model,
by default the bundled demo) or a seeded held-out part of an owner's P and U. A trial scores its
feature subset on `n_resamples` seeded resamples of `n` images per side (the same resamples for
every trial, so trials are compared on common random numbers): cross-fitted scores, one-sided Welch
test (method doc, section 5). The objective is the mean of -log10 p (higher = stronger detection);
power at alpha (fraction of resamples with p < alpha) is reported beside it.

A trial may also calibrate the features (`cdi.stats.difficulty.calibrate`: reference models, label-free
difficulty covariates). Each resample is calibrated on its own rows only, as an audit calibrates the
images it audits: the covariate regression is fitted on the resample's 2n pooled images, without labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from cdi.errors import OptionError
from cdi.stats import CrossFittedScorer, welch_one_sided
from cdi.stats.difficulty import DIFFICULTY_COVARIATE_NAMES, WienerNoise, calibrate

#: p-values are clipped here before the log so that a perfect separation stays finite.
P_FLOOR = 1e-300


@dataclass
class CalibrationData:
    """Features of the calibration images: X (n, d) over `names`, y (1 member/P, 0 non-member/U).

    `X_reference`: the same features of the same images on each reference model (same seed and feature
    configuration, so the same noise draws), one (n, d) matrix per model over `names`; `covariates`:
    the label-free difficulty covariates (n, q) of each image (`cdi.stats.difficulty`), or None; `wiener`:
    DL's seeded noise of each image for difficulty mode "image+pca+wiener" (pixel models), or None.
    """

    X: np.ndarray
    y: np.ndarray
    names: tuple[str, ...]
    sha256: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    X_reference: list[np.ndarray] = field(default_factory=list)
    covariates: np.ndarray | None = None
    wiener: WienerNoise | None = None
    #: The difficulty mode of a trial whose search space does not sample one: the audit's default for these
    #: images on this model (`labelled_data`), so that a search scores what the audit will test.
    difficulty_default: str = "off"

    def _index(self, features: Sequence[str]) -> list[int]:
        index = {name: j for j, name in enumerate(self.names)}
        missing = [f for f in features if f not in index]
        if missing:
            raise OptionError(f"calibration features lack {', '.join(missing)}; extract them first")
        return [index[f] for f in features]

    def columns(self, features: Sequence[str]) -> np.ndarray:
        return self.X[:, self._index(features)]

    def reference_columns(self, features: Sequence[str]) -> list[np.ndarray]:
        """The reference models' values of `features`, one matrix per model."""
        index = self._index(features)
        return [R[:, index] for R in self.X_reference]


@dataclass(frozen=True)
class Score:
    strength: float  # mean -log10 p over resamples (maximised)
    power: float  # fraction of resamples with p < alpha
    median_p: float


def resamples(y: np.ndarray, n: int, n_resamples: int, seed: int, member_fraction: float = 1.0) -> list[np.ndarray]:
    """`n_resamples` draws (seeded, without replacement) of n suspect-side then n control-side rows.

    The suspect side holds round(member_fraction * n) members and non-members for the rest, as when only
    part of an owner's published set was scraped; the control side holds n other non-members. A
    fraction below 1 makes calibration harder, so that a strongly memorising reference model (such as
    the demo) still separates good configurations from poor ones by power, not only by -log10 p.
    """
    if not 0.0 < member_fraction <= 1.0:
        raise OptionError(f"--member-fraction {member_fraction}: must lie in (0, 1] (1 = every suspect is a member)")
    members, nonmembers = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_members = lambda n: max(1, int(round(member_fraction * n)))  # noqa: E731
    n = min(n, members.size)
    while n > 0 and 2 * n - n_members(n) > nonmembers.size:
        n -= 1
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        chosen_members = rng.choice(members, n_members(n), replace=False)
        others = rng.choice(nonmembers, 2 * n - chosen_members.size, replace=False)
        draws.append(np.concatenate([chosen_members, others]))
    return draws


def _strength(p_values: Sequence[float]) -> float:
    """Mean -log10 p, a NaN p (constant scores) counted as 1 (no evidence)."""
    p = np.asarray(p_values, dtype=float)
    p = np.where(np.isfinite(p), p, 1.0)
    return float(np.mean(-np.log10(np.clip(p, P_FLOOR, 1.0))))


def detection_score(X: np.ndarray, draws: Sequence[np.ndarray], *, C: float, penalty: str,
                    folds: int, alpha: float = 0.01, seed: int = 0, references: Sequence[np.ndarray] = (),
                    covariates: np.ndarray | None = None, representation: str = "raw",
                    reference_formula: str = "difference", difficulty_calibration: str = "off",
                    wiener: WienerNoise | None = None, on_resample: Callable[[int, float], None] | None = None) -> Score:
    """Welch p of the cross-fitted pipeline on every resample, summarised.

    Each draw is n suspect-side rows followed by n control-side rows (`resamples`); the test compares
    the two sides, whatever the membership of the individual images. With a calibration other than
    raw/off, each draw's rows of X, of the `references` and of the `covariates` are calibrated together
    (`cdi.stats.difficulty.calibrate`) before scoring, and only those rows (and those rows of `wiener`'s noise). `on_resample(r, strength)`
    is called after resample r with the mean -log10 p of resamples 0..r (a pruner's intermediate value);
    an exception it raises (optuna.TrialPruned) stops the scoring there.
    """
    calibrated = (representation != "raw" and len(references) > 0) or difficulty_calibration != "off"
    if covariates is not None and difficulty_calibration == "image":  # the statistics, without pixels if any
        covariates = covariates[:, :len(DIFFICULTY_COVARIATE_NAMES)]
    placeholder_names = [str(j) for j in range(X.shape[1])]
    p_values = []
    for r, rows in enumerate(draws):
        half = len(rows) // 2
        Xr, side = X[rows], np.repeat([1, 0], half)
        if calibrated:
            Xr = calibrate(Xr, [R[rows] for R in references], placeholder_names,
                           None if covariates is None else covariates[rows], representation=representation,
                           formula=reference_formula, difficulty=difficulty_calibration,
                           wiener=None if wiener is None or difficulty_calibration != "image+pca+wiener"
                           else WienerNoise(wiener.draws[rows], wiener.alpha_bar)).values
        scores = CrossFittedScorer(n_splits=folds, C=C, penalty=penalty, random_state=seed + r).fit(Xr, side).oof_scores_
        p_values.append(welch_one_sided(scores[side == 1], scores[side == 0]).p_value)
        if on_resample is not None:
            on_resample(r, _strength(p_values))
    p = np.asarray(p_values)
    p = np.where(np.isfinite(p), p, 1.0)  # constant scores give NaN: no evidence
    return Score(
        strength=_strength(p_values),
        power=float(np.mean(p < alpha)),
        median_p=float(np.median(p)),
    )


__all__ = ["CalibrationData", "P_FLOOR", "Score", "detection_score", "resamples"]
