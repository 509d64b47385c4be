"""A search watched live: each trial's nested MLflow run is written as the trial finishes, once, and
hopeless trials can be pruned without changing what the search finds (real Optuna, real SQLite stores)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest

import cdi
from cdi.search import builtin_space, run_search, search
from cdi.search import run as search_run
from cdi.search.study import open_storage
from cdi.tracking.search import TRIAL_KEY_TAG, TrialRuns

DEMO = Path(__file__).resolve().parents[2] / "demo"


def _trial_runs(client: mlflow.MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=500)


def test_each_trial_run_exists_with_source_tags_and_times_before_the_study_ends(synthetic, tracking_uri,
                                                                               monkeypatch):
    client = mlflow.MlflowClient(tracking_uri)
    seen: list[tuple[int, dict, int, int | None]] = []

    def watcher(study, trial):
        """Called after cdi's own callback for the same trial, while the study still runs."""
        parent = mlflow.active_run().info.run_id
        found = client.search_runs([client.get_run(parent).info.experiment_id],
                                   filter_string=f"tags.cdi.trial_number = '{trial.number}' and "
                                                 f"tags.mlflow.parentRunId = '{parent}'")
        assert len(found) == 1, f"trial {trial.number}: no run while the study runs"
        run = found[0]
        seen.append((trial.number, run.data.tags, run.info.start_time, run.info.end_time))
        assert run.info.start_time == int(trial.datetime_start.timestamp() * 1000)

    optimize = search_run.optimize

    def optimize_and_watch(*args, callbacks=(), **kwargs):
        return optimize(*args, callbacks=[*callbacks, watcher], **kwargs)

    monkeypatch.setattr(search_run, "optimize", optimize_and_watch)
    outcome = search(synthetic(n_per_side=30), builtin_space("gray"), n_trials=3, n=10, n_resamples=2, seed=0,
                     experiment="search-live")
    assert [number for number, *_ in seen] == [0, 1, 2]
    parent = client.get_run(outcome.run_id)
    for number, tags, start, end in seen:
        assert tags["mlflow.parentRunId"] == outcome.run_id and tags["cdi.kind"] == "search-trial"
        assert tags["cdi.version"] == cdi.__version__
        assert tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        if "mlflow.source.git.commit" in parent.data.tags:  # a git checkout
            assert tags["mlflow.source.git.commit"] == parent.data.tags["mlflow.source.git.commit"]
        assert tags[TRIAL_KEY_TAG].endswith(f"/{number}")
        assert end is not None and parent.info.start_time <= start <= end
    runs = _trial_runs(client, outcome.run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    history = client.get_metric_history(runs[0].info.run_id, "intermediate_strength")
    assert [m.step for m in history] == [0, 1]  # one value per resample


def test_workers_and_a_second_search_on_one_storage_write_each_trial_run_once(synthetic, tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    data, space = synthetic(n_per_side=30), builtin_space("gray")
    options = dict(n=10, n_resamples=1, seed=0, experiment="search-live", study_name="shared", storage=storage)
    first = search(data, space, n_trials=4, n_workers=2, **options)
    second = search(data, space, n_trials=2, **options)  # a second `cdi search` on the same study
    client = mlflow.MlflowClient(tracking_uri)
    runs = _trial_runs(client, first.run_id) + _trial_runs(client, second.run_id)
    keys = [run.data.tags[TRIAL_KEY_TAG] for run in runs]
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert len(study.trials) == 6 and len(keys) == 6 and len(set(keys)) == 6
    assert sorted(int(run.data.tags["cdi.trial_number"]) for run in runs) == list(range(6))
    # Logging again (a retry, another worker) finds every run by its key and writes none.
    again = TrialRuns(tracking_uri, first.run_id, ["strength"])
    assert again.log_missing(study, study.trials) == 0


def test_the_median_pruner_stops_weak_trials_and_keeps_the_best_on_synthetic_data(synthetic, tracking_uri):
    data, space = synthetic(n_per_side=60), builtin_space("white")
    options = dict(n_trials=20, n=30, n_resamples=6, seed=0, experiment="search-live")  # measured: 2 of 20 pruned
    plain = search(data, space, **options)
    pruned = search(data, space, pruner="median", **options)
    states = [t.state for t in pruned.study.trials]
    assert optuna.trial.TrialState.PRUNED in states[10:]  # the pruner acts after its 10 startup trials
    assert pruned.config.features == plain.config.features
    assert pruned.config.objective == plain.config.objective and pruned.config.C == plain.config.C
    run = mlflow.MlflowClient(tracking_uri).get_run(pruned.run_id)
    assert run.data.params["pruner"] == "median" and run.data.metrics["search.n_trials_pruned"] >= 1


def test_the_median_pruner_keeps_the_demo_search_best_configuration(tracking_uri):
    """The demo search of `mlflow run . -e search` (white space, 40 per side, a quarter members, 10
    resamples, 40 trials, seed 0) on its gray part, 20 trials: the same best trial with and without."""
    if not (DEMO / "model").is_dir():
        pytest.skip("no demo/ in this checkout")
    options = dict(access="gray", n_trials=20, n=40, n_resamples=10, seed=0, experiment="search-live",
                   batch_size=100)
    plain = run_search(**options)
    pruned = run_search(pruner="median", **options)
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in pruned.study.trials)  # measured: 2 of 20
    assert pruned.config.features == plain.config.features and pruned.config.C == plain.config.C
    assert pruned.config.objective == plain.config.objective
    # the calibration images are the search run's dataset inputs, found by the same digest as an audit's
    import hashlib

    from cdi.tracking.audit import image_set_digest

    inputs = mlflow.MlflowClient(tracking_uri).get_run(plain.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"members", "nonmembers"}
    members = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((DEMO / "members").glob("*.png"))]
    assert by_context["members"].digest == image_set_digest(members)
    assert by_context["members"].source and "members" in by_context["members"].name


def test_pruning_a_multi_objective_search_is_refused(synthetic, tracking_uri):
    with pytest.raises(cdi.errors.OptionError, match="--pruner median: .*single-objective"):
        search(synthetic(n_per_side=30), builtin_space("gray"), n_trials=1, n=10, n_resamples=1,
               multi_objective=True, pruner="median", experiment="search-live")
