"""The Optuna study: one objective over cached calibration features, one or many worker processes.

Storage is in memory by default; a database URL (`sqlite:///...`, `postgresql://...`) makes a study
resumable and lets several processes (`n_workers`, or several `cdi search` calls with the same study
name and storage) share it. The study is created (`load_if_exists=True`) before workers start.

Pruning (`--pruner median`, single objective only): a trial reports its running mean -log10 p after
each resample (`trial.report`, step = resample index) and stops as soon as Optuna's MedianPruner finds
it below the median of earlier trials at the same step; `PRUNER_STARTUP_TRIALS` trials run whole first,
and no trial is pruned before half its resamples (`n_warmup_steps`). Optuna keeps no pruner in the
storage: every worker builds the same one (`make_pruner`).
"""

from __future__ import annotations

import logging
import multiprocessing
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdi.errors import OptionError
from cdi.search.config import SearchConfig
from cdi.search.objective import CalibrationData, detection_score, resamples
from cdi.search.space import SearchSpace, access_for, passes_per_image
from cdi.tracking import redact_uri

log = logging.getLogger(__name__)

SESSION_ATTR = "cdi.session"
PRUNERS = ("none", "median")
#: Trials that run all their resamples before the median pruner may stop any (as TPE's startup trials).
PRUNER_STARTUP_TRIALS = 10


class Objective:
    """Optuna objective: a trial's feature subset, calibration and scorer settings -> strength [, passes per image].

    Every trial is scored on the same resamples (`self.draws`, drawn once; common random numbers),
    whatever its features or calibration. Passes per image count every model an audit with the trial's
    configuration queries: the target, and each reference model when the representation is not raw.
    Picklable (worker processes receive it whole). Empty feature sets are pruned.
    """

    def __init__(self, data: CalibrationData, space: SearchSpace, *, n: int = 50, n_resamples: int = 10,
                 alpha: float = 0.01, seed: int = 0, multi_objective: bool = False, session: str = "",
                 member_fraction: float = 1.0) -> None:
        if n < 6:
            raise OptionError(f"--n {n}: resamples need at least 6 images per side (5 folds + 1)")
        if n_resamples < 1:
            raise OptionError(f"--resamples {n_resamples}: must be at least 1")
        missing = [f for f in space.all_columns if f not in data.names]
        if missing:
            raise OptionError(f"calibration features lack {', '.join(missing)} of search space {space.name!r}")
        if any(np.shape(R) != np.shape(data.X) for R in data.X_reference):
            raise ValueError(f"reference features {[np.shape(R) for R in data.X_reference]} do not match the "
                             f"target's {np.shape(data.X)}")
        if space.uses_covariates() and (data.covariates is None or len(data.covariates) != len(data.y)):
            raise OptionError(f"search space {space.name!r}: calibration.difficulty_calibration offers image, but "
                              "the calibration data have no difficulty covariates of their images")
        if "image+pca+wiener" in space.calibration.get("difficulty_calibration", ()) and data.wiener is None:
            raise OptionError(f"search space {space.name!r}: calibration.difficulty_calibration offers "
                              "image+pca+wiener, which needs a pixel model (and DL's noise of each calibration "
                              "image): drop it from the space for a latent model")
        self.data, self.space = data, space
        self.n, self.n_resamples, self.alpha, self.seed = n, n_resamples, alpha, seed
        self.multi_objective, self.session = multi_objective, session
        self.draws = resamples(data.y, n, n_resamples, seed, member_fraction)

    def __call__(self, trial: Any) -> float | tuple[float, float]:
        import optuna

        references = len(self.data.X_reference)
        params = self.space.suggest(trial, references=references > 0)
        features = self.space.features(params)
        trial.set_user_attr(SESSION_ATTR, self.session)
        trial.set_user_attr("features", list(features))
        if not features:
            raise optuna.TrialPruned("no feature switched on")
        settings = self.space.feature_settings(params)
        trial.set_user_attr("feature_settings", settings)
        calibration = self.space.feature_calibration(params)
        if "difficulty_calibration" not in params:  # as the audit will calibrate: its default on these images
            calibration["difficulty_calibration"] = self.data.difficulty_default
        trial.set_user_attr("feature_calibration", calibration)
        models = 1 + (references if calibration["representation"] != "raw" else 0)
        passes = models * passes_per_image(features, self.space.feature_config(params))
        columns = self.space.columns(params)
        score = detection_score(self.data.columns(columns), self.draws, C=params["C"], penalty=params["penalty"],
                                folds=params["folds"], alpha=self.alpha, seed=self.seed,
                                references=self.data.reference_columns(columns), covariates=self.data.covariates,
                                wiener=self.data.wiener,
                                on_resample=None if self.multi_objective else _reporter(trial), **calibration)
        trial.set_user_attr("power", score.power)
        trial.set_user_attr("median_p", score.median_p)
        trial.set_user_attr("passes_per_image", passes)
        return (score.strength, float(passes)) if self.multi_objective else score.strength


def _reporter(trial: Any) -> Any:
    """Report each resample's running strength to Optuna and stop a trial its pruner gives up on."""
    import optuna

    def report(step: int, strength: float) -> None:
        trial.report(strength, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"mean -log10 p {strength:.3g} after {step + 1} resample(s)")

    return report


def make_pruner(pruner: str, n_resamples: int, multi_objective: bool = False) -> Any:
    """The Optuna pruner of `--pruner` (none: NopPruner, every trial runs all its resamples)."""
    import optuna

    if pruner not in PRUNERS:
        raise OptionError(f"--pruner {pruner!r}: choose {' or '.join(PRUNERS)}")
    if pruner == "none":
        return optuna.pruners.NopPruner()
    if multi_objective:
        raise OptionError(f"--pruner {pruner}: Optuna prunes single-objective studies only; "
                          "drop --multi-objective or use --pruner none")
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=n_resamples // 2)


def open_storage(url: str | None) -> Any:
    """None (in memory) or an RDB storage; SQLite waits for locks instead of failing at once."""
    if url is None:
        return None
    import optuna

    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise OptionError(f"--storage {redact_uri(url)}: give a database URL such as sqlite:///search.db or "
                          "postgresql://user@host/db")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as exc:  # e.g. no PostgreSQL driver installed
        raise OptionError(f"--storage {redact_uri(url)}: {exc}; install the database driver (PostgreSQL: pip install 'psycopg[binary]')") from exc
    except Exception as exc:  # SQLAlchemy's OperationalError and friends: the database does not answer
        raise OptionError(f"--storage {redact_uri(url)}: cannot open the study storage "
                          f"({str(exc).strip().splitlines()[0]})") from exc


def _sampler(multi_objective: bool, seed: int, n_trials: int) -> Any:
    import optuna

    if multi_objective:
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, n_trials // 4)), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, n_trials // 4)))


def create_study(study_name: str, storage: str | None, *, multi_objective: bool, seed: int, n_trials: int,
                 pruner: Any = None) -> Any:
    """The study (loaded if `storage` has it), with a key (`STUDY_KEY_ATTR`) that names its trials' MLflow runs."""
    import optuna

    from cdi.tracking.search import STUDY_KEY_ATTR

    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage), directions=directions,
                                sampler=_sampler(multi_objective, seed, n_trials), pruner=pruner, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise OptionError(f"--study-name {study_name}: the stored study has {len(study.directions)} objective(s); "
                          "use another study name or the same --multi-objective setting")
    if STUDY_KEY_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_KEY_ATTR, uuid.uuid4().hex)
    return study


def _worker(study_name: str, storage: str, objective: Objective, n_trials: int, seed: int, pruner: Any,
            callbacks: list[Any]) -> None:
    """One worker process: load the shared study and run its share of the trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                              sampler=_sampler(objective.multi_objective, seed, n_trials), pruner=pruner)
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks)


def optimize(study: Any, objective: Objective, *, n_trials: int, n_workers: int = 1, storage: str | None = None,
             seed: int = 0, callbacks: list[Any] | None = None) -> None:
    """Run `n_trials` trials in this process, or split them over `n_workers` processes sharing `storage`.

    `callbacks`: Optuna callbacks, called after each trial in the process that ran it (picklable for
    workers); the workers use the study's pruner.
    """
    if n_trials < 1:
        raise OptionError(f"--n-trials {n_trials}: must be at least 1")
    if n_workers < 1:
        raise OptionError(f"--n-workers {n_workers}: must be at least 1")
    callbacks = list(callbacks or [])
    if n_workers == 1:
        study.optimize(objective, n_trials=n_trials, callbacks=callbacks)
        return
    if storage is None:
        raise OptionError(f"--n-workers {n_workers}: worker processes share the study through a database; "
                          "add --storage sqlite:///search.db (or a postgresql:// URL)")
    shares = [n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding BLAS/OpenMP threads
    workers = [context.Process(target=_worker, args=(study.study_name, storage, objective, share, seed + 1 + i,
                                                           study.pruner, callbacks))
               for i, share in enumerate(shares) if share]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} search worker(s) failed (exit codes {failed}); see their output above")


def best_trial(study: Any) -> Any:
    """The best finished trial; with two objectives, the strongest on the Pareto front (fewest passes on ties)."""
    if len(study.directions) == 1:
        return study.best_trial
    front = study.best_trials
    if not front:
        raise ValueError("no finished trial")
    return max(front, key=lambda t: (t.values[0], -t.values[1]))


@dataclass
class SearchSettings:
    n: int
    n_resamples: int
    alpha: float
    seed: int
    multi_objective: bool
    member_fraction: float = 1.0


def best_config(study: Any, space: SearchSpace, data: CalibrationData, settings: SearchSettings,
                run_id: str | None) -> SearchConfig:
    trial = best_trial(study)
    features = list(trial.user_attrs["features"])
    return SearchConfig(
        features=features,
        C=float(trial.params["C"]),
        penalty=str(trial.params["penalty"]),
        folds=int(trial.params["folds"]),
        access=access_for(features),
        seed=settings.seed,
        feature_settings=dict(trial.user_attrs.get("feature_settings", {})),
        # only what the search chose: a setting it did not vary is left to the audit's own options
        feature_calibration={key: value for key, value in (trial.user_attrs.get("feature_calibration") or {}).items()
                             if key in trial.params},
        objective={
            "name": "mean -log10 Welch p",
            "value": float(trial.values[0]),
            "power": float(trial.user_attrs["power"]),
            "median_p": float(trial.user_attrs["median_p"]),
            "alpha": settings.alpha,
            "passes_per_image": int(trial.user_attrs["passes_per_image"]),
            "n_per_side": settings.n,
            "member_fraction": settings.member_fraction,
            "resamples": settings.n_resamples,
            "trial": trial.number,
            "space": space.name,
        },
        calibration={**data.description, "sha256": sorted(set(data.sha256))},
        search_run_id=run_id,
        study_name=study.study_name,
    )


def new_session() -> str:
    return uuid.uuid4().hex[:12]


def trials_of(study: Any, session: str | None = None) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if session is None or t.user_attrs.get(SESSION_ATTR) == session]


__all__ = ["PRUNERS", "PRUNER_STARTUP_TRIALS", "Objective", "SearchSettings", "best_config", "best_trial",
           "create_study", "make_pruner", "new_session", "open_storage", "optimize", "trials_of"]
