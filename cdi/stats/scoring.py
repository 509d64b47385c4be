"""Cross-fitted membership scores: every image is scored by a classifier that never saw it.

Method section 5, steps 1-2: features of the suspect set P (label 1) and the control set U
(label 0) are split into K class-balanced folds; in each fold a StandardScaler + logistic
regression is fitted on the other K-1 folds only and scores the held-out fold with P(member).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import sklearn
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController

from cdi.errors import FeatureError, OptionError
from cdi.stats.progress import report

_PENALTIES = ("l2", "l1", None)

# scikit-learn 1.8 deprecated LogisticRegression(penalty=...) in favour of l1_ratio / C=inf.
_SKLEARN_HAS_L1_RATIO_PENALTY = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)


@cache
def threadpools() -> ThreadpoolController:
    """The BLAS/OpenMP pools loaded in this process, inspected once (inspecting costs ~5 ms)."""
    return ThreadpoolController()


class OptionValueError(OptionError, ValueError):
    """An estimator option is invalid (a ValueError, as scikit-learn users expect)."""


class FeatureValueError(FeatureError, ValueError):
    """Features or labels cannot be scored (a ValueError, as scikit-learn users expect)."""


def logistic_regression(C: float, penalty: str | None, max_iter: int, random_state: int | None):
    """LogisticRegression with the requested penalty, spelled for the installed scikit-learn."""
    solver = "liblinear" if penalty == "l1" else "lbfgs"  # lbfgs has no L1
    if _SKLEARN_HAS_L1_RATIO_PENALTY:
        if penalty is None:
            return LogisticRegression(C=np.inf, max_iter=max_iter, random_state=random_state)
        return LogisticRegression(
            C=C,
            l1_ratio=1.0 if penalty == "l1" else 0.0,
            solver=solver,
            max_iter=max_iter,
            random_state=random_state,
        )
    return LogisticRegression(
        C=C, penalty=penalty, solver=solver, max_iter=max_iter, random_state=random_state
    )


def check_scorer_options(n_splits: int, C: float, penalty: str | None, max_iter: int) -> None:
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise OptionValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    if not np.isfinite(C) or C <= 0:
        raise OptionValueError(f"C must be a finite number > 0, got {C!r}")
    if penalty not in _PENALTIES:
        raise OptionValueError(f"penalty must be one of {_PENALTIES}, got {penalty!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise OptionValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def is_positive_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def check_alpha(alpha) -> None:
    is_number = isinstance(alpha, (int, float, np.floating)) and not isinstance(alpha, bool)
    if not (is_number and 0.0 < alpha < 1.0):
        raise OptionValueError(f"alpha must be a number in (0, 1), got {alpha!r}")


def check_features_and_labels(X, y, n_splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Return X as float (n, d) and y as int {0, 1} (n,), or raise a ValueError saying why not."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise FeatureValueError(
            f"X must be a 2-D (n_images, n_features) array, got shape {X.shape}"
        )
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise FeatureValueError(
            f"y must be 1-D with one label per row of X ({X.shape[0]}), got shape {y.shape}"
        )
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise FeatureValueError(
            f"y must hold 1 for suspect (P) and 0 for control (U), got labels {sorted(labels)}"
        )
    y = y.astype(int)
    bad_columns = np.flatnonzero(~np.isfinite(X).all(axis=0))
    if bad_columns.size:
        column = int(bad_columns[0])
        rows = np.flatnonzero(~np.isfinite(X[:, column]))
        raise FeatureValueError(
            f"X has non-finite values (NaN or inf) in feature column {column} "
            f"(rows {rows[:5].tolist()}{'...' if rows.size > 5 else ''}; "
            f"all bad columns: {bad_columns.tolist()}); recompute or drop those features/images"
        )
    for label, name in ((1, "suspect (P, y=1)"), (0, "control (U, y=0)")):
        count = int(np.sum(y == label))
        if count < n_splits:
            raise FeatureValueError(
                f"the {name} class has {count} images, fewer than n_splits={n_splits}; "
                f"add images or lower n_splits"
            )
    return X, y


class CrossFittedScorer(BaseEstimator):
    """K-fold cross-fitted StandardScaler + logistic regression giving out-of-fold P(member).

    Folds are drawn jointly class-balanced (StratifiedKFold, shuffled with `random_state`); the
    scaler and the classifier of each fold see only the other folds.

    Attributes (after fit): `oof_scores_` (n,) out-of-fold P(member), `fold_ids_` (n,) the fold in
    which each image was held out, `coef_` (d,) mean over folds of the logistic coefficients on
    standardised features, `n_splits_` number of folds used, `n_features_in_`.
    """

    def __init__(
        self,
        n_splits: int = 5,
        C: float = 1.0,
        penalty: str | None = "l2",
        max_iter: int = 1000,
        random_state: int | None = 0,
    ) -> None:
        self.n_splits = n_splits
        self.C = C
        self.penalty = penalty
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y) -> CrossFittedScorer:
        """Score every row of X out of fold; y is 1 for suspect (P) and 0 for control (U)."""
        check_scorer_options(self.n_splits, self.C, self.penalty, self.max_iter)
        X, y = check_features_and_labels(X, y, self.n_splits)
        folds = StratifiedKFold(
            n_splits=self.n_splits, shuffle=True, random_state=self.random_state
        )

        oof_scores = np.full(X.shape[0], np.nan)
        fold_ids = np.full(X.shape[0], -1, dtype=int)
        coefs = []
        # The per-fold problems are tiny (hundreds of images, tens of features): threaded BLAS only
        # adds overhead there (about 40x slower lbfgs fits measured on a busy 2-core machine).
        with threadpools().limit(limits=1, user_api="blas"):
            for fold, (train, held_out) in enumerate(folds.split(X, y)):
                # per-feature standardisation fitted on the training folds only
                scaler = StandardScaler().fit(X[train])
                classifier = logistic_regression(
                    self.C, self.penalty, self.max_iter, self.random_state
                )
                classifier.fit(scaler.transform(X[train]), y[train])
                # classes_ is [0, 1]: a training split holds >= n_splits - 1 images of each class
                oof_scores[held_out] = classifier.predict_proba(scaler.transform(X[held_out]))[:, 1]
                fold_ids[held_out] = fold
                coefs.append(classifier.coef_.ravel())
                report("scoring", fold + 1, self.n_splits, "folds")

        self.oof_scores_ = oof_scores
        self.fold_ids_ = fold_ids
        self.coef_ = np.mean(coefs, axis=0)
        self.n_splits_ = len(coefs)
        self.n_features_in_ = X.shape[1]
        return self


__all__ = ["CrossFittedScorer", "check_features_and_labels", "check_scorer_options", "logistic_regression", "threadpools"]
