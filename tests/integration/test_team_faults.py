"""Faults of the team setup: `cdi server` (PostgreSQL + proxied S3) dies mid-audit and comes back."""

from __future__ import annotations

import json

import cdi.audit
from cdi.cli import main

ARTIFACTS = ("features.csv", "result.json", "summary.md", "manifest.json", "report.html")


def test_server_killed_mid_audit_then_restarted_and_resume_finishes_the_same_run(
        own_team_server, own_database, s3_keys, tiny_model, image_sets, tmp_path, monkeypatch, capsys, engine_passes):
    import mlflow
    import psycopg2

    server = own_team_server
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)  # a team member: no S3 access, the server proxies artifacts
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    real_assess = cdi.audit.assess

    def assess_then_kill_the_server(*args, **kwargs):
        found = real_assess(*args, **kwargs)
        server.kill()  # features extracted and scored, nothing logged yet: the metrics and artifacts will fail
        return found

    monkeypatch.setattr(cdi.audit, "assess", assess_then_kill_the_server)
    args = ["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--access", "gray", "--power-resamples", "0", "--no-progress", "--tracking-uri", server.url,
            "--cache-dir", str(tmp_path / "cache")]  # a fresh cache: the first attempt computes every feature
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "lost the tracking store mid-audit" in err and "--resume" in err and len(err.splitlines()) == 1, err
    run_id = err.rsplit("--resume ", 1)[1].split()[0]
    assert not any(f"/{run_id}/" in key for key in s3_keys(server.artifacts_destination))

    monkeypatch.setattr(cdi.audit, "assess", real_assess)
    assert engine_passes == [(1, 24)]  # the first attempt computed every feature
    server.start()  # same port, database and bucket prefix
    # The resume runs with cdi's own network settings (30 s, 3 retries), as a user's would: the 5 s without
    # retries above only makes the lost server fail fast, and failed a just-restarted server on loaded cores.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    out = tmp_path / "resumed.json"
    assert main([*args, "--resume", run_id, "--output", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["run_id"] == run_id

    run = mlflow.MlflowClient(server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["stats.p_value"] == result["p_value"]
    n_images = result["n_suspect"] + result["n_control"]
    assert engine_passes == [(1, 24)]  # the cache served every image: no model pass was repeated
    assert (run.data.metrics["extraction.cache_misses"], run.data.metrics["extraction.cache_hits"]) == (0, n_images)

    keys = s3_keys(server.artifacts_destination)
    for artifact in ARTIFACTS:
        assert any(key.endswith(f"/{run_id}/artifacts/{artifact}") for key in keys), (artifact, sorted(keys))

    with psycopg2.connect(own_database) as connection, connection.cursor() as cursor:  # the run lives in PostgreSQL
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchall() == [("FINISHED",)]
    connection.close()
