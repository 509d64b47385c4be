"""How a search is laid out in MLflow (experiment `cdi-search`); the only search module that talks to it.

- parent run: the study's settings and the calibration data's description (params `calibration.*`, the
  reference models as `calibration.reference_models` and `calibration.reference_fingerprints`), the
  best value(s) (metrics), tags `cdi.kind = search`,
  `cdi.study_name`; artifacts `best_config.yaml`, `trials.csv`, `calibration_images.csv`,
  `optimization_history.png`, `param_importances.png`, and with two objectives `pareto_front.csv` and
  `pareto_front.png`;
- one nested run per trial (tag `mlflow.parentRunId`): the trial's params, objective value(s),
  power, passes per image, trial number and state.
Nested runs are written through `MlflowClient` after the trials finish, from the parent process only,
so worker processes never write to the tracking store concurrently.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from cdi.search.config import CONFIG_ARTIFACT, SearchConfig

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "cdi-search"
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "SCHEDULED"}


def calibration_params(description: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration data's description as run params: `calibration.<key>`, reference models flattened."""
    params = {f"calibration.{k}": v for k, v in description.items() if k != "reference_models"}
    references = description.get("reference_models") or []
    if references:
        params["calibration.reference_models"] = [entry["path"] for entry in references]
        params["calibration.reference_fingerprints"] = [entry["fingerprint"] for entry in references]
    return params


def log_trials(parent_run_id: str, trials: Sequence[Any], objective_names: Sequence[str]) -> int:
    """One nested run per trial under `parent_run_id`; returns how many were written."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    for trial in trials:
        state = trial.state.name
        run = client.create_run(experiment_id, run_name=f"trial-{trial.number}", tags={
            "mlflow.parentRunId": parent_run_id, "cdi.kind": "search-trial", "cdi.trial_number": str(trial.number),
            "cdi.trial_state": state,
        })
        params = {**{k: str(v) for k, v in trial.params.items()},
                  "features": ",".join(trial.user_attrs.get("features", [])) or "(none)"}
        metrics = {"trial_number": float(trial.number)}
        if trial.values:
            metrics.update({name: float(v) for name, v in zip(objective_names, trial.values)})
        for key in ("power", "median_p", "passes_per_image"):
            if key in trial.user_attrs:
                metrics[key] = float(trial.user_attrs[key])
        if trial.duration is not None:
            metrics["seconds"] = trial.duration.total_seconds()
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                         params=[Param(k, v[:6000]) for k, v in params.items()],
                         tags=[RunTag("cdi.trial_state", state)])
        client.set_terminated(run.info.run_id, status=_RUN_STATUS.get(state, "FINISHED"))
    return len(trials)


def _figures(study: Any, folder: Path, objective_names: Sequence[str]) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    written: list[Path] = []
    if not done:
        return written
    numbers = [t.number for t in done]
    values = [t.values[0] for t in done]
    best, running = [], float("-inf")
    for v in values:
        running = max(running, v)
        best.append(running)
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    ax.scatter(numbers, values, s=12, label="trial")
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective_names[0])
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(folder / "optimization_history.png")
    fig.savefig(written[-1], dpi=110)

    try:
        # The default evaluator (PED-ANOVA) ranks params by how they reach *low* target values: with two
        # objectives the strength is passed negated; with one, Optuna reads the direction itself.
        target = (lambda t: -t.values[0]) if len(study.directions) > 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "modify target" and "too few trials" notes
            importances = optuna.importance.get_param_importances(study, target=target)
    except (RuntimeError, ValueError) as exc:  # too few trials, or no parameter varied
        log.info("no parameter importances: %s", exc)
        importances = {}
    if importances:
        names = list(importances)[::-1]
        fig = Figure(figsize=(5.5, 0.25 * len(names) + 1.2))
        ax = fig.subplots()
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel(f"importance for {objective_names[0]} (Optuna's default evaluator)")
        fig.tight_layout()
        written.append(folder / "param_importances.png")
        fig.savefig(written[-1], dpi=110)

    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        fig = Figure(figsize=(5.5, 3.4))
        ax = fig.subplots()
        ax.scatter([t.values[1] for t in done], values, s=12, color="grey", label="trial")
        pareto = sorted((t for t in done if t.number in front), key=lambda t: t.values[1])
        ax.plot([t.values[1] for t in pareto], [t.values[0] for t in pareto], marker="o", color="C3",
                label="Pareto front")
        ax.set_xlabel(objective_names[1])
        ax.set_ylabel(objective_names[0])
        ax.legend(loc="lower right")
        fig.tight_layout()
        written.append(folder / "pareto_front.png")
        fig.savefig(written[-1], dpi=110)
    return written


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


_CALIBRATION_COLUMNS = ("representation", "reference_formula", "difficulty_calibration")


def _trial_rows(trials: Sequence[Any], n_objectives: int) -> list[list[Any]]:
    return [[t.number, t.state.name, *(t.values or [None] * n_objectives), t.user_attrs.get("power"),
             t.user_attrs.get("passes_per_image"), t.params.get("C"), t.params.get("penalty"), t.params.get("folds"),
             " ".join(t.user_attrs.get("features", [])),
             *((t.user_attrs.get("feature_calibration") or {}).get(k) for k in _CALIBRATION_COLUMNS)]
            for t in trials]


def log_study(study: Any, config: SearchConfig, calibration_files: Sequence[str], calibration_hashes: Sequence[str],
              labels: Sequence[int], objective_names: Sequence[str], summary: Mapping[str, float]) -> None:
    """Artifacts and metrics of the parent run (the active run)."""
    import mlflow

    header = ["trial", "state", *objective_names, "power", "passes_per_image", "C", "penalty", "folds", "features",
              *_CALIBRATION_COLUMNS]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config.write(folder / CONFIG_ARTIFACT)
        _write_csv(folder / "trials.csv", header, _trial_rows(study.get_trials(deepcopy=False), len(objective_names)))
        _write_csv(folder / "calibration_images.csv", ["file", "sha256", "label"],
                   list(zip(calibration_files, calibration_hashes, labels)))
        if len(study.directions) > 1:
            front = sorted(study.best_trials, key=lambda t: t.values[1])
            _write_csv(folder / "pareto_front.csv", header, _trial_rows(front, len(objective_names)))
        _figures(study, folder, objective_names)
        mlflow.log_artifacts(str(folder))
    mlflow.log_metrics({k: float(v) for k, v in summary.items()})


def download_config(run_id: str, tracking_uri: str) -> SearchConfig:
    """The `best_config.yaml` of search run `run_id`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cdi.errors import OptionError

    mlflow.set_tracking_uri(tracking_uri)
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one small file: no bar on the audit's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_ARTIFACT, dst_path=tmp,
                                                       tracking_uri=tracking_uri)
            config = SearchConfig.read(path)
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OptionError(f"--from-search {run_id}: no {CONFIG_ARTIFACT} in that run at {tracking_uri} ({first}); "
                          "give the run id that `cdi search` printed") from exc
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    config.search_run_id = config.search_run_id or run_id
    return config


__all__ = ["DEFAULT_EXPERIMENT", "calibration_params", "download_config", "log_study", "log_trials"]
