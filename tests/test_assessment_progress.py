"""Progress of the scoring and testing phase goes to stderr (rate-limited), never to stdout; no param is "None"."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np

from cdi.cli import main
from cdi.stats.assessment import assess
from cdi.stats.progress import StderrProgress, reporting


def test_assess_reports_scoring_and_permutation_progress_without_changing_results():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    labels = np.r_[np.ones(20, dtype=int), np.zeros(20, dtype=int)]
    options = dict(folds=5, seed=0, n_permutations=120, power_resamples=3)
    calls = []
    with reporting(lambda *call: calls.append(call)):
        found = assess(X, labels, None, **options)
    phases = {phase for phase, *_ in calls}
    assert {"scoring", "permutation test", "null check: permutation test", "power curve"} <= phases, phases
    assert ("scoring", 5, 5, "folds") in calls and ("permutation test", 120, 120, "permutations") in calls
    assert found.test.p_value_ == assess(X, labels, None, **options).test.p_value_  # silent run, same result


def test_stderr_progress_is_rate_limited_and_keeps_each_final_line():
    now = [0.0]
    stream = io.StringIO()
    progress = StderrProgress(stream, interval=2.0, clock=lambda: now[0])
    for done in range(1, 11):
        now[0] += 0.5
        progress("permutation test", done * 100, 1000, "permutations")
    lines = stream.getvalue().splitlines()
    assert lines == ["permutation test: 100/1000 permutations", "permutation test: 500/1000 permutations",
                     "permutation test: 900/1000 permutations", "permutation test: 1000/1000 permutations"]


def test_audit_json_keeps_stdout_clean_shows_progress_on_stderr_and_logs_no_none_param(
        tiny_model, image_sets, tracking_uri, capsys):
    suspect, control = image_sets
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(suspect), "--control", str(control),
                 "--batch-size", "12", "--format", "json", "--permutations", "200", "--power-resamples", "0",
                 "--access", "gray"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the result JSON and nothing else
    assert "permutation test: 200/200 permutations" in captured.err
    assert "scoring: 5/5 folds" in captured.err
    params = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"]).data.params
    assert params and not [key for key, value in params.items() if value == "None"], params
