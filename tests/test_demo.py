"""The bundled demo: its members are detected, two held-out sets are not."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from cdi.audit import audit
from cdi.features import ExtractionOptions

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
    result = audit(DEMO / "model", p, u, access="gray", power_resamples=0,
                   extraction=ExtractionOptions(batch_size=40, progress=False, use_cache=False))
    assert result.verdict == expected
    if expected == "used":
        # no permutation of 1000 beats the observed statistic: the smallest p the test can give
        assert result.p_value == 1 / 1001
        assert result.extras["welch_p_value"] < 1e-6


def test_demo_audit_with_a_warm_cache_makes_no_model_pass(tmp_path, tracking_uri, monkeypatch):
    """The audit `mlflow run .` makes (the demo model, 26 features, batch 50; here on 30 members and 30
    held-out digits and 200 permutations to keep the test short) after the features are cached by an
    extraction at another batch size: every image is a cache hit, the denoiser never runs."""
    from diffusers import UNet2DModel

    from cdi.data import build_image_sets
    from cdi.features import FEATURE_NAMES, extract
    from cdi.models import load_model

    members, heldout = _first(DEMO / "members", 30, tmp_path / "p"), _first(DEMO / "heldout", 30, tmp_path / "u")
    adapter = load_model(DEMO / "model")
    suspect, control = build_image_sets(members, heldout, adapter.info.image_size, adapter.info.image_channels)
    cold = extract(adapter, [*suspect, *control], FEATURE_NAMES, batch_size=16, progress=False,
                   cache_dir=tmp_path / "cache", device="cpu")
    assert (cold.cache_hits, cold.cache_misses) == (0, 60)

    passes = []
    forward = UNet2DModel.forward
    monkeypatch.setattr(UNet2DModel, "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    result = audit(DEMO / "model", members, heldout, access="white", power_resamples=0, n_permutations=200,
                   experiment="warm-demo",
                   extraction=ExtractionOptions(batch_size=50, cache_dir=tmp_path / "cache", progress=False))
    assert passes == []
    metrics = mlflow.MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    assert (metrics["extraction.cache_hits"], metrics["extraction.cache_misses"]) == (60, 0)
    assert result.verdict == "used"
