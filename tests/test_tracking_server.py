"""A real `mlflow server` on 127.0.0.1 finds an audit's run and its p-value through the REST API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from cdi.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), env=env, cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_server_finds_the_audit_run_and_its_p_value(mlflow_server, tiny_model, image_sets, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "result.json"
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control",
                 str(image_sets[1]), "--access", "gray", "--tracking-uri", mlflow_server, "--no-progress",
                 "--output", str(out)])
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
    assert metrics["p_value"] == pytest.approx(result["p_value"])
    assert found[0]["info"]["status"] == "FINISHED"
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": result["run_id"]}).json()
    assert {"features.csv", "result.json", "summary.md"} <= {f["path"] for f in listed["files"]}
