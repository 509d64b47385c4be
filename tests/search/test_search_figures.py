"""Optuna's matplotlib figures on the search's MLflow parent run (real sqlite tracking store in tmp)."""

from __future__ import annotations

import logging

import mlflow

from cdi.search import builtin_space, search


def _artifacts(tracking_uri: str, run_id: str) -> set[str]:
    return {a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id)}


def test_a_short_search_logs_history_and_importances_on_the_parent_run(synthetic, tracking_uri):
    outcome = search(synthetic(n_per_side=30), builtin_space("white"), n_trials=6, n=10, n_resamples=1, seed=0,
                     experiment="search-figures")
    artifacts = _artifacts(tracking_uri, outcome.run_id)
    assert {"optimization_history.png", "param_importances.png"} <= artifacts
    assert "pareto_front.png" not in artifacts
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # every figure closed once logged


def test_a_multi_objective_search_logs_its_pareto_front(synthetic, tracking_uri):
    outcome = search(synthetic(n_per_side=30), builtin_space("white"), n_trials=6, n=10, n_resamples=1, seed=1,
                     multi_objective=True, experiment="search-figures")
    assert {"optimization_history.png", "pareto_front.png"} <= _artifacts(tracking_uri, outcome.run_id)


def test_a_failing_importance_evaluation_skips_that_figure_with_a_warning(synthetic, tracking_uri, monkeypatch,
                                                                          caplog):
    import optuna.visualization.matplotlib as ovm

    def broken(*args, **kwargs):
        raise RuntimeError("evaluator broke")

    monkeypatch.setattr(ovm, "plot_param_importances", broken)
    with caplog.at_level(logging.WARNING, logger="cdi.tracking.search"):
        outcome = search(synthetic(n_per_side=30), builtin_space("white"), n_trials=5, n=10, n_resamples=1, seed=2,
                         experiment="search-figures")
    artifacts = _artifacts(tracking_uri, outcome.run_id)
    assert "optimization_history.png" in artifacts and "param_importances.png" not in artifacts
    assert any("evaluator broke" in r.getMessage() for r in caplog.records)
