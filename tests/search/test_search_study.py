"""The study on synthetic features: it finds the families that carry signal, and records itself in MLflow."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from cdi.search import SearchConfig, SearchSpace, builtin_space, detection_score, resamples, search

SIGNAL_SWITCHES = {"use_DL", "use_GM_low"}


def test_detection_score_is_strong_on_signal_and_null_on_noise(synthetic):
    data = synthetic(n_per_side=60)
    draws = resamples(data.y, 30, 4, seed=0)
    signal = detection_score(data.columns(["DL", "GM_0"]), draws, C=1.0, penalty="l2", folds=5)
    noise = detection_score(data.columns(["SecMI", "PIA"]), draws, C=1.0, penalty="l2", folds=5)
    assert signal.power > 0.5 and signal.strength > 2.0
    assert noise.strength < 1.0 and noise.median_p > 0.05


def test_member_fraction_mixes_non_members_into_the_suspect_side(synthetic):
    data = synthetic(n_per_side=60)
    members = set(map(int, (data.y == 1).nonzero()[0]))
    for rows in resamples(data.y, 20, 5, seed=3, member_fraction=0.25):
        suspect, control = rows[:20], rows[20:]
        assert len(set(rows.tolist())) == 40  # no image twice in a draw
        assert sum(int(i) in members for i in suspect) == 5
        assert not members & set(control.tolist())


def test_a_lower_member_fraction_lowers_power(synthetic):
    """Seeded: 20 resamples of 30 per side at shift 0.9 SD in 5 features; full membership gives power
    ~1, a quarter members (signal diluted 4x) well below it. Tolerance: gap of at least 0.3."""
    data = synthetic(n_per_side=120, seed=4)
    columns = data.columns(["DL", "GM_0", "GM_100"])
    full = detection_score(columns, resamples(data.y, 30, 20, seed=0), C=1.0, penalty="l2", folds=5)
    diluted = detection_score(columns, resamples(data.y, 30, 20, seed=0, member_fraction=0.25), C=1.0,
                              penalty="l2", folds=5)
    assert full.power >= 0.9 and diluted.power <= full.power - 0.3, (full, diluted)
    with pytest.raises(Exception, match="--member-fraction"):
        resamples(data.y, 30, 1, seed=0, member_fraction=0.0)


def test_search_keeps_the_signal_families_and_drops_most_noise_ones(synthetic, tracking_uri):
    data = synthetic(n_per_side=100)
    outcome = search(data, builtin_space("white"), n_trials=60, n=40, n_resamples=4, seed=0, experiment="search-unit")
    best = outcome.study.best_trial.params
    on = {name for name, value in best.items() if name.startswith("use_") and value}
    assert SIGNAL_SWITCHES <= on
    noise_on = on - SIGNAL_SWITCHES
    assert len(noise_on) <= 4, noise_on  # of 9 noise switches
    config = outcome.config
    assert {"DL", "GM_0", "GM_300"} <= set(config.features)
    assert config.access == "white" and config.folds in (3, 5) and config.penalty in ("l1", "l2")

    # MLflow: a parent run in the experiment and one nested run per trial
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cdi.kind"] == "search"
    assert parent.data.metrics["stats.best_strength"] == pytest.approx(config.objective["value"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.run_id}'", max_results=500)
    assert len(children) == 60
    numbers = sorted(int(run.data.tags["cdi.trial_number"]) for run in children)
    assert numbers == list(range(60))
    finished = [run for run in children if run.data.tags["cdi.trial_state"] == "COMPLETE"]
    assert finished and all("strength" in run.data.metrics and "C" in run.data.params for run in finished)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"best_config.yaml", "trials.csv", "calibration_images.csv", "optimization_history.png",
            "param_importances.png"} <= artifacts
    exported = yaml.safe_load(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/best_config.yaml"))
    assert SearchConfig.from_dict(exported).features == config.features
    assert exported["search_run_id"] == outcome.run_id
    assert set(exported["calibration"]["sha256"]) == set(data.sha256)


def test_multi_objective_reports_a_pareto_front_cheaper_than_everything(synthetic, tracking_uri):
    data = synthetic(n_per_side=60)
    outcome = search(data, builtin_space("white"), n_trials=24, n=30, n_resamples=2, seed=1, multi_objective=True,
                     experiment="search-unit")
    front = outcome.pareto_front
    assert front and len(outcome.study.directions) == 2
    passes = [point["passes_per_image"] for point in front]
    strengths = [point["strength"] for point in front]
    assert passes == sorted(passes) and strengths == sorted(strengths)  # a front: more passes buy more power
    assert len(set(zip(passes, strengths))) == len(front)  # each point once
    assert outcome.config.objective["passes_per_image"] == passes[-1]
    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(outcome.run_id)}
    assert {"pareto_front.csv", "pareto_front.png"} <= artifacts


def test_empty_feature_sets_are_pruned(synthetic, tracking_uri):
    import optuna

    space = builtin_space("gray")
    data = synthetic(n_per_side=30)
    outcome = search(data, space, n_trials=1, n=20, n_resamples=1, experiment="search-unit")
    study = outcome.study
    study.enqueue_trial({**{s: False for s in space.switches}, "C": 1.0, "penalty": "l2", "folds": 3})
    from cdi.search import Objective

    study.optimize(Objective(data, space, n=20, n_resamples=1), n_trials=1)
    assert study.trials[-1].state == optuna.trial.TrialState.PRUNED


def test_search_chooses_the_feature_setting_whose_variant_carries_the_signal(synthetic, tracking_uri):
    """Synthetic: only the NO columns computed with no_evals = 16 separate members (shift 1.2 SD); the
    default and the 4-evaluation variants are noise. The search must pick 16 and export it."""
    import numpy as np

    base = synthetic(n_per_side=80, shift=0.0, seed=5)
    rng = np.random.default_rng(6)
    extra, names = [], list(base.names)
    for value in (4, 16):
        for feature in ("NO_loss", "NO_delta"):
            column = rng.normal(size=base.y.size) - (1.2 * base.y if value == 16 else 0.0)
            extra.append(column)
            names.append(f"{feature}@no_evals={value}")
    base.X, base.names = np.column_stack([base.X, *extra]), tuple(names)
    space = SearchSpace(name="no-budget", families=("DL", "NO"), timestep_families=(),
                        settings={"no_evals": (4, 8, 16)})
    outcome = search(base, space, n_trials=25, n=30, n_resamples=3, seed=0, experiment="search-unit")
    config = outcome.config
    assert config.feature_settings == {"no_evals": 16} and {"NO_loss", "NO_delta"} <= set(config.features)
    assert config.objective["passes_per_image"] == 2 * 16 + (5 if "DL" in config.features else 0)
