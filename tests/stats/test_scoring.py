"""Cross-fitted scoring: out-of-fold scores, class-balanced folds, training-fold-only scaling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from cdi.stats import CrossFittedScorer

REPO_ROOT = Path(__file__).resolve().parents[2]


def _suspect_control(n_suspect: int, n_control: int, d: int = 4, shift: float = 0.0, seed: int = 0):
    """Gaussian features; suspect rows (y=1) come first, feature 0 shifted by `shift` sd."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_suspect + n_control, d))
    y = np.r_[np.ones(n_suspect, dtype=int), np.zeros(n_control, dtype=int)]
    X[y == 1, 0] += shift
    return X, y


def _manual_cross_fit(X, y, n_splits=5, random_state=0, scale_on="train"):
    """Plain reference loop: standardise by hand (numpy mean/std), fit a logistic regression."""
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    scores = np.full(len(y), np.nan)
    fold_ids = np.full(len(y), -1)
    coefs = []
    for fold, (train, held_out) in enumerate(folds.split(X, y)):
        reference = X[train] if scale_on == "train" else X
        mean = reference.mean(axis=0)
        std = reference.std(axis=0)  # ddof=0, as StandardScaler
        std[std == 0] = 1.0
        model = LogisticRegression(C=1.0, max_iter=1000).fit((X[train] - mean) / std, y[train])
        scores[held_out] = model.predict_proba((X[held_out] - mean) / std)[:, 1]
        fold_ids[held_out] = fold
        coefs.append(model.coef_.ravel())
    return scores, fold_ids, np.mean(coefs, axis=0)


def test_oof_scores_equal_a_manual_per_fold_refit():
    X, y = _suspect_control(30, 45, shift=0.5, seed=1)
    X[:, 2] = X[:, 2] * 50.0 + 7.0  # scale differences make the standardisation matter

    scorer = CrossFittedScorer().fit(X, y)
    scores, fold_ids, coef = _manual_cross_fit(X, y)

    np.testing.assert_array_equal(scorer.fold_ids_, fold_ids)
    np.testing.assert_allclose(scorer.oof_scores_, scores, rtol=0, atol=1e-7)
    np.testing.assert_allclose(scorer.coef_, coef, rtol=0, atol=1e-6)
    assert scorer.coef_.shape == (X.shape[1],)
    assert scorer.n_splits_ == 5


def test_scaler_is_fitted_on_training_folds_only():
    X, y = _suspect_control(25, 25, seed=2)
    X[3, 1] = 40.0  # one extreme image: its own fold's scaler must not see it

    scorer = CrossFittedScorer().fit(X, y)
    train_only, _, _ = _manual_cross_fit(X, y, scale_on="train")
    leaky, _, _ = _manual_cross_fit(X, y, scale_on="all")

    np.testing.assert_allclose(scorer.oof_scores_, train_only, rtol=0, atol=1e-7)
    assert np.max(np.abs(scorer.oof_scores_ - leaky)) > 1e-3  # the check can tell the two apart


def test_an_image_never_influences_its_own_fold():
    """Changing one image changes no other score in its held-out fold: that model never saw it."""
    X, y = _suspect_control(20, 20, seed=3)
    before = CrossFittedScorer().fit(X, y)
    i = 7
    X_changed = X.copy()
    X_changed[i] = 1e3  # a huge outlier
    after = CrossFittedScorer().fit(X_changed, y)

    same_fold = (before.fold_ids_ == before.fold_ids_[i]) & (np.arange(len(y)) != i)
    np.testing.assert_array_equal(after.fold_ids_, before.fold_ids_)
    np.testing.assert_array_equal(after.oof_scores_[same_fold], before.oof_scores_[same_fold])
    other_folds = before.fold_ids_ != before.fold_ids_[i]
    assert not np.allclose(after.oof_scores_[other_folds], before.oof_scores_[other_folds])


@pytest.mark.parametrize(
    ("n_suspect", "n_control", "n_splits"), [(30, 45, 5), (23, 37, 5), (12, 9, 3)]
)
def test_folds_are_class_balanced_and_cover_every_image_once(n_suspect, n_control, n_splits):
    X, y = _suspect_control(n_suspect, n_control, seed=4)
    scorer = CrossFittedScorer(n_splits=n_splits).fit(X, y)

    assert scorer.oof_scores_.shape == (len(y),)
    assert np.all((scorer.oof_scores_ > 0) & (scorer.oof_scores_ < 1))
    assert sorted(set(scorer.fold_ids_.tolist())) == list(range(n_splits))
    for fold in range(n_splits):
        in_fold = scorer.fold_ids_ == fold
        for label, n_class in ((1, n_suspect), (0, n_control)):
            assert abs(np.sum(y[in_fold] == label) - n_class / n_splits) < 1


def test_unequal_class_sizes_score_every_image():
    X, y = _suspect_control(30, 45, shift=1.0, seed=5)
    scorer = CrossFittedScorer().fit(X, y)
    assert np.isfinite(scorer.oof_scores_).all()
    assert scorer.oof_scores_[y == 1].mean() > scorer.oof_scores_[y == 0].mean()
    assert np.argmax(np.abs(scorer.coef_)) == 0 and scorer.coef_[0] > 0


def test_same_random_state_gives_same_scores_and_a_new_one_new_folds():
    X, y = _suspect_control(20, 20, seed=6)
    first = CrossFittedScorer(random_state=11).fit(X, y)
    again = CrossFittedScorer(random_state=11).fit(X, y)
    other = CrossFittedScorer(random_state=12).fit(X, y)
    np.testing.assert_array_equal(first.oof_scores_, again.oof_scores_)
    assert not np.array_equal(first.fold_ids_, other.fold_ids_)


def test_constant_feature_column_gives_finite_scores():
    X, y = _suspect_control(15, 15, seed=7)
    X[:, 1] = 3.0
    scorer = CrossFittedScorer().fit(X, y)
    assert np.isfinite(scorer.oof_scores_).all()
    assert np.isfinite(scorer.coef_).all()
    assert scorer.coef_[1] == 0.0


@pytest.mark.parametrize("penalty", ["l1", None])
def test_other_penalties_fit(penalty):
    X, y = _suspect_control(20, 20, shift=1.5, seed=8)
    scorer = CrossFittedScorer(penalty=penalty).fit(X, y)
    assert np.isfinite(scorer.oof_scores_).all()
    assert scorer.coef_[0] > 0


def test_non_finite_feature_is_reported_by_column():
    X, y = _suspect_control(10, 10, seed=9)
    X[4, 3] = np.nan
    with pytest.raises(ValueError, match="column 3"):
        CrossFittedScorer().fit(X, y)


def test_class_smaller_than_n_splits_is_rejected():
    X, y = _suspect_control(4, 20, seed=10)
    with pytest.raises(ValueError, match="n_splits=5"):
        CrossFittedScorer(n_splits=5).fit(X, y)


@pytest.mark.parametrize(
    ("params", "option"),
    [
        ({"n_splits": 1}, "n_splits"),
        ({"C": 0.0}, "C"),
        ({"penalty": "l3"}, "penalty"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_invalid_options_are_rejected_at_fit(params, option):
    X, y = _suspect_control(10, 10, seed=11)
    scorer = CrossFittedScorer(**params)  # __init__ only stores
    with pytest.raises(ValueError, match=option):
        scorer.fit(X, y)


def test_labels_other_than_0_and_1_are_rejected():
    X, _ = _suspect_control(10, 10, seed=12)
    with pytest.raises(ValueError, match="suspect"):
        CrossFittedScorer().fit(X, np.r_[np.full(10, 2), np.zeros(10)])


def test_scorer_is_a_cloneable_estimator():
    scorer = CrossFittedScorer(n_splits=3, C=0.5, random_state=4)
    copy = clone(scorer)
    expected = {"n_splits": 3, "C": 0.5, "penalty": "l2", "max_iter": 1000, "random_state": 4}
    assert copy.get_params() == expected
    X, y = _suspect_control(10, 10, seed=13)
    assert copy.fit(X, y) is copy
    assert not hasattr(scorer, "oof_scores_")


def test_stats_layer_never_imports_torch():
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    code = "import sys, cdi.stats; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT).returncode == 0
