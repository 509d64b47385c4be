"""`mlflow run .` drives the audit through the MLproject's main entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]


def test_mlflow_run_main_entry_point_logs_the_audit_into_the_project_run(tiny_model, image_sets, tmp_path,
                                                                          tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "project",
         "-P", f"model={tiny_model}", "-P", f"suspect={image_sets[0]}", "-P", f"control={image_sets[1]}",
         "-P", "access=gray", "-P", "seed=1.0", "-P", "batch_size=12", "-P", f"output={tmp_path / 'r.json'}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict:" in proc.stdout
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("project")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "1.0"  # the project's own value is kept, no conflict
    assert run.data.params["n_suspect"] == "12" and "stats.p_value" in run.data.metrics
    assert run.data.tags["cdi.verdict"] in ("used", "not_detected")
    # MLflow made up the project run's name; cdi names it after what it audited
    assert run.info.run_name == f"audit-{Path(tiny_model).resolve().name}-{run.data.params['model_fingerprint'][:8]}"


def test_the_search_entry_point_takes_an_optuna_storage_and_defaults_to_memory():
    import shlex

    from mlflow.projects._project_spec import load_project

    from cdi.cli import build_parser

    entry = load_project(str(REPO)).get_entry_point("search")
    for given, expected in (({}, None), ({"storage": "sqlite:///search.db"}, "sqlite:///search.db")):
        args = shlex.split(entry.compute_command(given, storage_dir=None))
        parsed = build_parser().parse_args(["search", *args[args.index("search/run_search.py") + 1:]])
        assert parsed.storage == expected
