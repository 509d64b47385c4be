"""Searching the feature calibration: reference models and the label-free difficulty regression."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

import cdi.search.objective as objective_module
from cdi.stats.difficulty import DIFFICULTY_MODES
from cdi.cli import main
from cdi.data import discover_images
from cdi.errors import OptionError
from cdi.features import FeatureConfig, extract
from cdi.models import load_model
from cdi.search import Objective, SearchConfig, SearchSpace, check_references, passes_per_image, search
from cdi.search.labelled_data import split

SPACES = Path(__file__).resolve().parents[2] / "search" / "spaces"
CALIBRATION = {"representation": ("raw", "calibrated", "both"), "reference_formula": ("difference", "log_ratio"),
               "difficulty_calibration": ("off", "image")}


def _space(**calibration) -> SearchSpace:
    return SearchSpace(name="cal", families=("DL", "SecMI", "PIA"), timestep_families=(),
                       calibration=calibration or CALIBRATION)


def test_search_picks_reference_calibration_when_only_it_shows_membership(with_reference, tracking_uri, tmp_path):
    """Synthetic (conftest): the members' shift is 0.6 SD of the target-minus-reference noise but 0.2 SD of
    the raw features. The calibration section is sampled, the best trial scores calibrated features, and
    its choice reaches best_config.yaml and the run's params."""
    data = with_reference(n_per_side=60)
    outcome = search(data, _space(), n_trials=16, n=30, n_resamples=2, seed=0, experiment="search-unit")
    done = [t for t in outcome.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all("representation" in t.params and "difficulty_calibration" in t.params for t in done)
    assert {t.params["representation"] for t in done} == {"raw", "calibrated", "both"}
    assert all(("reference_formula" in t.params) == (t.params["representation"] != "raw") for t in done)
    raw = max(t.values[0] for t in done if t.params["representation"] == "raw")
    config = outcome.config
    assert config.feature_calibration["representation"] in ("calibrated", "both")
    assert config.objective["value"] > raw + 2.0  # mean -log10 p: calibrated far above the best raw trial
    assert config.feature_calibration == outcome.study.best_trial.user_attrs["feature_calibration"]
    assert set(config.feature_calibration) == {"representation", "reference_formula", "difficulty_calibration"}

    again = SearchConfig.read(config.write(tmp_path / "best_config.yaml"))
    assert again.feature_calibration == config.feature_calibration
    assert again.calibration["reference_models"] == [{"path": "/models/base", "fingerprint": "b" * 64}]
    params = mlflow.MlflowClient(tracking_uri).get_run(outcome.run_id).data.params
    assert params["calibration.reference_fingerprints"] == "b" * 64
    assert params["calibration.reference_models"] == "/models/base"
    # a calibrated representation queries the reference too: the cost model charges both models
    assert config.objective["passes_per_image"] == 2 * passes_per_image(config.features)


def test_without_references_or_section_the_search_scores_raw_features(with_reference, synthetic, tracking_uri):
    data = with_reference(n_per_side=30)
    data.X_reference = []
    outcome = search(data, _space(), n_trials=4, n=20, n_resamples=1, experiment="search-unit")
    assert all("representation" not in t.params and "reference_formula" not in t.params for t in outcome.study.trials)
    assert "representation" not in outcome.config.feature_calibration  # not chosen: the audit's options apply

    plain = search(synthetic(n_per_side=30), SearchSpace(name="plain", families=("DL", "PIA"), timestep_families=()),
                   n_trials=3, n=20, n_resamples=1, experiment="search-unit")
    assert all(set(t.params) == {"use_DL", "use_PIA", "C", "penalty", "folds"} for t in plain.study.trials)
    assert plain.config.feature_calibration == {}


def test_each_resample_is_calibrated_on_its_own_rows_and_every_trial_on_the_same_rows(with_reference,
                                                                                      monkeypatch):
    """The scorer of a difficulty-calibrated trial gets, per resample, the residuals of an ordinary least
    squares fit of the features on [1, covariates] over that resample's 2n rows (computed here with a
    plain lstsq); a reference-calibrated trial sees the same rows, drawn once for the study."""
    data = with_reference(n_per_side=40)
    targets, scored = [], []
    real_calibrate, real_scorer = objective_module.calibrate, objective_module.CrossFittedScorer

    def spy_calibrate(target, *args, **kwargs):
        targets.append(np.array(target))
        return real_calibrate(target, *args, **kwargs)

    class SpyScorer(real_scorer):
        def fit(self, X, y):
            scored.append(np.array(X))
            return super().fit(X, y)

    monkeypatch.setattr(objective_module, "calibrate", spy_calibrate)
    monkeypatch.setattr(objective_module, "CrossFittedScorer", SpyScorer)
    objective = Objective(data, _space(), n=15, n_resamples=3, seed=2)
    fixed = {"use_DL": True, "use_SecMI": True, "use_PIA": False, "C": 1.0, "penalty": "l2", "folds": 3}
    objective(optuna.trial.FixedTrial({**fixed, "representation": "raw", "difficulty_calibration": "image"}))
    objective(optuna.trial.FixedTrial({**fixed, "representation": "calibrated", "reference_formula": "difference",
                                       "difficulty_calibration": "off"}))

    columns = data.columns(["DL", "SecMI"])
    assert len(targets) == 6 and len(objective.draws) == 3
    for r, rows in enumerate(objective.draws):
        assert len(rows) == 30
        assert np.array_equal(targets[r], columns[rows]) and np.array_equal(targets[3 + r], columns[rows])
        design = np.hstack([np.ones((30, 1)), data.covariates[rows]])
        residuals = columns[rows] - design @ np.linalg.lstsq(design, columns[rows], rcond=None)[0]
        np.testing.assert_allclose(scored[r], residuals, atol=1e-9)
        pooled = np.hstack([np.ones((len(data.y), 1)), data.covariates])
        pooled_residuals = (columns - pooled @ np.linalg.lstsq(pooled, columns, rcond=None)[0])[rows]
        assert not np.allclose(scored[r], pooled_residuals, atol=1e-3)  # not a fit on all calibration images
        np.testing.assert_allclose(scored[3 + r], columns[rows] - data.reference_columns(["DL", "SecMI"])[0][rows])


def test_a_space_offering_difficulty_calibration_needs_covariates(with_reference):
    data = with_reference(n_per_side=20)
    data.covariates = None
    with pytest.raises(OptionError, match="difficulty covariates"):
        Objective(data, _space(), n=10, n_resamples=1)
    Objective(data, _space(representation=("raw", "both")), n=10, n_resamples=1)  # no regression: no covariates


def test_the_feature_calibration_of_a_config_file_is_checked(tmp_path):
    base = {"features": ["DL"], "C": 1.0, "penalty": "l2", "folds": 3, "access": "gray", "seed": 0}
    config = SearchConfig.from_dict({**base, "feature_calibration": {"representation": "both",
                                                                      "difficulty_calibration": False}})
    assert config.feature_calibration == {"representation": "both", "difficulty_calibration": "off"}
    assert SearchConfig.from_dict(base).feature_calibration == {}  # a config from before: the audit's options
    for bad, named in (({"representation": "residual"}, "representation"), ({"formula": "difference"}, "formula")):
        with pytest.raises(OptionError) as caught:
            SearchConfig.from_dict({**base, "feature_calibration": bad}, "best.yaml")
        message = str(caught.value)
        assert "best.yaml" in message and named in message and "\n" not in message


def test_check_references_refuses_a_calibrated_config_without_reference_models():
    config = SearchConfig(features=["DL"], C=1.0, penalty="l2", folds=3, access="gray", seed=0,
                          feature_calibration={"representation": "calibrated", "reference_formula": "difference",
                                               "difficulty_calibration": "off"},
                          calibration={"reference_models": [{"path": "/models/base", "fingerprint": "b" * 64}]},
                          search_run_id="abc123")
    with pytest.raises(OptionError) as caught:
        check_references(config, 0)
    message = str(caught.value)
    assert "--reference-model" in message and "/models/base" in message and "abc123" in message
    assert "\n" not in message
    check_references(config, 1)
    config.feature_calibration["representation"] = "raw"
    check_references(config, 0)
    config.feature_calibration = {}  # a config from before calibration was searched
    check_references(config, 0)


def test_search_cli_with_a_reference_model_writes_the_chosen_calibration(tiny_model, reference_model, image_sets,
                                                                         tracking_uri, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    code = main(["search", "--model", str(tiny_model), "--reference-model", str(reference_model),
                 "--members", str(image_sets[0]), "--nonmembers", str(image_sets[1]),
                 "--space", str(SPACES / "calibrated.yaml"), "--n-trials", "4", "--n", "10", "--resamples", "1",
                 "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"reference model: {Path(reference_model).resolve()}" in capsys.readouterr().out
    config = SearchConfig.read(out)
    chosen = config.feature_calibration
    assert chosen["representation"] in ("raw", "calibrated", "both")
    assert chosen["reference_formula"] in ("difference", "log_ratio")
    assert chosen["difficulty_calibration"] in DIFFICULTY_MODES
    fingerprint = load_model(reference_model).info.fingerprint
    assert config.calibration["reference_models"] == [{"path": str(Path(reference_model).resolve()),
                                                        "fingerprint": fingerprint}]
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(config.search_run_id)
    assert parent.data.params["calibration.reference_fingerprints"] == fingerprint
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{config.search_run_id}'")
    assert children and all("representation" in run.data.params for run in children)


def test_an_incomparable_or_identical_reference_model_is_refused(tiny_model, incomparable_model, image_sets,
                                                                 tracking_uri, capsys):
    for reference, says in ((incomparable_model, "16px"), (tiny_model, "same fingerprint")):
        code = main(["search", "--model", str(tiny_model), "--reference-model", str(reference),
                     "--members", str(image_sets[0]), "--nonmembers", str(image_sets[1]),
                     "--space", str(SPACES / "calibrated.yaml"), "--n-trials", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert "--reference-model" in err and str(reference) in err and says in err


def test_split_mode_extracts_the_reference_features_of_every_column(tiny_model, reference_model, image_sets):
    """Split mode, with a feature-setting variant: the reference's columns are its own features of the same
    images (checked against a direct extraction), variant columns in the variant's configuration."""
    names = ("DL", "NO_loss")
    data = split(tiny_model, *image_sets, names, fraction=0.5, variants=[("no_evals", 2, ("NO_loss",))],
                 reference_models=[reference_model], seed=3, batch_size=12, device="cpu")
    assert data.names == ("DL", "NO_loss", "NO_loss@no_evals=2")
    assert len(data.X_reference) == 1 and data.X_reference[0].shape == data.X.shape == (12, 3)
    assert data.covariates.shape == (12, 5) and np.isfinite(data.covariates).all()
    by_hash = {r.sha256: r for folder in image_sets for r in discover_images(folder, "suspect")}
    records = [by_hash[h] for h in data.sha256]
    reference = load_model(reference_model)
    direct = extract(reference, records, ["NO_loss"], config=FeatureConfig(no_evals=2), seed=3, progress=False,
                     device="cpu", use_cache=False).values
    np.testing.assert_allclose(data.X_reference[0][:, 2], direct[:, 0], rtol=1e-6)
    assert not np.allclose(data.X_reference[0], data.X)
    assert data.description["reference_models"][0]["fingerprint"] == reference.info.fingerprint


def test_the_audit_applies_the_calibration_a_config_names(tiny_model, reference_model, image_sets, tracking_uri,
                                                          tmp_path, capsys):
    config = SearchConfig(features=["DL", "PIA"], C=1.0, penalty="l2", folds=3, access="gray", seed=0,
                          feature_calibration={"representation": "both", "reference_formula": "difference",
                                               "difficulty_calibration": "image"},
                          calibration={"mode": "known", "sha256": []})
    path, result_path = config.write(tmp_path / "best.yaml"), tmp_path / "r.json"
    code = main(["audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
                 "--reference-model", str(reference_model), "--config", str(path), "--no-progress",
                 "--batch-size", "12", "--test", "welch", "--power-resamples", "0", "--experiment", "search-audits",
                 "--output", str(result_path)])
    assert code == 0, capsys.readouterr().err
    described = json.loads(result_path.read_text())["calibration"]
    assert (described["representation"], described["reference_formula"], described["difficulty_calibration"]) == \
        ("both", "difference", "image")
    assert described["scored_features"] == ["DL.resid", "PIA.resid", "DL-ref.resid", "PIA-ref.resid"]


def test_a_space_that_does_not_search_the_difficulty_scores_trials_as_the_audit_will(tiny_model, image_sets,
                                                                                     tracking_uri):
    """Without a difficulty key in its calibration section, a search on a pixel model scores every trial with the
    audit's default (image+pca+wiener: the pixels and DL's noise are computed), and leaves the choice to the
    audit's own option in the config; a space that samples the difficulty keeps its own values."""
    from cdi.audit import resolve_difficulty
    from cdi.search.run import calibration_data

    plain = SearchSpace(name="plain", families=("DL", "PIA"), timestep_families=())
    data = calibration_data(plain, model=tiny_model, suspect=image_sets[0], control=image_sets[1],
                            calibration_fraction=0.5, seed=1, batch_size=12, device="cpu")
    audit_default = resolve_difficulty("auto", load_model(tiny_model), len(data.y), FeatureConfig())
    assert data.difficulty_default == audit_default == "image+pca+wiener"
    assert data.wiener is not None and data.covariates.shape[1] > 5  # the image statistics, then the pixels
    outcome = search(data, plain, n_trials=3, n=6, n_resamples=1, experiment="search-unit")
    done = [t for t in outcome.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["feature_calibration"]["difficulty_calibration"] == audit_default
                        and "difficulty_calibration" not in t.params for t in done)
    assert "difficulty_calibration" not in outcome.config.feature_calibration  # the audit resolves its own default

    offered = SearchSpace(name="offered", families=("DL", "PIA"), timestep_families=(),
                          calibration={"difficulty_calibration": ("off",)})
    data = calibration_data(offered, model=tiny_model, suspect=image_sets[0], control=image_sets[1],
                            calibration_fraction=0.5, seed=1, batch_size=12, device="cpu")
    assert data.difficulty_default == "off" and data.wiener is None
    outcome = search(data, offered, n_trials=2, n=6, n_resamples=1, experiment="search-unit")
    assert all(t.user_attrs["feature_calibration"]["difficulty_calibration"] == "off" for t in outcome.study.trials)
