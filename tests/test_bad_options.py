"""Options and config values that would give a weaker verdict than it looks, hang, or fail late (issue 14).

Each is refused before any model pass with one `cdi: error:` line naming the option or config key and the
fix (exit 2, no FINISHED run), or, where the audit can still run, the result's warnings say why its
verdict is weaker than it looks. All tests drive the real CLI against a real sqlite tracking store.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from test_bad_input import FAST, assert_user_error, copy_set, good_sets, experiment, run_audit, runs_by_status  # noqa: F401

QUICK = ("--access", "gray", "--features", "DL", "--power-resamples", "0")


def audit_with(capsys, model, sets, experiment, *extra):
    """An audit without FAST's --permutations, so each test sets its own."""
    from cdi.cli import main

    suspect, control = sets
    argv = ["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control), "--no-progress",
            "--batch-size", "12", "--experiment", experiment, *QUICK, *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- permutations ----------------------------------------------------------------------------------


def test_permutations_that_cannot_reject_are_refused(tiny_model, good_sets, tracking_uri, experiment, capsys):
    outcome = audit_with(capsys, tiny_model, good_sets, experiment, "--permutations", "99")
    assert_user_error(outcome, tracking_uri, experiment, "--permutations 99", "--alpha 0.01", "can never reject",
                      "use at least 100")
    assert runs_by_status(tracking_uri, experiment) == []  # refused before the run was opened


def test_absurd_permutation_count_is_refused_up_front(tiny_model, good_sets, tracking_uri, experiment, capsys):
    outcome = audit_with(capsys, tiny_model, good_sets, experiment, "--permutations", "1000000000")
    assert_user_error(outcome, tracking_uri, experiment, "--permutations 1000000000", "100,000")


def test_coarse_permutation_count_is_named_in_the_warnings(tiny_model, good_sets, tracking_uri, experiment,
                                                           tmp_path, capsys):
    output = tmp_path / "result.json"
    code, out, err = audit_with(capsys, tiny_model, good_sets, experiment, "--permutations", "199",
                                "--output", str(output))
    assert code == 0, err
    warnings = json.loads(output.read_text())["warnings"]
    assert any("only 199 permutations" in w and "at least 1000" in w for w in warnings), warnings
    assert any("no power curve" in w for w in warnings), warnings
    assert "WARNING: only 199 permutations" in out


def test_welch_test_is_named_as_anti_conservative(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    output = tmp_path / "result.json"
    code, _, err = audit_with(capsys, tiny_model, good_sets, experiment, "--test", "welch", "--output", str(output))
    assert code == 0, err
    assert any("anti-conservative" in w for w in json.loads(output.read_text())["warnings"])


# -- seed, folds, cache folder -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_seed_out_of_range_is_refused_before_extraction(seed, tiny_model, good_sets, tracking_uri, experiment,
                                                        tmp_path, capsys):
    cache = tmp_path / "cache"
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--seed", seed, "--cache-dir", str(cache))
    assert_user_error(outcome, tracking_uri, experiment, f"--seed {seed}", "4294967295")
    assert not list(cache.rglob("shard-*.npz"))  # no model pass was made


def test_too_many_folds_names_folds(tiny_model, good_sets, tracking_uri, experiment, capsys):
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--folds", "50")
    assert_user_error(outcome, tracking_uri, experiment, "--folds 50", "at most 6 folds")


@pytest.mark.parametrize("where", ["a-file", "below-a-file"])
def test_unwritable_cache_dir_names_cache_dir(where, tiny_model, good_sets, tracking_uri, experiment, tmp_path,
                                              capsys):
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" if where == "a-file" else tmp_path / "a-file" / "cache"
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--cache-dir", str(folder))
    line = assert_user_error(outcome, tracking_uri, experiment, f"--cache-dir {folder}", "--no-cache")
    assert "tracking" not in line


# -- class labels ----------------------------------------------------------------------------------


def test_class_label_out_of_range_names_the_image(tmp_path, good_sets, tracking_uri, experiment, capsys):
    from builders import save_pipeline, tiny_unet

    model = save_pipeline(tmp_path / "conditional", tiny_unet(num_class_embeds=3))
    suspect, control = copy_set(good_sets[0], tmp_path / "p"), copy_set(good_sets[1], tmp_path / "u")
    for folder in (suspect, control):
        rows = [{"file_name": p.name, "label": 7 if p.name == "p_003.png" else 1} for p in sorted(folder.glob("*.png"))]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    outcome = run_audit(capsys, model, suspect, control, experiment)
    assert_user_error(outcome, tracking_uri, experiment, suspect / "p_003.png", "class label 7", "0..2")
    outcome = run_audit(capsys, model, suspect, control, experiment, "--class-label", "5")
    # metadata labels take precedence over --class-label: the file's label is still the one named
    assert_user_error(outcome, tracking_uri, experiment, "p_003.png")


# -- search configs --------------------------------------------------------------------------------


def write_config(path: Path, **changes) -> Path:
    config = {"features": ["DL"], "C": 1.0, "penalty": "l2", "folds": 5, "access": "gray", "seed": 0}
    config.update(changes)
    for key in [k for k, v in config.items() if v is None]:
        del config[key]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("changes, fragments", [
    ({"C": "abc"}, ["C 'abc'", "positive number"]),
    ({"C": -1}, ["C -1", "positive number"]),
    ({"folds": 1}, ["folds 1", "integer"]),
    ({"seed": 2**64}, ["seed", "4294967295"]),
    ({"penalty": "l3"}, ["penalty 'l3'", "l2, l1"]),
    ({"access": "black"}, ["access 'black'", "gray, white"]),
    ({"features": ["DL", "XYZ"]}, ["unknown feature(s) XYZ"]),
    ({"features": 5}, ["features must be a list"]),
    ({"feature_settings": {"dl_t": 5000}}, ["dl_t 5000", "below 1000"]),
    ({"feature_settings": {"gm_mask_ratio": 5}}, ["gm_mask_ratio 5", "(0, 1]"]),
    ({"feature_settings": {"secmi_t": 105}}, ["secmi_t 105", "multiple of secmi_k 10"]),
    ({"feature_settings": {"dl_draws": "many"}}, ["dl_draws 'many'", "integer"]),
    ({"feature_settings": {"no_such": 1}}, ["unknown feature setting(s) no_such"]),
    ({"feature_settings": [1, 2]}, ["feature_settings must be a mapping"]),
    ({"alpha": 0.5}, ["key 'alpha'", "pass --alpha"]),
    ({"banana": 1}, ["key 'banana'", "known keys"]),
])
def test_bad_config_values_are_refused_before_any_model_pass(changes, fragments, tiny_model, good_sets, tracking_uri,
                                                             experiment, tmp_path, capsys):
    config = write_config(tmp_path / "best_config.yaml", **changes)
    cache = tmp_path / "cache"
    outcome = run_audit(capsys, tiny_model, *good_sets, experiment, "--config", str(config), "--cache-dir", str(cache))
    assert_user_error(outcome, tracking_uri, experiment, f"--config {config}", *fragments)
    assert not list(cache.rglob("shard-*.npz"))


def test_features_as_a_string_in_a_config_is_a_list_of_names_not_letters(tiny_model, good_sets, tracking_uri,
                                                                        experiment, tmp_path, capsys):
    config = write_config(tmp_path / "best_config.yaml", features="DL, SecMI")
    output = tmp_path / "result.json"
    code, _, err = run_audit(capsys, tiny_model, *good_sets, experiment, "--config", str(config), "--output",
                             str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["features"] == ["DL", "SecMI"]


# -- output ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_write_failure_is_one_line_naming_the_finished_run(tiny_model, good_sets, tracking_uri, experiment,
                                                                  capsys):
    code, out, err = run_audit(capsys, tiny_model, *good_sets, experiment, "--output", "/dev/full")
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdi: error: --output /dev/full"), err
    assert "No space left" in lines[0]
    run_id = out.split("run: ")[1].split()[0]
    assert f"run {run_id} holds result.json" in lines[0]
    assert mlflow.MlflowClient(tracking_uri).get_run(run_id).info.status == "FINISHED"


def test_output_is_replaced_whole(tiny_model, good_sets, tracking_uri, experiment, tmp_path, capsys):
    output = tmp_path / "result.json"
    output.write_text("old")
    code, _, err = run_audit(capsys, tiny_model, *good_sets, experiment, "--output", str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["verdict"] in ("used", "not_detected")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".result.json")] == []


# -- file names --------------------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_audited_and_recorded(tiny_model, good_sets, tracking_uri, experiment,
                                                             tmp_path, capsys):
    """Linux allows any bytes in a name; the audit used to be lost while writing features.csv."""
    import os

    suspect, control = copy_set(good_sets[0], tmp_path / "p"), copy_set(good_sets[1], tmp_path / "u")
    first = sorted(suspect.glob("*.png"))[0]
    odd = os.fsdecode(os.fsencode(str(suspect)) + b"/caf\xe9_\xff.png")
    os.rename(first, odd)
    output = tmp_path / "result.json"
    code, out, err = run_audit(capsys, tiny_model, suspect, control, experiment, "--output", str(output))
    assert code == 0, err
    result = json.loads(output.read_text())
    run = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/features.csv")
    assert "caf\\xe9_\\xff.png" in text  # shown with backslash escapes, the rest of the table intact
    assert len(text.strip().splitlines()) == 1 + 24
    from cdi.cli import main

    assert main(["verify", result["run_id"], "--model", str(tiny_model), "--suspect", str(suspect),
                 "--control", str(control)]) == 0


# -- conditioning is evidence ----------------------------------------------------------------------


def test_relabelling_every_image_recomputes_features_and_verify_notices(tmp_path, good_sets, tracking_uri, experiment,
                                                                       capsys):
    """The issue's case: on a class-conditional model, new labels reused the cached features (same p) and
    `cdi verify` passed. Now the labels are in the cache key and the manifest."""
    from builders import save_pipeline, tiny_unet
    from cdi.cli import main

    model = save_pipeline(tmp_path / "conditional", tiny_unet(num_class_embeds=3))
    suspect, control = copy_set(good_sets[0], tmp_path / "p"), copy_set(good_sets[1], tmp_path / "u")
    cache = tmp_path / "cache"

    def label_all(label: int) -> None:
        for folder in (suspect, control):
            rows = [{"file_name": p.name, "label": label} for p in sorted(folder.glob("*.png"))]
            (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def audited() -> dict:
        output = tmp_path / "result.json"
        code, _, err = run_audit(capsys, model, suspect, control, experiment, "--cache-dir", str(cache),
                                 "--output", str(output))
        assert code == 0, err
        result = json.loads(output.read_text())
        return {**result, "metrics": mlflow.MlflowClient(tracking_uri).get_run(result["run_id"]).data.metrics}

    label_all(0)
    first = audited()
    label_all(2)
    second = audited()
    assert second["metrics"]["extraction.cache_hits"] == 0 and second["metrics"]["extraction.cache_misses"] == 24
    assert second["feature_auc"] != first["feature_auc"] or second["statistic"] != first["statistic"]
    verify = ["verify", first["run_id"], "--model", str(model), "--suspect", str(suspect), "--control", str(control)]
    assert main(verify) == 1
    assert "suspect metadata.jsonl: sha256" in capsys.readouterr().out
    label_all(0)
    again = audited()
    assert again["metrics"]["extraction.cache_hits"] == 24 and again["statistic"] == first["statistic"]
    assert main(verify) == 0
