"""How an audit is laid out in MLflow. The only module that talks to MLflow.

One run per audit, in experiment `cdi-audits` unless told otherwise:
- params: model path and fingerprint, set sizes, access level, features, seed, alpha, folds,
  the feature configuration (`feature.*`) and the versions of cdi, torch, diffusers, lightning;
- metrics: `p_value`, `t_statistic`, `auc`, ...;
- artifacts: `features.csv` (one row per image), `result.json`, `summary.md`;
- tags: `cdi.verdict`, `cdi.model_fingerprint`, and the Markdown description (`mlflow.note.content`).
When started by `mlflow run`, the audit logs into the project's run (MLFLOW_RUN_ID).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from cdi.errors import TrackingError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "cdi-audits"
NOTE_TAG = "mlflow.note.content"


def resolve_tracking_uri(option: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return option or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at `tracking_uri` and make sure it answers; return the experiment id.

    Called before any model pass so an unreachable server fails fast.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        _probe_server(tracking_uri)
    try:
        if os.environ.get("MLFLOW_RUN_ID"):
            return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
        found = mlflow.get_experiment_by_name(experiment)
        return found.experiment_id if found else mlflow.create_experiment(experiment)
    except (MlflowException, OSError, ConnectionError) as exc:
        refused = _refusal(exc, tracking_uri, None if os.environ.get("MLFLOW_RUN_ID") else experiment)
        if refused is not None:
            raise refused from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"--tracking-uri {tracking_uri}: cannot use the tracking store ({first}); "
            "start the server or pass a reachable URI"
        ) from exc


def _probe_server(tracking_uri: str) -> None:
    """One quick request, so a down server fails in seconds instead of after MLflow's retries."""
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=10)
    except requests.RequestException as exc:
        raise TrackingError(
            f"--tracking-uri {tracking_uri}: the tracking server does not answer ({type(exc).__name__}); "
            "start it or pass a reachable URI"
        ) from exc


def _refusal(exc: BaseException, tracking_uri: str, experiment: str | None) -> TrackingError | None:
    """The one-line error for a server that refuses the login (HTTP 401) or the user (HTTP 403), else None.

    MLflow sends MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) with
    every request; a server started with `cdi server --app-name basic-auth` answers 401 without
    them or with wrong ones, and 403 when the user lacks permission on the experiment.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    status = exc.get_http_status_code()
    if status not in (401, 403):
        return None
    username = _username()
    if status == 401:
        if username:
            problem = f"the tracking server refused the login of user {username!r} (HTTP 401)"
            fix = "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            problem = "the tracking server refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401)"
            fix = "check the token, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
        else:
            problem = "the tracking server requires a login (HTTP 401)"
            fix = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"
        return TrackingError(f"--tracking-uri {tracking_uri}: {problem}; {fix}")
    who = f"user {username!r}" if username else "this login"
    if experiment is None:  # an existing run (--resume, `mlflow run`): its experiment is fixed
        return TrackingError(f"--tracking-uri {tracking_uri}: {who} lacks permission on the run's experiment "
                             "(HTTP 403); ask an admin of the server for EDIT permission on it")
    return TrackingError(
        f"--tracking-uri {tracking_uri}: {who} lacks permission on experiment {experiment!r} (HTTP 403); "
        "ask an admin of the server for EDIT permission on it, or pass --experiment with a new name"
    )


def _username() -> str | None:
    """The user MLflow logs in as: MLFLOW_TRACKING_USERNAME, else ~/.mlflow/credentials."""
    try:
        from mlflow.utils.credentials import read_mlflow_creds

        return read_mlflow_creds().username
    except (ImportError, OSError, ValueError):
        return os.environ.get("MLFLOW_TRACKING_USERNAME")


_LOST_CONNECTION = (ConnectionError, OSError)


@contextmanager
def audit_run(
    tracking_uri: str, experiment: str, run_name: str | None = None, resume_run_id: str | None = None
) -> Iterator[str]:
    """Open the audit's run (or the `mlflow run` project's run, or a run to resume); FAILED if it raises.

    If the tracking store stops answering mid-audit, the features are already in the cache: the
    error says how to finish the same run with `--resume RUN_ID`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_id = connect(tracking_uri, experiment)
    run_id = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        try:
            status = mlflow.get_run(resume_run_id).info.status
        except MlflowException as exc:
            raise _refusal(exc, tracking_uri, None) or TrackingError(
                f"--resume {resume_run_id}: no such run at {tracking_uri}; check the run id") from exc
        if status == "FINISHED":
            raise TrackingError(f"--resume {resume_run_id}: the run is already finished; start a new audit instead")
    try:
        if run_id:
            active = mlflow.start_run(run_id=run_id)
        else:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    except MlflowException as exc:  # e.g. a user who may read the experiment but not write to it (HTTP 403)
        refused = _refusal(exc, tracking_uri, None if run_id else experiment)
        if refused is None:
            raise
        raise refused from exc
    run_id = active.info.run_id
    try:
        yield run_id
    except BaseException as exc:
        try:
            mlflow.end_run(status="FAILED")
        except (MlflowException, *_LOST_CONNECTION):
            pass  # the store is gone: the run stays open for --resume
        if isinstance(exc, (MlflowException, *_LOST_CONNECTION)) and not isinstance(exc, TrackingError):
            raise TrackingError(
                f"--tracking-uri {tracking_uri}: lost the tracking store mid-audit ({type(exc).__name__}); "
                f"the features are cached: when it is back, rerun the same command with --resume {run_id}"
            ) from exc
        raise
    mlflow.end_run(status="FINISHED")


def experiment_name(run_id: str) -> str:
    import mlflow

    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def log_params(params: Mapping[str, Any]) -> None:
    """Log params; keys that `mlflow run` already logged from the MLproject keep their value."""
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({key: _param_value(value) for key, value in params.items() if key not in existing})


def log_metrics(metrics: Mapping[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({key: float(value) for key, value in metrics.items()})


def set_tags(tags: Mapping[str, str]) -> None:
    import mlflow

    mlflow.set_tags(dict(tags))


def log_evidence(
    result: Mapping[str, Any],
    table: "Any",
    summary_markdown: str,
    manifest: Mapping[str, Any],
    report_html: str | None,
) -> None:
    """Log the per-image table, result JSON, manifest, report and the Markdown description."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table.to_csv(folder / "features.csv", index=False)
        (folder / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        (folder / "summary.md").write_text(summary_markdown)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if report_html is not None:
            (folder / "report.html").write_text(report_html)
        mlflow.log_artifacts(str(folder))
    mlflow.set_tag(NOTE_TAG, summary_markdown)


def download_json(run_id: str, artifact: str, tracking_uri: str) -> dict:
    """A JSON artifact of a past run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}"))
    except (MlflowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"run {run_id}: cannot read {artifact} ({first}); check the run id and --tracking-uri") from exc


def download_table(run_id: str, artifact: str, tracking_uri: str) -> "Any":
    import io

    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")))
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(f"run {run_id}: cannot read {artifact}; check the run id and --tracking-uri") from exc


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
