"""Fixtures of the search tests: synthetic calibration features where only some families carry signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builders import save_pipeline, tiny_unet
from cdi.features import FEATURE_NAMES
from cdi.search import CalibrationData

SIGNAL = ("DL", "GM_0", "GM_100", "GM_200", "GM_300")


def synthetic_calibration(n_per_side: int = 100, shift: float = 0.9, seed: int = 0,
                          names=FEATURE_NAMES) -> CalibrationData:
    """Members differ from non-members by `shift` standard deviations in SIGNAL features only."""
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_per_side + [0] * n_per_side)
    X = rng.normal(size=(2 * n_per_side, len(names)))
    for j, name in enumerate(names):
        if name in SIGNAL:
            X[y == 1, j] -= shift  # lower loss = member
    digests = [f"{i:064x}" for i in range(2 * n_per_side)]
    return CalibrationData(X=X, y=y, names=tuple(names), sha256=digests, files=[f"img{i}.png" for i in range(len(y))],
                           description={"mode": "synthetic", "n_members": n_per_side, "n_nonmembers": n_per_side})


@pytest.fixture
def synthetic():
    """The factory `synthetic_calibration`."""
    return synthetic_calibration


def difficulty_calibration_data(n_per_side: int = 60, shift: float = 0.6, seed: int = 0,
                                names=("DL", "SecMI", "PIA"), signal=("DL",)) -> CalibrationData:
    """Membership visible only after reference calibration: per image a difficulty d (SD 3) and, per
    feature, a noise e (SD 1) that the target and the reference share (common random numbers):

        target    = d + e - shift * member (SIGNAL features only) + 0.2 * own noise
        reference = d + e + 0.2 * own noise

    Raw features separate members by about shift / 3.2 SD, target minus reference by shift / 0.28 SD.
    The covariates are unrelated noise (the difficulty is not an image statistic here).
    """
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_per_side + [0] * n_per_side)
    shape = (2 * n_per_side, len(names))
    shared = 3.0 * rng.normal(size=(shape[0], 1)) + rng.normal(size=shape)
    target = shared + 0.2 * rng.normal(size=shape)
    reference = shared + 0.2 * rng.normal(size=shape)
    for j, name in enumerate(names):
        if name in signal:
            target[y == 1, j] -= shift
    digests = [f"{i + 10**6:064x}" for i in range(shape[0])]
    return CalibrationData(X=target, y=y, names=tuple(names), sha256=digests,
                           files=[f"img{i}.png" for i in range(shape[0])],
                           description={"mode": "synthetic", "n_members": n_per_side, "n_nonmembers": n_per_side,
                                        "reference_models": [{"path": "/models/base", "fingerprint": "b" * 64}]},
                           X_reference=[reference], covariates=rng.normal(size=(shape[0], 5)))


@pytest.fixture
def with_reference():
    """The factory `difficulty_calibration_data`."""
    return difficulty_calibration_data


@pytest.fixture(scope="session")
def reference_model(tmp_path_factory) -> Path:
    """Another tiny DDPM of the same architecture and schedule as `tiny_model` (other random weights)."""
    return save_pipeline(tmp_path_factory.mktemp("reference") / "tiny-ref", tiny_unet(seed=1))


@pytest.fixture(scope="session")
def incomparable_model(tmp_path_factory) -> Path:
    """A tiny DDPM at 16x16 pixels: its features cannot calibrate the 8x8 `tiny_model`'s."""
    return save_pipeline(tmp_path_factory.mktemp("incomparable") / "tiny-16", tiny_unet(size=16))
