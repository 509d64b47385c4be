"""Fault: the tracking server dies mid-audit; features stay cached and `--resume` finishes the run."""

from __future__ import annotations

import json

from builders import free_port, start_mlflow_server, stop_mlflow_server

import cdi.audit
from cdi.cli import main


def test_lost_server_mid_audit_then_resume_finishes_the_same_run(tiny_model, image_sets, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    port, cache = free_port(), tmp_path / "cache"
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    real_assess = cdi.audit.assess

    def assess_then_lose_the_server(*args, **kwargs):
        found = real_assess(*args, **kwargs)
        stop_mlflow_server(server)  # the features are extracted and scored; logging them will fail
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
    server = start_mlflow_server(tmp_path, port)
    try:
        out = tmp_path / "r.json"
        assert main([*args, "--resume", run_id, "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["run_id"] == run_id
        import mlflow

        run = mlflow.MlflowClient(url).get_run(run_id)
        assert run.info.status == "FINISHED" and "stats.p_value" in run.data.metrics
        assert run.data.metrics["extraction.cache_misses"] == 0  # no model pass was repeated
        assert main([*args, "--resume", run_id]) == 2  # a finished run is not reopened
        assert "already finished" in capsys.readouterr().err
    finally:
        stop_mlflow_server(server)
