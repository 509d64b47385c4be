"""Fault: the tracking server dies mid-audit; features stay cached and `--resume` finishes the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

import cdi.audit
from cdi.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=root, start_new_session=True,
    )
    for _ in range(240):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start")


def _stop(proc):
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)


def test_lost_server_mid_audit_then_resume_finishes_the_same_run(tiny_model, image_sets, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    port, cache = _free_port(), tmp_path / "cache"
    url = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    real_assess = cdi.audit.assess

    def assess_then_lose_the_server(*args, **kwargs):
        found = real_assess(*args, **kwargs)
        _stop(server)  # the features are extracted and scored; logging them will fail
        return found

    monkeypatch.setattr(cdi.audit, "assess", assess_then_lose_the_server)
    args = ["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--access", "gray", "--power-resamples", "0", "--no-progress", "--tracking-uri", url,
            "--cache-dir", str(cache)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "lost the tracking store mid-audit" in err and "--resume" in err and len(err.splitlines()) == 1
    run_id = err.rsplit("--resume ", 1)[1].split()[0]

    monkeypatch.setattr(cdi.audit, "assess", real_assess)
    server = _start_server(tmp_path, port)
    try:
        out = tmp_path / "r.json"
        assert main([*args, "--resume", run_id, "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["run_id"] == run_id
        import mlflow

        run = mlflow.MlflowClient(url).get_run(run_id)
        assert run.info.status == "FINISHED" and "p_value" in run.data.metrics
        assert run.data.metrics["cache_misses"] == 0  # no model pass was repeated
        assert main([*args, "--resume", run_id]) == 2  # a finished run is not reopened
        assert "already finished" in capsys.readouterr().err
    finally:
        _stop(server)
