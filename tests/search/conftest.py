"""Fixtures of the search tests: synthetic calibration features where only some families carry signal."""

from __future__ import annotations

import numpy as np
import pytest

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
