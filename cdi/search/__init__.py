"""Hyperparameter search (Optuna): which features and scorer settings detect membership best on
calibration data, recorded in MLflow, exported as a `best_config.yaml` an audit can use."""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Public names and the private module of each; imported on first use so that `cdi --help` stays
# fast (the modules pull in torch, scikit-learn and MLflow).
_HOMES = {
    "CONFIG_ARTIFACT": "config", "SearchConfig": "config", "check_no_calibration_images": "config",
    "check_references": "config", "exclude_calibration_images": "config",
    "CalibrationData": "objective", "Score": "objective", "detection_score": "objective", "resamples": "objective",
    "SearchOutcome": "run", "run_search": "run", "search": "run",
    "SearchSpace": "space", "access_for": "space", "builtin_space": "space", "passes_per_image": "space",
    "Objective": "study", "create_study": "study", "optimize": "study",
    "EXPERIMENT": "cdi.tracking.search", "download_config": "cdi.tracking.search",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        home = _HOMES[name]
        return getattr(import_module(home if home.startswith("cdi.") else f"cdi.search.{home}"), name)
    raise AttributeError(f"module 'cdi.search' has no attribute {name!r}")


__all__ = [
    "CONFIG_ARTIFACT",
    "EXPERIMENT",
    "CalibrationData",
    "Objective",
    "Score",
    "SearchConfig",
    "SearchOutcome",
    "SearchSpace",
    "access_for",
    "builtin_space",
    "check_no_calibration_images",
    "check_references",
    "create_study",
    "detection_score",
    "download_config",
    "exclude_calibration_images",
    "optimize",
    "passes_per_image",
    "resamples",
    "run_search",
    "search",
]
