"""The audit's top layer (issue 15): one place applies a search config, so the Python API and the CLI agree."""

from __future__ import annotations

import json

import yaml

from cdi.audit import audit, plan_audit
from cdi.tracking import audit as audit_layout
from cdi.cli import main
from cdi.features import ExtractionOptions, FeatureConfig
from cdi.search import SearchConfig

CONFIG = {"features": ["DL", "SecMI"], "C": 0.5, "penalty": "l2", "folds": 4, "access": "gray", "seed": 3,
          "feature_settings": {"dl_draws": 2}}

QUIET = ExtractionOptions(progress=False)


def test_audit_with_a_search_config_from_python_equals_cdi_audit_with_config(tiny_model, image_sets, tracking_uri,
                                                                            tmp_path):
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    output = tmp_path / "cli.json"
    assert main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--config", str(path), "--permutations", "200", "--power-resamples", "0",
                 "--no-progress", "--output", str(output)]) == 0
    cli = json.loads(output.read_text())
    # The Python caller passes only the config: its features, access, folds, seed, C and settings apply.
    api = audit(tiny_model, *image_sets, search_config=SearchConfig.read(path), n_permutations=200,
                power_resamples=0, extraction=QUIET).to_dict()
    for key in ("p_value", "statistic", "auc", "features", "access", "seed", "folds", "coefficients", "feature_auc"):
        assert api[key] == cli[key], key
    assert cli["features"] == ["DL", "SecMI"] and cli["seed"] == 3 and cli["folds"] == 4


def test_the_plan_applies_the_whole_config_before_any_model_pass_or_tracking_call(tiny_model, image_sets, tmp_path):
    settings = dict(names=None, access="white", feature_config=FeatureConfig(), seed=0, alpha=0.01, folds=5, C=1.0,
                    penalty="l2", test="permutation", n_permutations=1000, power_resamples=0,
                    representation="calibrated", reference_formula="difference", difficulty_calibration=None)
    plan = plan_audit(tiny_model, *image_sets, settings, ExtractionOptions(cache_dir=tmp_path),
                      search_config=SearchConfig.from_dict(CONFIG))
    s = plan.settings
    assert (s.names, s.access, s.folds, s.seed, s.C, s.feature_config.dl_draws) == (("DL", "SecMI"), "gray", 4, 3, 0.5, 2)
    assert plan.configuration()["feature.dl_draws"] == 2
    assert not list(tmp_path.rglob("shard-*.npz"))


def test_the_image_sets_are_logged_as_mlflow_datasets_found_by_their_digest(tiny_model, image_sets, tracking_uri,
                                                                           tmp_path):
    """The UI's Datasets column names what was audited; one image set has one digest wherever it lies."""
    import shutil

    import mlflow

    first = audit(tiny_model, *image_sets, access="gray", features=["DL"], n_permutations=100, power_resamples=0,
                  extraction=QUIET)
    copy = shutil.copytree(image_sets[0], tmp_path / "renamed-folder")
    second = audit(tiny_model, copy, image_sets[1], access="gray", features=["DL"], n_permutations=100,
                   power_resamples=0, extraction=QUIET)
    client = mlflow.MlflowClient(tracking_uri)
    inputs = {}
    for result in (first, second):
        run = client.get_run(result.run_id)
        inputs[result.run_id] = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
                                 for d in run.inputs.dataset_inputs}
    a, b = inputs[first.run_id], inputs[second.run_id]
    assert set(a) == {"suspect", "control"}
    assert a["suspect"].digest == b["suspect"].digest  # same pictures, another folder
    assert a["suspect"].digest != a["control"].digest
    assert b["suspect"].name == "suspect: renamed-folder" and str(copy) in b["suspect"].source
    from cdi.data import discover_images

    assert a["control"].digest == audit_layout.image_set_digest(r.sha256 for r in discover_images(image_sets[1], "control"))


def test_the_audited_model_is_an_mlflow_logged_model_listing_every_audit_of_it(tiny_model, image_sets, tracking_uri):
    import mlflow

    runs = [audit(tiny_model, *image_sets, access="gray", features=["DL"], n_permutations=100, power_resamples=0,
                  extraction=QUIET, seed=seed, experiment="logged-models").run_id for seed in (0, 1)]
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("logged-models").experiment_id
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    fingerprint = client.get_run(runs[0]).data.tags["cdi.model_fingerprint"]
    assert model.name == f"target-{fingerprint[:12]}" and model.tags["cdi.model_fingerprint"] == fingerprint
    linked = {metric.run_id for metric in model.metrics if metric.key == "stats.p_value"}
    assert linked == set(runs)  # both audits are linked to the one model


def test_a_new_cdi_experiment_declares_itself_a_model_development_experiment(tiny_model, image_sets, tracking_uri):
    import mlflow

    from cdi import tracking

    audit(tiny_model, *image_sets, access="gray", features=["DL"], n_permutations=100, power_resamples=0,
          extraction=QUIET, experiment="kind-check")
    experiment = mlflow.MlflowClient(tracking_uri).get_experiment_by_name("kind-check")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_result_json_is_strict_json(tiny_model, image_sets, tracking_uri, tmp_path):
    """The permutation test has no degrees of freedom: `df` is null, not NaN, so any JSON reader takes it."""
    import json

    output = tmp_path / "result.json"
    assert main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
                 "--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0",
                 "--no-progress", "--output", str(output)]) == 0

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    data = json.loads(output.read_text(), parse_constant=refuse)
    assert data["df"] is None


def test_results_validate_against_the_documented_schema(tiny_model, image_sets, tracking_uri, tmp_path):
    """docs/result.schema.json lists every key of result.json (additionalProperties false): a plain audit, one with
    a reference model, one that drops duplicates, and the recorded golden result all validate."""
    import json
    import shutil
    from pathlib import Path

    import jsonschema

    from builders import save_pipeline, tiny_unet

    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "result.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    reference = save_pipeline(tmp_path / "reference", tiny_unet(seed=7))
    suspect = Path(shutil.copytree(image_sets[0], tmp_path / "p"))
    first = sorted(suspect.glob("*.png"))[0]
    shutil.copy(first, suspect / "copy.png")
    quick = ["--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "5", "--no-progress"]
    for k, extra in enumerate([[], ["--reference-model", str(reference)], ["--duplicates", "keep-one"]]):
        output = tmp_path / f"r{k}.json"
        sets = [str(suspect if "--duplicates" in extra else image_sets[0]), str(image_sets[1])]
        assert main(["audit", "--model", str(tiny_model), "--suspect", sets[0], "--control", sets[1], *quick, *extra,
                     "--output", str(output)]) == 0
        validator.validate(json.loads(output.read_text()))
    golden = json.loads((Path(__file__).resolve().parent / "golden" / "demo-null-result.json").read_text())
    assert not [e for e in validator.iter_errors(golden) if e.validator != "required"]


def test_verify_and_report_print_only_their_own_lines(tiny_model, image_sets, tracking_uri, tmp_path, capfd):
    """No MLflow download bars or INFO lines without -v."""
    import json

    output = tmp_path / "r.json"
    assert main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
                 "--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0",
                 "--no-progress", "--output", str(output)]) == 0
    run_id = json.loads(output.read_text())["run_id"]
    capfd.readouterr()
    assert main(["verify", run_id, "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1])]) == 0
    assert main(["report", run_id, "--output", str(tmp_path / "r.html")]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    assert [line.split(":")[0] for line in out.strip().splitlines()] == ["verified", "report"]


def test_format_json_prints_one_machine_readable_object(tiny_model, image_sets, tracking_uri, tmp_path, capfd):
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "result.schema.json").read_text())
    capfd.readouterr()
    assert main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
                 "--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0",
                 "--no-progress", "--format", "json"]) == 0
    (line,) = capfd.readouterr().out.strip().splitlines()
    result = json.loads(line)
    jsonschema.validate(result, schema)
    assert main(["verify", result["run_id"], "--model", str(tiny_model), "--suspect", str(image_sets[0]),
                 "--control", str(image_sets[1]), "--format", "json"]) == 0
    (line,) = capfd.readouterr().out.strip().splitlines()
    verified = json.loads(line)
    assert verified["verified"] is True and verified["differences"] == [] and verified["checked_files"] > 0
    assert main(["report", result["run_id"], "--output", str(tmp_path / "r.html"), "--format", "json"]) == 0
    (line,) = capfd.readouterr().out.strip().splitlines()
    assert json.loads(line) == {"report": str(tmp_path / "r.html"), "run_id": result["run_id"],
                                "verdict": result["verdict"], "p_value": result["p_value"]}
