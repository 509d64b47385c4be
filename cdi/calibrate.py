"""Calibration runs: how often does the pipeline cry wolf on this model, and how much data does it need?

Features of known members and non-members are extracted once (and cached); then many audits are
simulated from them (`cdi.stats.error_rates`). Logged as one MLflow run in `cdi-calibration`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from cdi import tracking
from cdi.data import check_decodable, discover_images
from cdi.errors import ImageSetError
from cdi.features import FeatureConfig, extract, resolve_features
from cdi.models import load_model
from cdi.stats.error_rates import CalibrationResult, calibrate_features

log = logging.getLogger(__name__)
#: Folds of each simulated audit (calibrate_features' default).
NULL_AUDIT_FOLDS = 5


def _figures(result: CalibrationResult, folder: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    for rows, key, name, label in (
        (result.power_vs_n, "n", "power_vs_n.png", "images per side"),
        (result.power_vs_contamination, "contamination", "power_vs_contamination.png", "contamination ratio r"),
    ):
        if not rows:
            continue
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.plot([r[key] for r in rows], [r["power"] for r in rows], marker="o")
        ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"power at alpha = {rows[0]['alpha']}")
        ax.set_ylim(0, 1.02)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)


def run_calibration(
    model: str | Path,
    members: str | Path,
    nonmembers: Sequence[str | Path],
    *,
    access: str = "white",
    seed: int = 0,
    batch_size: int = 50,
    device: str = "auto",
    n_null: int = 500,
    n_resamples: int = 100,
    n_permutations: int = 199,
    experiment: str = "cdi-calibration",
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[str, CalibrationResult]:
    names = resolve_features(None, access)
    adapter = load_model(model)
    info = adapter.info
    member_records = discover_images(members, "suspect", "--members")
    nonmember_records = [r for folder in nonmembers for r in discover_images(folder, "control", "--nonmembers")]
    shared = {r.sha256 for r in member_records} & {r.sha256 for r in nonmember_records}
    if shared:
        raise ImageSetError(f"{len(shared)} image(s) are both members and non-members; the sets must be disjoint")
    needed = 4 * NULL_AUDIT_FOLDS  # two disjoint null halves of 2 x folds images (cdi.stats.error_rates)
    if len(nonmember_records) < needed:  # known before any model pass
        raise ImageSetError(f"--nonmembers: {len(nonmember_records)} non-member image(s); null audits need at least "
                            f"{needed} (two disjoint halves of {needed // 2}); add non-member images")
    check_decodable([*member_records, *nonmember_records], info.image_size, info.image_channels)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.connect(uri, experiment)
    with tracking.audit_run(uri, experiment, run_name=f"calibrate-{Path(model).resolve().name}") as run_id:
        tracking.log_params({
            "model_path": str(Path(model).resolve()), "model_fingerprint": info.fingerprint, "access": access,
            "seed": seed, "n_members": len(member_records), "n_nonmembers": len(nonmember_records),
            "n_null": n_null, "n_resamples": n_resamples, "n_permutations": n_permutations,
        })
        records = [*member_records, *nonmember_records]
        X = extract(adapter, records, names, config=FeatureConfig(), seed=seed, batch_size=batch_size, device=device,
                    progress=progress, cache_dir=cache_dir).values
        result = calibrate_features(X[: len(member_records)], X[len(member_records):], n_null=n_null,
                                    n_resamples=n_resamples, n_permutations=n_permutations, random_state=seed)
        metrics = {}
        for row in result.false_positive:
            metrics[f"fpr_{row['test']}_{row['alpha']}"] = row["rate"]
            metrics[f"fpr_{row['test']}_{row['alpha']}_ci_high"] = row["ci_high"]
        for row in result.power_vs_n:
            metrics[f"power_n{row['n']}"] = row["power"]
        for row in result.power_vs_contamination:
            metrics[f"power_r{row['contamination']}"] = row["power"]
        tracking.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "calibration.json").write_text(json.dumps(asdict(result), indent=2))
            import pandas as pd

            pd.DataFrame(result.false_positive).to_csv(folder / "false_positive_rate.csv", index=False)
            pd.DataFrame(result.power_vs_n + result.power_vs_contamination).to_csv(folder / "power.csv", index=False)
            _figures(result, folder)
            import mlflow

            mlflow.log_artifacts(str(folder))
    return run_id, result
