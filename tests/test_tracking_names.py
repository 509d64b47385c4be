"""Runs a person can find in the MLflow UI: named after what they are, with system metrics."""

from __future__ import annotations

import time
import uuid

import mlflow
import pytest

from cdi import tracking


def test_a_run_mlflow_run_created_with_a_made_up_name_gets_cdis_name(tracking_uri, monkeypatch):
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(f"project-{uuid.uuid4().hex[:6]}")
    made_up = client.create_run(experiment_id)  # as `mlflow run` without --run-name: e.g. "bright-fox-123"
    chosen = client.create_run(experiment_id, run_name="calibrate step")  # as --run-name or a pipeline step
    assert tracking.is_generated_run_name(made_up.info.run_name)
    for run, expected in ((made_up, "audit-model-1234abcd"), (chosen, "calibrate step")):
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        with tracking.audit_run(tracking_uri, "ignored under mlflow run", run_name="audit-model-1234abcd"):
            pass
        assert client.get_run(run.info.run_id).info.run_name == expected
        assert client.get_run(run.info.run_id).info.experiment_id == experiment_id  # --experiment-name's choice


def test_an_audit_run_records_system_metrics_when_psutil_is_there(tracking_uri, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with tracking.audit_run(tracking_uri, f"sysmetrics-{uuid.uuid4().hex[:6]}", run_name="audit-x") as run_id:
        time.sleep(1.5)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.run_name == "audit-x"
    assert any(key.startswith("system/cpu") for key in run.data.metrics), sorted(run.data.metrics)


def test_a_param_whose_value_is_none_is_not_logged(tracking_uri):
    with tracking.audit_run(tracking_uri, f"params-{uuid.uuid4().hex[:6]}") as run_id:
        tracking.log_params({"prompt": None, "threads": None, "seed": 0, "features": ["DL", "PIA"]})
    params = mlflow.MlflowClient(tracking_uri).get_run(run_id).data.params
    assert params == {"seed": "0", "features": "DL,PIA"}  # no "None" strings in the UI's params table


def test_a_local_sqlite_store_keeps_artifacts_beside_its_database_not_in_the_working_directory(tmp_path, monkeypatch):
    import mlflow

    from cdi import tracking

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    experiment_id = tracking.connect(uri, "cdi audits/2026")
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (store / "mlruns" / "cdi_audits_2026").as_uri()
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_text("x", "note.txt")
    assert list((store / "mlruns").rglob("note.txt")) and not list(elsewhere.iterdir())
    assert tracking.local_artifact_location("http://127.0.0.1:5000", "x") is None
