"""Duplicates can no longer make an innocent set look used (issue 14, the first release blocker).

The issue's case, on the bundled demo model: five held-out digits, each under four names, audited against
other held-out digits gave `used`, p = 0.000999, because copies land in both the scorer's training and
scoring folds. Now one picture is one unit: copies (exact, re-encoded, resized) are refused by default,
and with `--duplicates keep-one` each picture counts once, is recorded as left out, and `cdi verify`
still matches the folders.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from cdi.cli import main

DEMO = Path(__file__).resolve().parents[1] / "demo"
FAST = ("--access", "gray", "--features", "DL,PIA,SecMI", "--permutations", "1000", "--power-resamples", "0",
        "--batch-size", "50", "--no-progress")


def _copies(source: Path, target: Path, n_pictures: int, start: int = 0) -> Path:
    """`n_pictures` held-out digits, each as the original, an exact copy, a JPEG and a 2x upscale."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.png"))[start:start + n_pictures]:
        image = Image.open(path)
        image.save(target / path.name)
        shutil.copy(path, target / f"{path.stem}_copy.png")
        image.save(target / f"{path.stem}_reencoded.jpg", quality=95)
        image.resize((32, 32), Image.Resampling.BICUBIC).save(target / f"{path.stem}_large.png")
    return target


def _control(target: Path, n: int) -> Path:
    target.mkdir(parents=True)
    for path in sorted((DEMO / "heldout2").glob("*.png"))[:n]:
        shutil.copy(path, target / path.name)
    return target


def _audit(capsys, suspect: Path, control: Path, experiment: str, *extra: str):
    argv = ["audit", "--model", str(DEMO / "model"), "--suspect", str(suspect), "--control", str(control),
            "--experiment", experiment, *FAST, *extra]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def experiment() -> str:
    return f"duplicates-{uuid.uuid4().hex[:8]}"


def test_the_issues_five_pictures_under_four_names_are_refused(tmp_path, tracking_uri, experiment, capsys):
    suspect = _copies(DEMO / "heldout", tmp_path / "p", 5)
    control = _control(tmp_path / "u", 20)
    code, out, err = _audit(capsys, suspect, control, experiment)
    assert code == 2 and "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert "5 group(s) of duplicate images" in line and "--duplicates keep-one" in line, line
    # keep-one leaves 5 pictures: the minimum set size counts pictures, not files
    code, out, err = _audit(capsys, suspect, control, experiment, "--duplicates", "keep-one")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "5 image(s) once 15 duplicate copies are dropped" in line, line
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert not found or not client.search_runs([found.experiment_id])


def test_keep_one_counts_each_picture_once_and_stays_calibrated(tmp_path, tracking_uri, experiment, capsys):
    """Twelve held-out pictures, four files each, against twenty other held-out pictures: an innocent owner.
    Before the fix the copies made this `used`; with one unit per picture it is a null audit (seeded; the
    chance of a false `used` is alpha = 0.01, and this seed's p is far from it)."""
    suspect = _copies(DEMO / "heldout", tmp_path / "p", 12)
    control = _control(tmp_path / "u", 20)
    output = tmp_path / "result.json"
    code, out, err = _audit(capsys, suspect, control, experiment, "--duplicates", "keep-one", "--output", str(output))
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["n_suspect"] == 12 and result["n_control"] == 20
    assert result["verdict"] == "not_detected" and result["p_value"] > 0.05, result["p_value"]
    dropped = result["duplicates_dropped"]
    assert len(dropped) == 36 and {d["set"] for d in dropped} == {"suspect"}
    assert all(("_copy" in d["path"]) or ("_reencoded" in d["path"]) or ("_large" in d["path"]) for d in dropped)
    assert any("36 duplicate image(s) were left out" in w for w in result["warnings"])
    assert out.count("left out (duplicate): suspect") == 36
    run = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"])
    assert run.data.params["duplicates"] == "keep-one" and run.data.params["duplicates_dropped"] == "36"
    # The manifest lists the left-out copies, so verify matches the folders as they are.
    assert main(["verify", result["run_id"], "--model", str(DEMO / "model"), "--suspect", str(suspect),
                 "--control", str(control)]) == 0
    assert "verified:" in capsys.readouterr().out


def test_a_picture_in_both_sets_is_refused_even_with_keep_one(tmp_path, tracking_uri, experiment, capsys):
    suspect = _control(tmp_path / "p", 15)
    control = tmp_path / "u"
    control.mkdir()
    for path in sorted((DEMO / "heldout").glob("*.png"))[:15]:
        shutil.copy(path, control / path.name)
    first = sorted(suspect.glob("*.png"))[0]
    Image.open(first).save(control / "resaved.jpg", quality=95)
    code, out, err = _audit(capsys, suspect, control, experiment, "--duplicates", "keep-one")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "in both sets" in line and first.name in line and "resaved.jpg" in line, line
