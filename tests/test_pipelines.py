"""pipelines/: each step its own MLflow run under one parent run; a finished step with the same inputs,
parameters and code is reused (no model pass, no new run); a changed parameter re-runs that step and the
ones after it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import mlflow
import pytest

from builders import save_pipeline, tiny_unet, write_images

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pipelines` is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from pipelines import owner_audit as owner  # noqa: E402
from pipelines import steps  # noqa: E402
from pipelines.demo_chain import demo_chain  # noqa: E402

OWNER_STEPS = ["calibrate", "search", "audit", "report"]


@pytest.fixture
def code(monkeypatch) -> dict[str, str]:
    """A fixed code version (set `code["version"]` to change it): the sources of this checkout may change while
    the tests run; how the version is derived is tested on its own below."""
    code = {"version": "test-code-1"}
    monkeypatch.setattr(steps, "code_version", lambda extra=(): code["version"])
    return code


@pytest.fixture(scope="module")
def reference_data(tmp_path_factory) -> dict[str, Path]:
    """A second tiny model (the reference) with 10 known members and 20 known non-members, disjoint from P and U."""
    root = tmp_path_factory.mktemp("reference")
    return {"reference_model": save_pipeline(root / "reference", tiny_unet(seed=1)),
            "members": write_images(root / "members", 10, seed=3, prefix="m"),
            "nonmembers": write_images(root / "nonmembers", 20, seed=4, prefix="n")}


def _children(client, experiment_id: str, parent_run_id: str) -> list:
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return sorted(runs, key=lambda run: int(run.data.tags["cdi.pipeline.step_index"]))


def _all_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], max_results=1000)


def test_owner_audit_runs_each_step_once_reuses_it_and_reruns_from_a_changed_parameter(
        tiny_model, image_sets, reference_data, tracking_uri, tmp_path, engine_passes, code):
    tiny = {"access": "gray", "n_trials": 3, "n": 8, "search_resamples": 2, "null_audits": 2,
            "calibration_resamples": 2, "calibration_permutations": 19, "permutations": 100, "power_resamples": 2,
            "seed": 0}
    where = {"experiment": "pipeline-owner", "tracking_uri": tracking_uri, "cache_dir": tmp_path / "cache",
             "work_dir": tmp_path / "work"}
    sets = (tiny_model, *image_sets, reference_data["reference_model"], reference_data["members"],
            [reference_data["nonmembers"]])
    client = mlflow.MlflowClient(tracking_uri)

    first = owner.owner_audit(*sets, **tiny, run=steps.RunOptions(**where))
    experiment_id = client.get_run(first.parent_run_id).info.experiment_id
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cdi.pipeline.role"] == "parent"
    children = _children(client, experiment_id, first.parent_run_id)
    assert [run.data.tags["cdi.pipeline.step"] for run in children] == OWNER_STEPS
    assert [run.info.run_name for run in children] == OWNER_STEPS
    assert all(run.info.status == "FINISHED" for run in children)
    starts = [run.info.start_time for run in children]
    assert starts == sorted(starts)
    ids = {run.data.tags["cdi.pipeline.step"]: run.info.run_id for run in children}
    assert [(s.name, s.run_id, s.reused) for s in first.steps] == [(name, ids[name], False) for name in OWNER_STEPS]
    assert {f"cdi.pipeline.run.{name}": ids[name] for name in OWNER_STEPS}.items() <= parent.data.tags.items()
    assert engine_passes, "the first run computes features"

    # Each step consumed the one before: the search ran on the calibration step's reference data, the audit
    # took the search's configuration, and the report copied the audit's page.
    searched = client.get_run(ids["search"]).data.params
    assert searched["calibration.model"] == str(reference_data["reference_model"].resolve())
    assert searched["calibration.mode"] == "known"
    audited = client.get_run(ids["audit"])
    assert audited.data.params["cdi.search_run_id"] == ids["search"]
    assert first.result["run_id"] == ids["audit"] and first.result["verdict"] in ("used", "not_detected")
    assert parent.data.tags["cdi.verdict"] == first.result["verdict"]
    page = mlflow.artifacts.load_text(f"runs:/{ids['report']}/report.html")
    assert page == mlflow.artifacts.load_text(f"runs:/{ids['audit']}/report.html")
    assert ids["calibrate"] in first.summary and f"p = {first.result['p_value']:.3g}" in first.summary

    # The same command again, through the command line: every step reused, no model pass, no new step run.
    runs_before = len(_all_runs(client, experiment_id))
    passes_before = len(engine_passes)
    report, output = tmp_path / "report.html", tmp_path / "result.json"
    argv = [str(tiny_model), str(image_sets[0]), str(image_sets[1]), str(reference_data["reference_model"]),
            str(reference_data["members"]), str(reference_data["nonmembers"])]
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in {**tiny, **where}.items()]
    assert owner.main([*(f"--{name.replace('_', '-')}={path}" for name, path in zip(owner.SET_OPTIONS, argv)),
                       *flags, "--no-progress", f"--report={report}", f"--output={output}"]) == 0
    assert len(engine_passes) == passes_before
    second = json.loads(output.read_text())
    assert [(s["step"], s["run_id"], s["reused"]) for s in second["steps"]] == [(n, ids[n], True) for n in OWNER_STEPS]
    assert len(_all_runs(client, experiment_id)) == runs_before + 1  # the new parent only
    assert _children(client, experiment_id, second["pipeline_run_id"]) == []
    assert client.get_run(second["pipeline_run_id"]).data.tags["cdi.pipeline.reused.audit"] == "true"
    assert report.read_text() == page and second["p_value"] == first.result["p_value"]

    # An audit parameter: calibrate and search reused, audit and report re-run (as children of the new parent).
    third = owner.owner_audit(*sets, **{**tiny, "permutations": 120}, run=steps.RunOptions(**where))
    assert [(s.name, s.reused) for s in third.steps] == [("calibrate", True), ("search", True), ("audit", False),
                                                          ("report", False)]
    assert [s.run_id for s in third.steps[:2]] == [ids["calibrate"], ids["search"]]
    rerun = _children(client, experiment_id, third.parent_run_id)
    assert [run.data.tags["cdi.pipeline.step"] for run in rerun] == ["audit", "report"]
    assert client.get_run(third.steps[2].run_id).data.params["n_permutations"] == "120"

    # A search parameter: only the calibration is reused.
    fourth = owner.owner_audit(*sets, **{**tiny, "n_trials": 4}, run=steps.RunOptions(**where))
    assert [s.reused for s in fourth.steps] == [True, False, False, False]
    assert fourth.steps[0].run_id == ids["calibrate"]
    assert client.get_run(fourth.steps[1].run_id).data.params["n_trials"] == "4"

    # Other code: every step re-runs.
    code["version"] = "test-code-2"
    fifth = owner.owner_audit(*sets, **tiny, run=steps.RunOptions(**where))
    assert [s.reused for s in fifth.steps] == [False] * 4
    assert client.get_run(fifth.steps[0].run_id).data.tags["cdi.pipeline.code_version"] == "test-code-2"


def test_owner_audit_wants_every_set_or_none(tiny_model, tracking_uri, tmp_path):
    from cdi.errors import OptionError

    with pytest.raises(OptionError, match="--suspect, --control, --reference-model, --members, --nonmembers: missing"):
        owner.owner_audit(tiny_model, run=steps.RunOptions(tracking_uri=tracking_uri, work_dir=tmp_path,
                                                            experiment="pipeline-refused"))
    assert mlflow.MlflowClient(tracking_uri).get_experiment_by_name("pipeline-refused") is None


def test_owner_audit_refuses_calibration_images_in_p_or_u_before_any_run(tiny_model, image_sets, reference_data,
                                                                         tracking_uri, tmp_path):
    from cdi.errors import ImageSetError

    suspect, control = image_sets
    with pytest.raises(ImageSetError, match="the same image as calibration image"):
        owner.owner_audit(tiny_model, suspect, control, reference_data["reference_model"], suspect,
                          [reference_data["nonmembers"]], run=steps.RunOptions(tracking_uri=tracking_uri,
                                                                               work_dir=tmp_path,
                                                                               experiment="pipeline-overlap"))
    assert mlflow.MlflowClient(tracking_uri).get_experiment_by_name("pipeline-overlap") is None


def test_demo_sets_split_the_demo_into_disjoint_calibration_and_audit_halves(tmp_path):
    from cdi.data import discover_images

    sets = owner.demo_sets(tmp_path)

    def hashes(folder):
        return {r.sha256 for r in discover_images(folder, "suspect")}

    members, heldout, heldout2 = (hashes(owner.DEMO / name) for name in ("members", "heldout", "heldout2"))
    suspect, control = hashes(sets["suspect"]), hashes(sets["control"])
    known, unknown = hashes(sets["members"]), hashes(sets["nonmembers"][0])
    assert (len(suspect), len(control), len(known), len(unknown)) == (50, 50, 50, 150)
    assert suspect | known == members and not suspect & known  # P and the calibration members: halves of members/
    assert control | (unknown - heldout2) == heldout and not control & unknown
    assert heldout2 <= unknown and sets["model"] == sets["reference_model"] == owner.DEMO / "model"
    assert owner.demo_sets(tmp_path) == sets and len(list(tmp_path.iterdir())) == 1  # made once


def test_demo_chain_trains_once_and_reuses_the_target(tracking_uri, tmp_path, engine_passes, code):
    tiny = {"n_members": 20, "n_heldout": 20, "steps": 3, "train_batch_size": 10, "access": "gray",
            "permutations": 100, "power_resamples": 2}
    where = {"experiment": "pipeline-demo", "tracking_uri": tracking_uri, "cache_dir": tmp_path / "cache",
             "work_dir": tmp_path / "work"}
    client = mlflow.MlflowClient(tracking_uri)

    first = demo_chain(**tiny, run=steps.RunOptions(**where))
    experiment_id = client.get_run(first.parent_run_id).info.experiment_id
    children = _children(client, experiment_id, first.parent_run_id)
    assert [run.data.tags["cdi.pipeline.step"] for run in children] == ["train", "audit"]
    train, audited = children
    assert train.data.params["steps"] == "3" and train.data.tags["cdi.role"] == "demo_target"  # train.py's record
    assert {a.path for a in client.list_artifacts(train.info.run_id, "demo_target")} >= {
        "demo_target/model", "demo_target/members", "demo_target/heldout", "demo_target/split.json"}
    assert first.result["run_id"] == audited.info.run_id and first.result["n_suspect"] == 20
    assert audited.data.params["model_path"] == str((first.folder / "model").resolve())
    fingerprint = steps.model_digest(first.folder / "model")

    runs_before, passes_before = len(_all_runs(client, experiment_id)), len(engine_passes)
    second = demo_chain(**tiny, run=steps.RunOptions(**where))
    assert [(s.name, s.run_id, s.reused) for s in second.steps] == [
        ("train", train.info.run_id, True), ("audit", audited.info.run_id, True)]
    assert len(engine_passes) == passes_before and len(_all_runs(client, experiment_id)) == runs_before + 1

    # The trained folder is gone and an audit parameter changed: the target comes back from the train run's
    # artifact (no training), and only the audit re-runs.
    shutil.rmtree(first.folder)
    third = demo_chain(**{**tiny, "alpha": 0.05}, run=steps.RunOptions(**where))
    assert [(s.name, s.reused) for s in third.steps] == [("train", True), ("audit", False)]
    assert third.folder == first.folder and steps.model_digest(third.folder / "model") == fingerprint
    trains = client.search_runs([experiment_id], filter_string="tags.`cdi.pipeline.step` = 'train'")
    assert len(trains) == 1
    assert [run.data.tags["cdi.pipeline.step"] for run in _children(client, experiment_id, third.parent_run_id)] == [
        "audit"]


def test_code_version_outside_git_is_cdi_version_and_a_digest_of_the_sources(tmp_path, monkeypatch):
    import cdi

    monkeypatch.setattr(steps, "_git", lambda *args: None)
    script = tmp_path / "train.py"
    script.write_text("print('a')\n")
    before = steps.code_version([script])
    assert before.startswith(f"cdi {cdi.__version__} + sources ")
    script.write_text("print('b')\n")
    assert steps.code_version([script]) != before
    expected = hashlib.sha256(f"train.py\t{hashlib.sha256(b'print(1)').hexdigest()}".encode()).hexdigest()
    script.write_bytes(b"print(1)")
    assert steps.sources_digest([script]) == expected


@pytest.mark.parametrize("entry_point", ["owner_audit", "demo_chain"])
def test_mlproject_entry_points_pass_options_the_command_line_takes(entry_point):
    """`mlflow run pipelines -e NAME`: the command, with every default, parses (MLflow passes floats as '2.0')."""
    import importlib
    import shlex

    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(REPO / "pipelines"))
    command = project.get_entry_point(entry_point).compute_command({"seed": "2.0"}, None)
    prefix = f"cd .. && python -m pipelines.{entry_point} "
    assert command.startswith(prefix)
    args = importlib.import_module(f"pipelines.{entry_point}").build_parser().parse_args(
        shlex.split(command[len(prefix):]))
    assert args.seed == 2 and args.work_dir is None
    if entry_point == "owner_audit":
        assert (args.model, args.nonmembers, args.space, args.member_fraction) == (None, [], None, None)
