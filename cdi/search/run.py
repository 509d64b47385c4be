"""`run_search`: calibration features once, the study, the MLflow record and the best configuration."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdi import tracking
from cdi.search import labelled_data
from cdi.search.config import SearchConfig
from cdi.search.objective import CalibrationData
from cdi.stats.difficulty import PIXEL_MODES
from cdi.search.space import SearchSpace, builtin_space
from cdi.search.study import (
    Objective, SearchSettings, best_config, create_study, make_pruner, new_session, optimize, trials_of,
)
from cdi.tracking import search as search_layout
from cdi.tracking.search import EXPERIMENT, TrialRuns, log_study

log = logging.getLogger(__name__)

DEMO = {"model": "demo/model", "members": "demo/members", "nonmembers": ("demo/heldout", "demo/heldout2")}
#: The demo model memorises its members so strongly that every configuration has power 1 at 20 members
#: per side (mean -log10 p ~ 50); with a quarter members on the suspect side at 40 per side the trials
#: spread over power 0-0.6 (measured with `mlflow run . -e search`), so the search has something to find.
DEMO_MEMBER_FRACTION = 0.25


@dataclass
class SearchOutcome:
    config: SearchConfig
    run_id: str
    study: Any
    pareto_front: list[dict[str, Any]]
    seconds_features: float
    seconds_trials: float


def objective_names(multi_objective: bool) -> list[str]:
    return ["strength", "passes_per_image"] if multi_objective else ["strength"]


def load_space(space: str | Path | None, access: str) -> SearchSpace:
    return SearchSpace.from_yaml(space) if space else builtin_space(access)


def calibration_data(space: SearchSpace, *, model: str | Path, members: str | Path | None = None,
                     nonmembers: Sequence[str | Path] = (), suspect: str | Path | None = None,
                     control: str | Path | None = None, calibration_fraction: float = 0.3,
                     reference_models: Sequence[str | Path] = (), seed: int = 0, batch_size: int = 50,
                     device: str = "auto", cache_dir: str | Path | None = None,
                     progress: bool = False) -> CalibrationData:
    """Known members/non-members, or (with suspect and control) a held-out split of an owner's P and U;
    with `reference_models`, also their features of the same images (same seed and feature settings)."""
    from cdi.errors import OptionError

    names = space.all_features
    # a PCA needs the pixels (and the Wiener covariate DL's noise)
    pixels = any(mode in PIXEL_MODES for mode in space.calibration.get("difficulty_calibration", ()))
    # A space that does not search the difficulty calibration leaves it to the audit's default: trials use it too.
    difficulty = "off" if "difficulty_calibration" in space.calibration else "auto"
    if suspect is not None or control is not None:
        if suspect is None or control is None or members is not None:
            raise OptionError("calibration split: give both --suspect and --control, and no --members")
        return labelled_data.split(model, suspect, control, names, fraction=calibration_fraction,
                                 variants=space.variants(), reference_models=reference_models, seed=seed,
                                 batch_size=batch_size, device=device, cache_dir=cache_dir, progress=progress,
                                 pixels=pixels, difficulty=difficulty)
    if members is None:
        raise OptionError("give --members and --nonmembers (known membership) or --suspect and --control (split)")
    return labelled_data.known_membership(model, members, nonmembers, names, variants=space.variants(),
                                        reference_models=reference_models, seed=seed, batch_size=batch_size,
                                        device=device, cache_dir=cache_dir, progress=progress, pixels=pixels,
                                        difficulty=difficulty)


def search(data: CalibrationData, space: SearchSpace, *, n_trials: int = 40, n: int = 50, n_resamples: int = 10,
           alpha: float = 0.01, seed: int = 0, multi_objective: bool = False, study_name: str = "cdi-search",
           storage: str | None = None, n_workers: int = 1, experiment: str = EXPERIMENT,
           tracking_uri: str | None = None, seconds_features: float = 0.0,
           member_fraction: float = 1.0, pruner: str = "none") -> SearchOutcome:
    """Run the study on `data` and record it as one MLflow run with a nested run per trial, each written as
    its trial finishes; `pruner` (none, median): stop hopeless trials early (`cdi.search.study.make_pruner`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if data.X_reference and not space.uses_references():
        log.warning("search space %r offers no representation other than raw (its calibration section): the "
                    "reference models' features are not used; see search/spaces/calibrated.yaml", space.name)
    session = new_session()
    objective = Objective(data, space, n=n, n_resamples=n_resamples, alpha=alpha, seed=seed,
                          multi_objective=multi_objective, session=session, member_fraction=member_fraction)
    if n_workers > 1 and storage is None:
        optimize(None, objective, n_trials=n_trials, n_workers=n_workers, storage=None)  # raises the clear error
    study = create_study(study_name, storage, multi_objective=multi_objective, seed=seed, n_trials=n_trials,
                         pruner=make_pruner(pruner, n_resamples, multi_objective))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    names = objective_names(multi_objective)
    settings = SearchSettings(n=n, n_resamples=n_resamples, alpha=alpha, seed=seed, multi_objective=multi_objective,
                              member_fraction=member_fraction)
    with tracking.audit_run(uri, experiment, run_name=search_layout.run_name(study_name)) as run_id:
        search_layout.log_opened(study_name=study_name, storage=tracking.redact_uri(storage) if storage else "in-memory",
                                 n_trials=n_trials, n_workers=n_workers, settings=settings, pruner=pruner,
                                 space=space, session=session, data=data)
        trial_runs = TrialRuns(uri, run_id, names)
        started = time.perf_counter()
        optimize(study, objective, n_trials=n_trials, n_workers=n_workers, storage=storage, seed=seed,
                 callbacks=[trial_runs])
        seconds_trials = time.perf_counter() - started
        mine = trials_of(study, session)
        late = trial_runs.log_missing(study, mine)
        if late:
            log.warning("%d trial run(s) written only after the study ended (see the warnings above)", late)
        config = best_config(study, space, data, settings, run_id)
        front = []
        if multi_objective:
            seen: set[tuple[float, float]] = set()
            for t in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
                if tuple(t.values) in seen:  # samplers repeat configurations; report each point once
                    continue
                seen.add(tuple(t.values))
                front.append({"trial": t.number, "strength": t.values[0], "passes_per_image": int(t.values[1]),
                              "power": t.user_attrs["power"], "features": t.user_attrs["features"]})
        log_study(study, config, data.files, data.sha256, data.y.tolist(), names,
                  search_layout.summary_metrics(config, mine, study, seconds_features=seconds_features,
                                                seconds_trials=seconds_trials, pareto_size=len(front)))
        search_layout.set_status("done")
    return SearchOutcome(config=config, run_id=run_id, study=study, pareto_front=front,
                         seconds_features=seconds_features, seconds_trials=seconds_trials)


def run_search(*, model: str | Path = DEMO["model"], members: str | Path | None = None,
               nonmembers: Sequence[str | Path] = (), suspect: str | Path | None = None,
               control: str | Path | None = None, calibration_fraction: float = 0.3, space: str | Path | None = None,
               access: str = "white", reference_models: Sequence[str | Path] = (), batch_size: int = 50,
               device: str = "auto", cache_dir: str | Path | None = None, progress: bool = False,
               **options: Any) -> SearchOutcome:
    """Calibration features (extracted once, cached), then `search`. Defaults: the demo's members."""
    demo = members is None and suspect is None and control is None
    if demo:
        members, nonmembers = DEMO["members"], nonmembers or DEMO["nonmembers"]
    if options.get("member_fraction") is None:
        options["member_fraction"] = DEMO_MEMBER_FRACTION if demo else 1.0
    search_space = load_space(space, access)
    seed = int(options.get("seed", 0))
    started = time.perf_counter()
    data = calibration_data(search_space, model=model, members=members, nonmembers=nonmembers, suspect=suspect,
                            control=control, calibration_fraction=calibration_fraction,
                            reference_models=reference_models, seed=seed,
                            batch_size=batch_size, device=device, cache_dir=cache_dir, progress=progress)
    return search(data, search_space, seconds_features=time.perf_counter() - started, **options)


__all__ = ["DEMO", "SearchOutcome", "calibration_data", "load_space", "objective_names", "run_search", "search"]
