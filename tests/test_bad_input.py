"""Bad input to `cdi audit`, one test each (issue 7, item 4).

A user error ends with exit code 2, one stderr line that names the file or option at fault and
says the fix, no traceback, and no MLflow run marked FINISHED. Images in unusual modes (CMYK,
16-bit, alpha, palette) and of mixed sizes are converted, not refused: those audits complete.
Every test drives the real CLI entry point in-process and queries the real tracking store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from cdi.cli import main
from cdi.data.images import MIN_SET_SIZE

from builders import png_header_only, save_pipeline, tiny_unet, write_images

#: Cheap but complete audits: one gray-box feature, no power curve, enough permutations to reject at 0.01.
FAST = ("--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0")


@pytest.fixture(scope="module")
def good_sets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    return write_images(root / "p", 12, seed=1, prefix="p"), write_images(root / "u", 12, seed=2, prefix="u")


@pytest.fixture
def experiment() -> str:
    return f"bad-input-{uuid.uuid4().hex[:12]}"


def copy_set(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def run_audit(capsys, model, suspect, control, experiment, *extra) -> tuple[int, str, str]:
    argv = ["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control),
            "--no-progress", "--batch-size", "12", "--experiment", experiment, *FAST, *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses malformed option values before main's handler
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def runs_by_status(tracking_uri: str, experiment: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else [run.info.status for run in client.search_runs([found.experiment_id])]


def assert_user_error(outcome, tracking_uri, experiment, *expected) -> str:
    """Exit 2, exactly one `cdi: error:` line holding every `expected` fragment, no traceback, no finished run."""
    code, out, err = outcome
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("cdi: error: "), line
    for fragment in expected:
        assert str(fragment) in line, (fragment, line)
    assert "FINISHED" not in runs_by_status(tracking_uri, experiment)
    return line


def assert_audit_completed(outcome, tracking_uri, experiment, result_path: Path) -> dict:
    code, out, err = outcome
    assert code == 0, err
    assert "Traceback" not in out + err
    assert runs_by_status(tracking_uri, experiment) == ["FINISHED"]
    return json.loads(result_path.read_text())


def feature_table(tracking_uri: str, run_id: str) -> dict[str, str]:
    """file_name -> DL value (as text) of the run's features.csv artifact."""
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/features.csv")
    return {row["file_name"]: row["DL"] for row in csv.DictReader(io.StringIO(text))}


def random_pixels(seed: int, shape: tuple[int, ...], high: int = 256, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


# -- image files -------------------------------------------------------------------------------------


def test_truncated_image_is_named(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    suspect = copy_set(good_sets[0], tmp_path / "p")
    Image.fromarray(random_pixels(7, (32, 32, 3))).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (suspect / "cut.png").write_bytes(data[: len(data) // 2])
    outcome = run_audit(capsys, tiny_model, suspect, good_sets[1], experiment)
    assert_user_error(outcome, tracking_uri, experiment, suspect / "cut.png", "truncated", "remove or re-export")


def test_zero_byte_image_is_named(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    control = copy_set(good_sets[1], tmp_path / "u")
    (control / "empty.jpg").write_bytes(b"")
    outcome = run_audit(capsys, tiny_model, good_sets[0], control, experiment)
    assert_user_error(outcome, tracking_uri, experiment, control / "empty.jpg", "remove or re-export")


def test_non_image_with_image_suffix_is_named_other_suffixes_are_ignored(
    tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys
):
    suspect = copy_set(good_sets[0], tmp_path / "p")
    (suspect / "notes.png").write_text("these are my notes, not a picture\n")
    (suspect / "README.txt").write_text("not an image suffix: ignored\n")
    Image.fromarray(random_pixels(8, (8, 8, 3))).save(suspect / "scan.tif")  # an unlisted format: ignored
    outcome = run_audit(capsys, tiny_model, suspect, good_sets[1], experiment)
    line = assert_user_error(outcome, tracking_uri, experiment, "1 unreadable image(s)", suspect / "notes.png",
                             "remove or re-export")
    assert "README.txt" not in line and "scan.tif" not in line


def _cmyk(folder: Path, seed: int) -> None:
    Image.fromarray(random_pixels(seed, (8, 8, 4)), mode="CMYK").save(folder / f"cmyk_{seed}.jpg", quality=95)


def _sixteen_bit(folder: Path, seed: int) -> None:
    Image.fromarray(random_pixels(seed, (8, 8), high=65536, dtype=np.uint16)).save(folder / f"deep_{seed}.png")


def _alpha(folder: Path, seed: int) -> None:
    Image.fromarray(random_pixels(seed, (8, 8, 4)), mode="RGBA").save(folder / f"rgba_{seed}.png")
    Image.fromarray(random_pixels(seed + 100, (8, 8, 2)), mode="LA").save(folder / f"la_{seed}.png")


def _palette(folder: Path, seed: int) -> None:
    Image.fromarray(random_pixels(seed, (8, 8, 3))).convert("P").save(folder / f"palette_{seed}.png")
    with_transparency = Image.fromarray(random_pixels(seed + 100, (8, 8, 3))).convert("P")
    with_transparency.save(folder / f"palette_t_{seed}.png", transparency=0)


@pytest.mark.parametrize(
    "write, expected_mode",
    [(_cmyk, "CMYK"), (_sixteen_bit, "I;16"), (_alpha, "RGBA"), (_palette, "P")],
    ids=["cmyk", "16-bit", "alpha", "palette"],
)
def test_unusual_image_modes_are_converted_not_refused(
    write, expected_mode, tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys
):
    suspect, control = copy_set(good_sets[0], tmp_path / "p"), copy_set(good_sets[1], tmp_path / "u")
    before = {path.name for folder in (suspect, control) for path in folder.iterdir()}
    for seed in (11, 12):
        write(suspect, seed)
    for seed in (21, 22):
        write(control, seed)
    added = sorted(path for folder in (suspect, control) for path in folder.iterdir() if path.name not in before)
    modes = set()
    for path in added:
        with Image.open(path) as image:
            modes.add(image.mode)
    assert expected_mode in modes  # the files really are in that mode
    out = tmp_path / "result.json"
    result = assert_audit_completed(
        run_audit(capsys, tiny_model, suspect, control, experiment, "--output", str(out)),
        tracking_uri, experiment, out,
    )
    per_set = len(added) // 2
    assert (result["n_suspect"], result["n_control"]) == (12 + per_set, 12 + per_set)
    scored = feature_table(tracking_uri, result["run_id"])
    for path in added:
        assert np.isfinite(float(scored[path.name])), path.name


def test_decompression_bomb_is_refused(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    suspect = copy_set(good_sets[0], tmp_path / "p")
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # over Pillow's default limit, under twice the limit
    bomb = png_header_only(suspect / "bomb.png", side, side)
    assert bomb.stat().st_size < 100
    outcome = run_audit(capsys, tiny_model, suspect, good_sets[1], experiment)
    assert_user_error(outcome, tracking_uri, experiment, bomb, "decompression bomb", "remove or re-export")


def test_mixed_sizes_are_resized_and_a_size_shift_between_sets_is_recorded(
    tiny_model, tracking_uri, experiment, tmp_path, capsys
):
    # Every image is resized (shorter side to the model's 8 px, centre crop), smaller ones upscaled.
    # Here P's originals are all larger than U's, which the shift guard must flag in the result.
    suspect, control = tmp_path / "p", tmp_path / "u"
    suspect.mkdir(), control.mkdir()
    for i, (width, height) in enumerate([(20, 12), (32, 32), (48, 16), (16, 40)] * 3):
        Image.fromarray(random_pixels(100 + i, (height, width, 3))).save(suspect / f"p_{i:02d}_{width}x{height}.png")
    for i, (width, height) in enumerate([(8, 8), (4, 6), (7, 5), (6, 9)] * 3):
        Image.fromarray(random_pixels(200 + i, (height, width, 3))).save(control / f"u_{i:02d}_{width}x{height}.png")
    out = tmp_path / "result.json"
    result = assert_audit_completed(
        run_audit(capsys, tiny_model, suspect, control, experiment, "--output", str(out)),
        tracking_uri, experiment, out,
    )
    assert (result["n_suspect"], result["n_control"]) == (12, 12)
    assert len(feature_table(tracking_uri, result["run_id"])) == 24
    assert result["shift_check"]["flagged"] is True
    assert any("model-free image statistics" in warning for warning in result["warnings"])


# -- image sets ---------------------------------------------------------------------------------------


def test_empty_folder_is_named(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    outcome = run_audit(capsys, tiny_model, good_sets[0], tmp_path / "empty", experiment)
    assert_user_error(outcome, tracking_uri, experiment, f"--control {tmp_path / 'empty'}", "no images found",
                      "point it at the folder that holds the images")


def test_set_below_the_minimum_is_named(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    few = write_images(tmp_path / "few", MIN_SET_SIZE - 1, seed=3, prefix="f")
    outcome = run_audit(capsys, tiny_model, few, good_sets[1], experiment)
    assert_user_error(outcome, tracking_uri, experiment, f"--suspect {few}", f"{MIN_SET_SIZE - 1} image(s)",
                      f"at least {MIN_SET_SIZE}", "add images")


def test_same_image_in_both_sets_is_named(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    control = copy_set(good_sets[1], tmp_path / "u")
    shutil.copy(good_sets[0] / "p_003.png", control / "renamed_copy.png")
    outcome = run_audit(capsys, tiny_model, good_sets[0], control, experiment)
    assert_user_error(outcome, tracking_uri, experiment, good_sets[0] / "p_003.png", control / "renamed_copy.png",
                      "both sets", "remove it from one folder")


# -- models -------------------------------------------------------------------------------------------


def test_folder_without_model_index_is_named(good_sets, tracking_uri, experiment, tmp_path, capsys):
    not_a_pipeline = tmp_path / "weights"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    outcome = run_audit(capsys, not_a_pipeline, *good_sets, experiment)
    assert_user_error(outcome, tracking_uri, experiment, f"--model {not_a_pipeline}", "no model_index.json",
                      "save_pretrained")


def test_unsupported_pipeline_class_is_named(good_sets, tracking_uri, experiment, tmp_path, capsys):
    model = tmp_path / "cascade"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePipeline"}))
    outcome = run_audit(capsys, model, *good_sets, experiment)
    assert_user_error(outcome, tracking_uri, experiment, model / "model_index.json", "'StableCascadePipeline'",
                      "is not supported", "supported: ", "DDPMPipeline")


def test_pickle_weights_need_allow_pickle(good_sets, tracking_uri, experiment, tmp_path, capsys):
    model = save_pipeline(tmp_path / "pickled", tiny_unet(), safe=False)
    weights = sorted((model / "unet").glob("*.bin"))
    assert weights
    outcome = run_audit(capsys, model, *good_sets, experiment)
    assert_user_error(outcome, tracking_uri, experiment, weights[0], "convert them to safetensors",
                      "--allow-pickle")


@pytest.fixture(scope="module")
def inf_for_class_1(tmp_path_factory) -> Path:
    """A class-conditional tiny model whose class-1 embedding is infinite: finite output only for class 0."""
    unet = tiny_unet(num_class_embeds=2)
    with torch.no_grad():
        unet.class_embedding.weight[1] = float("inf")
    return save_pipeline(tmp_path_factory.mktemp("inf-model") / "inf", unet)


def test_non_finite_features_name_the_image(inf_for_class_1, good_sets, tracking_uri, experiment, tmp_path, capsys):
    suspect, control = copy_set(good_sets[0], tmp_path / "p"), copy_set(good_sets[1], tmp_path / "u")
    for folder in (suspect, control):
        labels = [{"file_name": path.name, "label": int(path.name == "p_004.png")} for path in sorted(folder.glob("*.png"))]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in labels))
    cache = tmp_path / "cache"
    outcome = run_audit(capsys, inf_for_class_1, suspect, control, experiment, "--cache-dir", str(cache))
    assert_user_error(outcome, tracking_uri, experiment, suspect / "p_004.png", "non-finite feature(s) DL",
                      "1 image(s)", "check the model's weights")
    assert runs_by_status(tracking_uri, experiment) == ["FAILED"]
    # The other 23 images' features stay cached; the non-finite row is gone, so a rerun recomputes only it.
    cached = set()
    for shard in cache.rglob("shard-*.npz"):
        with np.load(shard) as data:
            assert np.isfinite(data["values"]).all()
            cached.update(str(digest) for digest in data["sha256"])
    from cdi.hashing import sha256_file

    digest = {path.name: sha256_file(path) for folder in (suspect, control) for path in folder.glob("*.png")}
    assert cached == {value for name, value in digest.items() if name != "p_004.png"}


# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ["0", "1", "-0.05", "1.5", "nan"])
def test_alpha_outside_the_open_unit_interval(alpha, tiny_model, good_sets, tracking_uri, experiment, capsys):
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--alpha", alpha)
    assert_user_error(outcome, tracking_uri, experiment, "--alpha", "strictly between 0 and 1", "e.g. 0.01")


def test_unknown_feature_names(tiny_model, good_sets, tracking_uri, experiment, capsys):
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--features", "DL,XYZ")
    line = assert_user_error(outcome, tracking_uri, experiment, "--features", "unknown feature(s) XYZ",
                             "known: DL, SecMI")
    assert "DL," not in line.split("known:")[0]  # only the unknown name is reported as unknown


@pytest.mark.parametrize("where", [
    "missing-folder",
    "below-a-file",
    "read-only-folder",
    "name-too-long",
])
def test_unwritable_output_path(where, tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    if where == "missing-folder":
        output = tmp_path / "no" / "such" / "result.json"
    elif where == "below-a-file":
        (tmp_path / "a-file").write_text("")
        output = tmp_path / "a-file" / "result.json"
    elif where == "name-too-long":
        output = tmp_path / ("r" * 300 + ".json")
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only folder")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        output = locked / "result.json"
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--output", str(output))
    assert_user_error(outcome, tracking_uri, experiment, f"--output {output}", "choose another path")
    # listdir, not exists(): Path.exists() raises for a name the file system refuses
    assert not output.parent.is_dir() or output.name not in os.listdir(output.parent)
