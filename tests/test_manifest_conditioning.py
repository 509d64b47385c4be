"""The evidence manifest records what each image was conditioned on, and `verify` notices a changed
metadata.jsonl; manifests written before these keys existed still verify."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from cdi.data import discover_images
from cdi.hashing import sha256_file
from cdi.manifest import build_manifest, image_entries, image_metadata, verify
from cdi.models.loading import fingerprint

from builders import write_images
from latent_builders import write_metadata


@pytest.fixture
def folders(image_sets, tmp_path):
    suspect = shutil.copytree(image_sets[0], tmp_path / "suspect")
    control = shutil.copytree(image_sets[1], tmp_path / "control")
    write_metadata(suspect, {"p_000.png": {"label": 3}, "p_001.png": {"text": "a red cat"}})
    return suspect, control


def _manifest(model, suspect, control, **options):
    digest, files = fingerprint(model)
    return build_manifest(model, digest, files, image_entries(discover_images(suspect, "suspect"), suspect),
                          image_entries(discover_images(control, "control"), control), {"seed": 0}, {}, **options)


def test_image_entries_carry_the_label_and_caption_the_model_was_queried_with(folders):
    suspect, _ = folders
    records = discover_images(suspect, "suspect")
    records[2] = replace(records[2], label=7, caption="")  # e.g. --class-label 7, --prompt ""
    entries = image_entries(records, suspect)
    assert entries[0] == {"set": "suspect", "path": "p_000.png", "sha256": sha256_file(suspect / "p_000.png"),
                          "label": 3}
    assert entries[1]["caption"] == "a red cat" and "label" not in entries[1]
    assert entries[2]["label"] == 7 and entries[2]["caption"] == ""
    assert set(entries[3]) == {"set", "path", "sha256"}  # nothing known: no keys


def test_the_manifest_records_each_folders_metadata_jsonl(tiny_model, folders):
    suspect, control = folders
    manifest = _manifest(tiny_model, suspect, control, metadata=image_metadata(suspect, control))
    assert manifest["metadata"] == {"suspect": sha256_file(suspect / "metadata.jsonl"), "control": None}
    json.dumps(manifest)  # JSON as written
    assert "metadata" not in _manifest(tiny_model, suspect, control)  # not given: not recorded


def test_verify_reports_a_changed_missing_or_new_metadata_jsonl(tiny_model, folders):
    suspect, control = folders
    written = _manifest(tiny_model, suspect, control, metadata=image_metadata(suspect, control))
    manifest = json.loads(json.dumps(written))
    assert verify(manifest, tiny_model, suspect, control).ok
    recorded = manifest["metadata"]["suspect"]

    write_metadata(suspect, {"p_000.png": {"label": 4}, "p_001.png": {"text": "a red cat"}})
    now = sha256_file(suspect / "metadata.jsonl")
    assert verify(manifest, tiny_model, suspect, control).differences == [
        f"suspect metadata.jsonl: sha256 {now[:12]}... differs from the manifest's {recorded[:12]}..."]

    (suspect / "metadata.jsonl").unlink()
    write_metadata(control, {"u_000.png": {"label": 1}})
    assert verify(manifest, tiny_model, suspect, control).differences == [
        "suspect metadata.jsonl: missing", "control metadata.jsonl: not in the manifest"]


def test_a_manifest_without_the_new_keys_still_verifies(tiny_model, folders):
    suspect, control = folders
    old = _manifest(tiny_model, suspect, control)
    old["manifest_version"] = 1
    for entry in old["images"]:
        entry.pop("label", None)
        entry.pop("caption", None)
    write_metadata(suspect, {"p_000.png": {"label": 9}})  # unknowable to a manifest that never recorded it
    report = verify(old, tiny_model, suspect, control)
    assert report.ok, report.differences

    write_images(control, 1, seed=9, prefix="new")  # other differences are still found
    assert verify(old, tiny_model, suspect, control).differences == ["control image new_000.png: not in the manifest"]
