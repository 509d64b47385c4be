"""SIGTERM and SIGINT during extraction (issue 14): stop promptly, mark the run KILLED, keep the cache,
say how to resume, exit 128 + signal. A real `cdi audit` process against a real sqlite tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import pytest
from builders import save_pipeline, tiny_unet, write_images


@pytest.fixture(scope="module")
def slow_audit_inputs(tmp_path_factory):
    """Enough images and white-box features, in batches of 2, that extraction lasts well over a second."""
    root = tmp_path_factory.mktemp("signals")
    model = save_pipeline(root / "model", tiny_unet(size=16))
    return model, write_images(root / "p", 24, size=16, seed=1, prefix="p"), write_images(root / "u", 24, size=16,
                                                                                          seed=2, prefix="u")


def _wait_for_status(client, experiment: str, status: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and runs[0].data.tags.get("cdi.status") == status:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"no run reached cdi.status={status}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_extraction_kills_the_run_keeps_the_cache_and_says_how_to_resume(
        signum, slow_audit_inputs, tmp_path):
    model, suspect, control = slow_audit_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"signal-{uuid.uuid4().hex[:8]}"
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "cdi.cli", "audit", "--model", str(model), "--suspect", str(suspect),
            "--control", str(control), "--tracking-uri", uri, "--experiment", experiment, "--cache-dir", str(cache),
            "--batch-size", "2", "--threads", "1", "--power-resamples", "0", "--permutations", "100", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        client = mlflow.MlflowClient(uri)
        run = _wait_for_status(client, experiment, "extracting")
        deadline = time.monotonic() + 60
        while not list(cache.rglob("shard-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.1)  # at least one finished batch, so there is work to keep
        sent = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 128 + signum, (process.returncode, err)
    assert stopped_after < 30
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--resume {run.info.run_id}" in lines[0] and signal.Signals(signum).name in lines[0], err
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags.get("cdi.status") == "interrupted"
    shards = list(cache.rglob("shard-*.npz"))
    assert shards, "finished batches must stay in the cache"

    # Resuming finishes the same run from the cache.
    resumed = subprocess.run([*argv, "--resume", run.info.run_id], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    done = client.get_run(run.info.run_id)
    assert done.info.status == "FINISHED" and done.data.tags["cdi.status"] == "done"
    assert float(done.data.metrics["extraction.cache_hits"]) >= 2
