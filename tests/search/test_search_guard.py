"""Using a search's result: `cdi audit --config/--from-search`, and the refusal of calibration images."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from cdi.cli import main
from cdi.data import discover_images
from cdi.errors import ImageSetError
from builders import write_images
from cdi.search import SearchConfig, builtin_space, check_no_calibration_images, exclude_calibration_images, search


def _config(**changes) -> SearchConfig:
    base = dict(features=["DL", "PIA"], C=1.0, penalty="l2", folds=3, access="gray", seed=1,
                calibration={"mode": "known", "sha256": []}, search_run_id="abc123")
    return SearchConfig(**{**base, **changes})


def test_config_survives_a_yaml_round_trip(tmp_path):
    config = _config(C=0.25, penalty="l1", calibration={"mode": "split", "sha256": ["a" * 64]})
    again = SearchConfig.read(config.write(tmp_path / "best_config.yaml"))
    assert again == config and again.calibration_hashes == {"a" * 64}


def test_guard_names_one_shared_file(image_sets):
    records = discover_images(image_sets[0], "suspect")
    leaked = records[3]
    with pytest.raises(ImageSetError) as caught:
        check_no_calibration_images(records, _config(calibration={"sha256": [leaked.sha256, "f" * 64]}))
    message = str(caught.value)
    assert str(leaked.path) in message and "search run abc123" in message and "\n" not in message
    check_no_calibration_images(records, _config())  # no overlap: nothing to refuse


def _audit(model, suspect, control, *extra):
    return main(["audit", "--model", str(model), "--suspect", str(suspect), "--control", str(control),
                 "--no-progress", "--batch-size", "12", "--test", "welch", "--power-resamples", "0",
                 "--experiment", "search-audits", *extra])


def test_audit_refuses_images_of_the_search_calibration_data(tiny_model, image_sets, tracking_uri, tmp_path, capsys):
    leaked = discover_images(image_sets[1], "control")[0]
    path = _config(calibration={"sha256": [leaked.sha256]}).write(tmp_path / "best_config.yaml")
    code = _audit(tiny_model, *image_sets, "--config", str(path))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(leaked.path) in err and "calibration data" in err


def test_audit_from_search_uses_and_records_the_search(tiny_model, image_sets, tracking_uri, synthetic, tmp_path,
                                                       capsys):
    outcome = search(synthetic(n_per_side=30), builtin_space("gray"), n_trials=3, n=20, n_resamples=1,
                     experiment="search-unit")
    code = _audit(tiny_model, *image_sets, "--from-search", outcome.run_id, "--output", str(tmp_path / "r.json"))
    assert code == 0, capsys.readouterr().err

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["features"] == outcome.config.features and result["folds"] == outcome.config.folds
    run = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"])
    assert run.data.params["cdi.search_run_id"] == outcome.run_id
    assert run.data.tags["cdi.search_run_id"] == outcome.run_id


def test_from_search_with_an_unknown_run_is_a_user_error(tracking_uri, tiny_model, image_sets, capsys):
    assert _audit(tiny_model, *image_sets, "--from-search", "0" * 32) == 2
    assert "--from-search" in capsys.readouterr().err


def test_search_cli_on_the_tiny_model_writes_a_usable_config(tiny_model, image_sets, tracking_uri, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    code = main(["search", "--model", str(tiny_model), "--members", str(image_sets[0]),
                 "--nonmembers", str(image_sets[1]), "--access", "gray", "--n-trials", "3", "--n", "10",
                 "--resamples", "1", "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    config = SearchConfig.read(out)
    assert config.calibration["mode"] == "known" and len(config.calibration_hashes) == 24
    assert Path(config.calibration["members"]) == Path(image_sets[0]).resolve()
    printed = capsys.readouterr().out
    assert "run:" in printed
    # the built-in space leaves the difficulty to the audit: the trials were scored with its default, and it says so
    assert "trials scored with difficulty calibration image+pca+wiener, the audit's default" in printed
    assert "difficulty_calibration" not in config.feature_calibration
    assert main(["search", "--n-workers", "2", "--model", str(tiny_model)]) == 2


def test_split_mode_holds_out_a_seeded_part_of_p_and_u_and_the_audit_leaves_it_out(tiny_model, tracking_uri,
                                                                                    tmp_path, capsys):
    image_sets = (write_images(tmp_path / "P", 16, seed=11, prefix="p"),
                  write_images(tmp_path / "U", 16, seed=12, prefix="u"))
    out = tmp_path / "split.yaml"
    args = ["search", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--calibration-fraction", "0.375", "--access", "gray", "--n-trials", "2", "--n", "6", "--resamples", "1",
            "--no-progress", "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    config = SearchConfig.read(out)
    suspect_hashes = {r.sha256 for r in discover_images(image_sets[0], "suspect")}
    assert config.calibration["mode"] == "split" and len(config.calibration_hashes) == 12
    assert len(config.calibration_hashes & suspect_hashes) == 6
    assert main(args[:-1] + [str(tmp_path / "again.yaml")]) == 0  # same seed, same held-out images
    assert SearchConfig.read(tmp_path / "again.yaml").calibration_hashes == config.calibration_hashes
    capsys.readouterr()

    # 16 images per side less 6 held out: the audit runs on the other 10 + 10 and says so.
    result_path = tmp_path / "r.json"
    assert _audit(tiny_model, *image_sets, "--config", str(out), "--output", str(result_path)) == 0
    printed = capsys.readouterr().out
    assert "left out: 6 suspect and 6 control images" in printed
    result = json.loads(result_path.read_text())
    assert (result["n_suspect"], result["n_control"]) == (10, 10)
    assert result["excluded_calibration_images"]["suspect"] == 6
    client = mlflow.MlflowClient(tracking_uri)
    manifest = json.loads(Path(client.download_artifacts(result["run_id"], "manifest.json", str(tmp_path))).read_text())
    audited = {entry["sha256"] for entry in manifest["images"]}
    assert not audited & config.calibration_hashes and len(audited) == 20
    assert {entry["sha256"] for entry in manifest["excluded_images"]} == config.calibration_hashes
    # The folders still verify against the manifest: the left-out files are listed as such.
    assert main(["verify", result["run_id"], "--model", str(tiny_model), "--suspect", str(image_sets[0]),
                 "--control", str(image_sets[1])]) == 0, capsys.readouterr()


def test_split_mode_refuses_an_audit_left_with_too_few_images(image_sets):
    suspect = discover_images(image_sets[0], "suspect")
    control = discover_images(image_sets[1], "control")
    config = _config(calibration={"mode": "split", "sha256": [r.sha256 for r in suspect[:3]]})
    with pytest.raises(ImageSetError) as caught:
        exclude_calibration_images(suspect, control, config, 10)
    message = str(caught.value)
    assert "--suspect" in message and "leaving 9" in message and "--calibration-fraction" in message
    kept_suspect, kept_control, excluded = exclude_calibration_images(suspect, control, config, 9)
    assert kept_suspect == suspect[3:] and kept_control == control and excluded == suspect[:3]


def test_known_membership_calibration_images_are_refused_not_left_out(image_sets):
    suspect = discover_images(image_sets[0], "suspect")
    control = discover_images(image_sets[1], "control")
    with pytest.raises(ImageSetError):
        exclude_calibration_images(suspect, control, _config(calibration={"mode": "known",
                                                                          "sha256": [control[0].sha256]}), 10)


def test_a_searched_noise_budget_reaches_the_audit(tiny_model, image_sets, tracking_uri, tmp_path, capsys):
    """Space with the NO budget searched over {2, 3} (neither the default 8): the exported config names
    the chosen budget, and an audit with that config computes NO with it."""
    space = tmp_path / "budget.yaml"
    space.write_text("name: budget\nfamilies: [DL, \"NO\"]\ntimestep_families: []\n"
                     "feature_settings:\n  no_evals: [2, 3]\n")
    members, nonmembers = write_images(tmp_path / "m", 12, seed=21), write_images(tmp_path / "n", 12, seed=22)
    out = tmp_path / "best.yaml"
    assert main(["search", "--model", str(tiny_model), "--members", str(members), "--nonmembers", str(nonmembers),
                 "--space", str(space), "--n-trials", "4", "--n", "10", "--resamples", "1", "--no-progress",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    config = SearchConfig.read(out)
    chosen = config.feature_settings["no_evals"]
    assert chosen in (2, 3)
    result_path = tmp_path / "r.json"
    assert _audit(tiny_model, *image_sets, "--config", str(out), "--output", str(result_path)) == 0, \
        capsys.readouterr().err
    run = mlflow.MlflowClient(tracking_uri).get_run(json.loads(result_path.read_text())["run_id"])
    assert run.data.params["feature.no_evals"] == str(chosen)
