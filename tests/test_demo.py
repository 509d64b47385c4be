"""The bundled demo: its members are detected, two held-out sets are not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cdi.audit import audit

DEMO = Path(__file__).resolve().parents[1] / "demo"


def _first(folder: Path, n: int, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for path in sorted(folder.glob("*.png"))[:n]:
        shutil.copy(path, dest / path.name)
    return dest


@pytest.mark.parametrize("suspect, expected", [("members", "used"), ("heldout2", "not_detected")])
def test_demo_members_are_detected_and_held_out_digits_are_not(suspect, expected, tmp_path, tracking_uri):
    # 40 images per side and the 14 gray-box features keep this test short; the full demo
    # (`mlflow run .`, 100 per side, 26 features) gives p < 1e-100 for members.
    p = _first(DEMO / suspect, 40, tmp_path / "p")
    u = _first(DEMO / "heldout", 40, tmp_path / "u")
    result = audit(DEMO / "model", p, u, access="gray", batch_size=40, progress=False, use_cache=False,
                   power_resamples=0)
    assert result.verdict == expected
    if expected == "used":
        # no permutation of 1000 beats the observed statistic: the smallest p the test can give
        assert result.p_value == 1 / 1001
        assert result.extras["welch_p_value"] < 1e-6
