"""How a search is laid out in MLflow (experiment `cdi-search`); the only search module that talks to it.

- parent run: the study's settings and the calibration data's description (params `calibration.*`, the
  reference models as `calibration.reference_models` and `calibration.reference_fingerprints`), the
  best value(s) (metrics), tags `cdi.kind = search`,
  `cdi.study_name`; artifacts `best_config.yaml`, `trials.csv`, `calibration_images.csv`,
  `optimization_history.png`, `param_importances.png` (two or more distributions and enough finished
  trials), and with two objectives `pareto_front.csv` and `pareto_front.png` (figures drawn by
  `optuna.visualization.matplotlib`, logged with `mlflow.log_figure`);
- one nested run per trial (tag `mlflow.parentRunId`): the trial's params, objective value(s),
  power, passes per image, the intermediate strength per resample, trial number and state; the parent's
  source tags (`mlflow.source.name`, `mlflow.source.git.commit` in a git checkout, ...) and `cdi.version`;
  the trial's start and end times. Written (`TrialRuns`, through `MlflowClient`) by the process that ran
  the trial as soon as it finishes, so a watcher sees the study grow; each run is keyed by
  `cdi.trial_key` (`<study key>/<trial number>`) and never written twice, even by several `cdi search`
  processes on one study storage.
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

EXPERIMENT = "cdi-search"
_RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "SCHEDULED"}


def run_name(study_name: str) -> str:
    """`search-<study name>`."""
    return f"search-{study_name}"


def set_status(status: str) -> None:
    """The parent run's `cdi.status`: searching, done (failed and interrupted are set by `audit_run`)."""
    from cdi.tracking import set_tags

    set_tags({"cdi.status": status})


def log_opened(*, study_name: str, storage: str, n_trials: int, n_workers: int, settings: Any, pruner: str,
               space: Any, session: str, data: Any) -> None:
    """The parent run's tags and params: the study (`storage` already without secrets), the search settings
    (`cdi.search.study.SearchSettings`), the space and the calibration data (`CalibrationData`)."""
    from cdi.tracking import log_params, set_tags

    set_tags({"cdi.kind": "search", "cdi.study_name": study_name, "cdi.status": "searching"})
    log_params({
        "study_name": study_name, "storage": storage, "n_trials": n_trials, "n_workers": n_workers,
        "n_per_side": settings.n, "member_fraction": settings.member_fraction, "resamples": settings.n_resamples,
        "alpha": settings.alpha, "seed": settings.seed, "pruner": pruner, "multi_objective": settings.multi_objective,
        "space": space.name, "space_features": ",".join(space.all_features),
        **({"space_calibration": "; ".join(f"{k}={','.join(v)}" for k, v in space.calibration.items())}
           if space.calibration else {}),
        "session": session,
        **calibration_params(data.description),
        "calibration.n_images": len(data.sha256),
    })
    log_calibration_sets(data)


def log_calibration_sets(data: Any) -> None:
    """The calibration images as two MLflow dataset inputs of the search run, context "members" (label 1:
    known members, or the held-out part of P) and "nonmembers" (label 0), each with its folder as source,
    so the UI's Datasets column says what the search was calibrated on (`audit.log_image_table`)."""
    from cdi.text import printable_path
    from cdi.tracking.audit import log_image_table

    described = data.description
    if described.get("mode") == "split":
        folders = {1: ("suspect, held out", described["suspect"]), 0: ("control, held out", described["control"])}
    elif described.get("mode") == "known" and described.get("nonmembers"):
        folders = {1: ("members", described["members"]), 0: ("nonmembers", described["nonmembers"][0])}
    else:  # data built in Python without image folders
        return
    for label, context in ((1, "members"), (0, "nonmembers")):
        rows = [i for i, y in enumerate(data.y) if int(y) == label]
        what, folder = folders[label]
        source = Path(folder).resolve()
        log_image_table(context, f"{what}: {printable_path(source.name)}", source, [data.files[i] for i in rows],
                        [data.sha256[i] for i in rows])


def summary_metrics(config: SearchConfig, trials: Sequence[Any], study: Any, *, seconds_features: float,
                    seconds_trials: float, pareto_size: int) -> dict[str, float]:
    """The parent run's metrics: the best configuration's (`stats.*`), the study's (`search.*`: this session's
    `trials`, the study's total, pruned trials, time), the feature extraction's (`extraction.seconds`)."""
    multi = len(study.directions) > 1
    return {
        "stats.best_strength": config.objective["value"], "stats.best_power": config.objective["power"],
        "stats.best_passes_per_image": config.objective["passes_per_image"],
        "search.n_trials_run": len(trials), "search.n_trials_pruned": sum(t.state.name == "PRUNED" for t in trials),
        "search.n_trials_study": len(study.trials), "search.seconds": seconds_trials,
        "extraction.seconds": seconds_features, **({"search.pareto_size": pareto_size} if multi else {}),
    }


def calibration_params(description: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration data's description as run params: `calibration.<key>`, reference models flattened."""
    params = {f"calibration.{k}": v for k, v in description.items() if k != "reference_models"}
    references = description.get("reference_models") or []
    if references:
        params["calibration.reference_models"] = [entry["path"] for entry in references]
        params["calibration.reference_fingerprints"] = [entry["fingerprint"] for entry in references]
    return params


#: Tag of a trial's nested run: `<study key>/<trial number>`, unique over every study and storage.
TRIAL_KEY_TAG = "cdi.trial_key"
#: Study user attribute holding the study's key (a UUID set when the study is first created).
STUDY_KEY_ATTR = "cdi.study_key"
#: Tags a trial's run copies from the search's parent run: where the code came from.
_SOURCE_TAG_PREFIXES = ("mlflow.source.", "mlflow.user", "mlflow.project.", "mlflow.gitRepoURL")


def trial_key(study: Any, trial: Any) -> str:
    return f"{study.user_attrs.get(STUDY_KEY_ATTR) or study.study_name}/{trial.number}"


def _ms(moment: Any) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


class TrialRuns:
    """One nested run per trial under the search's parent run, written as each trial finishes.

    An Optuna callback (`study.optimize(..., callbacks=[runs])`), run in the process that ran the
    trial, so the runs appear while the study runs, with the trial's own start and end times. Picklable
    (worker processes get a copy; each opens its own client). A trial's run carries `cdi.trial_key`; a
    trial that already has a run is never written again (`log`), so the parent's final sweep
    (`log_missing`) only adds the runs a callback could not write.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, objective_names: Sequence[str]) -> None:
        import mlflow

        import cdi

        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.objective_names = list(objective_names)
        parent = mlflow.MlflowClient(tracking_uri).get_run(parent_run_id)
        self.experiment_id = parent.info.experiment_id
        self.tags = {k: v for k, v in parent.data.tags.items() if k.startswith(_SOURCE_TAG_PREFIXES)}
        self.tags.update({"mlflow.parentRunId": parent_run_id, "cdi.kind": "search-trial", "cdi.version": cdi.__version__})
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.tracking_uri)
        return self._client

    def __call__(self, study: Any, trial: Any) -> None:
        try:
            self.log(study, trial)
        except Exception as exc:  # a tracking hiccup must not end the study; the final sweep retries
            log.warning("trial %d: no MLflow run yet (%s); the search writes it when the study ends", trial.number,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    def run_of(self, key: str) -> str | None:
        """The id of the run with trial key `key`, if there is one."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{key}'",
                                        max_results=1)
        return found[0].info.run_id if found else None

    def log(self, study: Any, trial: Any) -> str | None:
        """Write `trial`'s run unless it has one; returns the new run's id (None when it existed)."""
        from mlflow.entities import Metric, Param

        key = trial_key(study, trial)
        if self.run_of(key) is not None:
            return None
        state = trial.state.name
        client = self.client
        run = client.create_run(self.experiment_id, start_time=_ms(trial.datetime_start),
                                run_name=f"trial-{trial.number}", tags={
                                    **self.tags, TRIAL_KEY_TAG: key, "cdi.study_name": study.study_name,
                                    "cdi.trial_number": str(trial.number), "cdi.trial_state": state})
        params = {**{k: str(v) for k, v in trial.params.items()},
                  "features": ",".join(trial.user_attrs.get("features", [])) or "(none)"}
        metrics = {"trial_number": float(trial.number)}
        if trial.values:
            metrics.update({name: float(v) for name, v in zip(self.objective_names, trial.values)})
        for name in ("power", "median_p", "passes_per_image"):
            if name in trial.user_attrs:
                metrics[name] = float(trial.user_attrs[name])
        if trial.duration is not None:
            metrics["seconds"] = trial.duration.total_seconds()
        at = _ms(trial.datetime_complete) or _ms(trial.datetime_start) or 0
        steps = [Metric(f"intermediate_{self.objective_names[0]}", float(v), at, int(step))
                 for step, v in sorted(trial.intermediate_values.items())]
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, at, 0) for k, v in metrics.items()] + steps,
                         params=[Param(k, v[:6000]) for k, v in params.items()])
        client.set_terminated(run.info.run_id, status=_RUN_STATUS.get(state, "FINISHED"),
                              end_time=_ms(trial.datetime_complete))
        return run.info.run_id

    def log_missing(self, study: Any, trials: Sequence[Any]) -> int:
        """Runs for those of `trials` that have none yet; returns how many were written."""
        return sum(self.log(study, trial) is not None for trial in trials)


#: Parameter importances need a few finished trials to rank anything (PED-ANOVA compares the top quantile).
MIN_TRIALS_FOR_IMPORTANCES = 4


def log_figures(study: Any, objective_names: Sequence[str]) -> list[str]:
    """Optuna's matplotlib figures of `study` on the active (parent) run; returns the artifact names logged.

    Optimization history always (of the first objective); parameter importances with at least two
    distributions and `MIN_TRIALS_FOR_IMPORTANCES` finished trials (skipped with a warning when the
    evaluator fails); the Pareto front with two objectives. Each figure is closed once logged; pyplot
    is imported only here, no backend is chosen and the rcParams are restored.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import mlflow
    import optuna
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
    multi = len(study.directions) > 1
    first = (lambda t: t.values[0]) if multi else None  # multi-objective plots need a target
    logged: list[str] = []

    def _log(ax: Any, name: str) -> None:
        fig = ax.figure
        try:
            fig.tight_layout()
            mlflow.log_figure(fig, name)
            logged.append(name)
        finally:
            plt.close(fig)

    # Optuna's plots call plt.style.use("ggplot"): rc_context restores the caller's rcParams afterwards.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _log(ovm.plot_optimization_history(study, target=first, target_name=objective_names[0]),
             "optimization_history.png")

        distributions = optuna.search_space.intersection_search_space(done)
        if len(distributions) >= 2 and len(done) >= MIN_TRIALS_FOR_IMPORTANCES:
            # The default evaluator (PED-ANOVA) ranks params by how they reach *low* target values: with two
            # objectives the strength is passed negated; with one, Optuna reads the direction itself.
            target = (lambda t: -t.values[0]) if multi else None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "modify target" and "too few trials" notes
                    ax = ovm.plot_param_importances(study, target=target, target_name=objective_names[0])
            except Exception as exc:  # importance evaluation failed: the figure is optional
                log.warning("no parameter importances figure: %s", exc)
            else:
                _log(ax, "param_importances.png")

        if multi:
            _log(ovm.plot_pareto_front(study, target_names=list(objective_names[:len(study.directions)])),
                 "pareto_front.png")
    return logged


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
        mlflow.log_artifacts(str(folder))
    log_figures(study, objective_names)
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


__all__ = ["EXPERIMENT", "MIN_TRIALS_FOR_IMPORTANCES", "STUDY_KEY_ATTR", "TRIAL_KEY_TAG", "TrialRuns",
           "calibration_params", "download_config", "log_figures", "log_study", "trial_key"]
