"""A real `mlflow server` on 127.0.0.1 finds an audit's run and its p-value through the REST API."""

from __future__ import annotations

import json

import pytest
import requests

from cdi.cli import main

from builders import free_port, start_mlflow_server, stop_mlflow_server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)


def test_server_finds_the_audit_run_and_its_p_value(mlflow_server, tiny_model, image_sets, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "result.json"
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--access", "gray", "--tracking-uri", mlflow_server, "--no-progress",
                 "--power-resamples", "0", "--output", str(out)])  # the power curve adds nothing asked of the server
    assert code == 0
    result = json.loads(out.read_text())
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "cdi-audits"}).json()
    found = requests.post(
        f"{api}/runs/search",
        json={"experiment_ids": [experiment["experiment"]["experiment_id"]],
              "filter": f"tags.`cdi.model_fingerprint` = '{result['model_fingerprint']}'"},
    ).json()["runs"]
    assert [r["info"]["run_id"] for r in found] == [result["run_id"]]
    metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
    assert metrics["stats.p_value"] == pytest.approx(result["p_value"])
    assert found[0]["info"]["status"] == "FINISHED"
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": result["run_id"]}).json()
    assert {"features.csv", "result.json", "summary.md"} <= {f["path"] for f in listed["files"]}
