"""A team's setup end to end: audits log to `cdi server` (PostgreSQL + S3) and anyone rebuilds reports."""

from __future__ import annotations

import json
import subprocess
import sys

from cdi.cli import main


def _audit_args(model, image_sets, url, output, seed=0):
    return ["audit", "--model", str(model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--tracking-uri", url, "--access", "gray", "--power-resamples", "0", "--no-progress",
            "--seed", str(seed), "--output", str(output)]


def test_audit_artifacts_land_in_the_bucket_and_another_client_rebuilds_the_report(
        team_server, bucket_keys, client_env, tiny_model, image_sets, tmp_path, monkeypatch, capsys):
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # a client has no S3 access: the server proxies artifacts
    out = tmp_path / "result.json"
    assert main(_audit_args(tiny_model, image_sets, team_server, out)) == 0
    result = json.loads(out.read_text())
    run_id = result["run_id"]

    keys = bucket_keys()
    for artifact in ("features.csv", "result.json", "summary.md", "manifest.json"):
        assert any(key.endswith(f"/{run_id}/artifacts/{artifact}") for key in keys), (artifact, sorted(keys))

    # A second client (a new MlflowClient, still without S3 credentials or endpoint) lists and downloads the
    # artifacts through the server into a folder of its own; the audit's run folder is not read.
    import mlflow

    second = mlflow.MlflowClient(team_server)
    listed = {f.path for f in second.list_artifacts(run_id)}
    assert {"features.csv", "result.json", "summary.md"} <= listed
    (tmp_path / "second-client").mkdir()
    downloaded = second.download_artifacts(run_id, "result.json", str(tmp_path / "second-client"))
    logged = json.loads(open(downloaded).read())
    assert (logged["verdict"], logged["p_value"]) == (result["verdict"], result["p_value"])

    report = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["report", run_id, "--tracking-uri", team_server, "--output", str(report)]) == 0
    assert f"(verdict {result['verdict']}, p = {result['p_value']:.3g})" in capsys.readouterr().out
    assert report.stat().st_size > 0


def test_two_audits_at_once_give_two_finished_runs(team_server, bucket_keys, client_env, tiny_model, image_sets,
                                                    tmp_path):
    """Two team members audit at the same moment against the one server."""
    import mlflow

    cache = tmp_path / "cache"  # one fresh feature cache, shared, so both really compute
    env = client_env(CDI_CACHE_DIR=str(cache))
    outputs = [tmp_path / f"result-{seed}.json" for seed in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-m", "cdi.cli", *_audit_args(tiny_model, image_sets, team_server,
                                                                             out, seed=seed), "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for seed, out in zip((1, 2), outputs)]
    finished = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, stderr) in zip(procs, finished):
        assert proc.returncode == 0, stderr[-2000:]

    run_ids = [json.loads(out.read_text())["run_id"] for out in outputs]
    assert len(set(run_ids)) == 2
    client = mlflow.MlflowClient(team_server)
    keys = bucket_keys()
    for run_id, seed in zip(run_ids, (1, 2)):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["seed"] == str(seed)
        assert "stats.p_value" in run.data.metrics
        assert any(key.endswith(f"/{run_id}/artifacts/result.json") for key in keys)
