"""Reference-model calibration in a whole audit: common random numbers, refusals, record, cache, verify."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest

from builders import save_pipeline, tiny_unet
from cdi.audit import audit
from cdi.features import ExtractionOptions
from cdi.cli import main

def fast(cache_dir):
    """A quick gray-box audit's settings, features cached in `cache_dir`."""
    return dict(access="gray", n_permutations=100, power_resamples=0,
                extraction=ExtractionOptions(cache_dir=cache_dir, progress=False))


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    """Same architecture and schedule as `tiny_model`, other weights: a valid reference."""
    return save_pipeline(tmp_path_factory.mktemp("reference") / "ref", tiny_unet(seed=7))


@pytest.fixture(scope="module")
def twin_of_tiny_model(tiny_model, tmp_path_factory):
    """The tiny model's very weights under another fingerprint (one more file in the folder)."""
    twin = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(tiny_model, twin)
    (twin / "NOTES.txt").write_text("a copy of the tiny model\n")
    return twin


def test_same_seeded_noise_on_target_and_reference(tiny_model, twin_of_tiny_model, image_sets, tracking_uri, tmp_path,
                                                   engine_passes):
    """Common random numbers: a reference with the target's weights calibrates every feature to exactly zero,
    which holds only if every noise draw of every feature was the same on both models."""
    result = audit(tiny_model, *image_sets, reference_models=[twin_of_tiny_model], difficulty_calibration="off",
                   **fast(tmp_path))
    assert engine_passes == [(2, 24)]  # target and reference in one engine pass over the 24 images
    table = _table(result)
    names = result.features
    calibrated = table[[f"{n}-ref" for n in names]].to_numpy()
    assert np.abs(calibrated).max() == 0.0
    np.testing.assert_array_equal(table[names].to_numpy(), table[[f"ref1:{n}" for n in names]].to_numpy())


def test_calibrated_features_are_target_minus_reference(tiny_model, reference_model, image_sets, tracking_uri, tmp_path):
    result = audit(tiny_model, *image_sets, reference_models=[reference_model], representation="both",
                   difficulty_calibration="off", **fast(tmp_path))
    table = _table(result)
    for name in result.features:
        np.testing.assert_allclose(table[f"{name}-ref"], table[name] - table[f"ref1:{name}"], rtol=1e-6, atol=1e-6)
    assert result.extras["calibration"]["scored_features"] == [*result.features, *(f"{n}-ref" for n in result.features)]
    assert set(result.extras["feature_auc"]) == set(result.extras["calibration"]["scored_features"])


def test_reference_is_recorded_in_run_result_manifest_and_report(tiny_model, reference_model, image_sets,
                                                                  tracking_uri, tmp_path):
    from cdi.models import load_model

    expected = load_model(reference_model).info.fingerprint
    result = audit(tiny_model, *image_sets, reference_models=[reference_model], **fast(tmp_path))
    assert [r["fingerprint"] for r in result.extras["reference_models"]] == [expected]
    assert result.extras["reference_models"][0]["path"] == str(reference_model.resolve())
    assert result.extras["calibration"]["representation"] == "calibrated"
    run = mlflow.MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.params["reference_fingerprints"] == expected
    assert run.data.params["calibration.representation"] == "calibrated"
    assert run.data.tags["cdi.reference_fingerprints"] == expected
    manifest = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/manifest.json"))
    assert manifest["reference_models"][0]["fingerprint"] == expected
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["reference_models"][0]["files"]
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/report.html")
    assert "Reference model 1" in report and expected[:12] in report and "DL-ref" in report


def test_verify_checks_the_reference_model_files(tiny_model, reference_model, image_sets, tracking_uri, tmp_path,
                                                 capsys):
    reference = tmp_path / "ref"
    shutil.copytree(reference_model, reference)
    result = audit(tiny_model, *image_sets, reference_models=[reference], **fast(tmp_path / "cache"))
    args = ["verify", result.run_id, "--model", str(tiny_model), "--suspect", str(image_sets[0]),
            "--control", str(image_sets[1]), "--tracking-uri", tracking_uri]
    assert main(args) == 0
    (reference / "unet" / "config.json").write_text((reference / "unet" / "config.json").read_text() + " ")
    capsys.readouterr()
    assert main(args) == 1
    assert "reference model 1 file unet/config.json" in capsys.readouterr().out


def test_reference_features_come_from_the_cache_the_second_time(tiny_model, reference_model, image_sets,
                                                                tracking_uri, tmp_path):
    first = audit(tiny_model, *image_sets, reference_models=[reference_model], **fast(tmp_path))
    second = audit(tiny_model, *image_sets, reference_models=[reference_model], **fast(tmp_path))
    client = mlflow.MlflowClient(tracking_uri)
    m1, m2 = client.get_run(first.run_id).data.metrics, client.get_run(second.run_id).data.metrics
    assert (m1["extraction.reference.cache_hits"], m1["extraction.reference.cache_misses"]) == (0, 24)
    assert (m2["extraction.reference.cache_hits"], m2["extraction.reference.cache_misses"]) == (24, 0)
    assert second.p_value == first.p_value


def _refusal(capsys, tiny_model, image_sets, tracking_uri, reference) -> str:
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--reference-model", str(reference), "--access", "gray", "--no-progress",
                 "--tracking-uri", tracking_uri])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("kind,expected", [
    ("size", "image size/channels 16px x 3"),
    ("channels", "image size/channels 8px x 1"),
    ("timesteps", "500 training timesteps"),
    ("schedule", "another noise schedule"),
])
def test_incomparable_references_are_refused(kind, expected, tiny_model, image_sets, tracking_uri, tmp_path, capsys):
    unet = {"size": lambda: tiny_unet(size=16), "channels": lambda: tiny_unet(channels=1)}.get(kind, tiny_unet)()
    if kind == "timesteps":
        import diffusers

        reference = tmp_path / "ref"
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=500)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(reference, safe_serialization=True)
    elif kind == "schedule":
        reference = save_pipeline(tmp_path / "ref", unet, beta_schedule="squaredcos_cap_v2")
    else:
        reference = save_pipeline(tmp_path / "ref", unet)
    err = _refusal(capsys, tiny_model, image_sets, tracking_uri, reference)
    assert f"--reference-model {reference}" in err and expected in err


def test_the_audited_model_itself_is_refused_as_reference(tiny_model, image_sets, tracking_uri, capsys):
    err = _refusal(capsys, tiny_model, image_sets, tracking_uri, tiny_model)
    assert "is the audited model itself" in err


def _table(result):
    import pandas as pd

    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="features.csv"))
