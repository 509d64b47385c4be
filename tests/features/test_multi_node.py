"""Two nodes on loopback: each runs the same `cdi audit` command with its NODE_RANK, as on a cluster.

Lightning's `ddp` strategy with `--num-nodes 2 --devices 1` joins the two processes through
MASTER_ADDR/MASTER_PORT; they share the cache directory (a shared filesystem on a real cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np

from cdi.data import build_image_sets
from cdi.features import GRAY_BOX_FEATURES, extract
from cdi.models import load_model

from builders import free_port


def test_two_nodes_running_the_same_command_share_the_work_and_rank_0_alone_reports(tiny_model, image_sets,
                                                                                      tmp_path):
    cache, tracking_uri, out = tmp_path / "cache", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "result.json"
    command = [sys.executable, "-m", "cdi", "audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]),
               "--control", str(image_sets[1]), "--access", "gray", "--power-resamples", "0", "--no-progress",
               "--tracking-uri", tracking_uri, "--cache-dir", str(cache), "--device", "cpu", "--threads", "1",
               "--num-nodes", "2", "--devices", "1", "--strategy", "ddp", "--batch-size", "5", "--output", str(out)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("MLFLOW_RUN_ID", None)
    nodes = [subprocess.Popen(command, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    try:
        (out1, err1), (out0, err0) = (node.communicate(timeout=300) for node in nodes)
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], err0 + err1
    assert "verdict:" in out0 and "verdict:" not in out1
    assert "rank 0 reports the audit" in out1 + err1

    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri).search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # node 1 logged nothing
    assert runs[0].info.run_id == json.loads(out.read_text())["run_id"]

    # Both nodes computed: 24 images in 5 batches of 5, batches 0, 2, 4 on rank 0 and 1, 3 on rank 1; the run's
    # seconds per family are those of all five shards.
    shards = sorted(Path(cache).rglob("shard-*.npz"))
    ranks = [path.name.split("-")[2] for path in shards]
    assert (ranks.count("r0"), ranks.count("r1")) == (3, 2)
    spent: dict[str, float] = {}
    for shard in shards:
        with np.load(shard) as data:
            for family, seconds in json.loads(str(data["seconds"])).items():
                spent[family] = spent.get(family, 0.0) + seconds
    logged = {key.removeprefix("extraction.seconds."): value for key, value in runs[0].data.metrics.items()
              if key.startswith("extraction.seconds.")}
    assert spent.keys() <= logged.keys() and all(abs(logged[f] - spent[f]) < 1e-3 for f in spent)

    # The merged features are the bits one process computes alone.
    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    records = [*suspect, *control]
    merged = extract(adapter, records, GRAY_BOX_FEATURES, batch_size=5, progress=False, cache_dir=cache)
    assert (merged.cache_hits, merged.cache_misses) == (24, 0)
    alone = extract(adapter, records, GRAY_BOX_FEATURES, batch_size=5, progress=False, use_cache=False,
                    device="cpu", threads=1)
    np.testing.assert_array_equal(merged.values, alone.values)
