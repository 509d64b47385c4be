"""Calibration runs: how often does the pipeline cry wolf on this model, and how much data does it need?

Features of known members and non-members are extracted once (and cached); then many audits are
simulated from them (`cdi.stats.error_rates`). Logged as one MLflow run in `cdi-calibration`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence


from cdi import tracking
from cdi.data import check_decodable, discover_images
from cdi.errors import ImageSetError
from cdi.features import FeatureConfig, extract, resolve_features
from cdi.models import load_model
from cdi.report.calibration import calibration_figures
from cdi.stats.error_rates import CalibrationResult, calibrate_features
from cdi.tracking import calibration as calibration_layout

log = logging.getLogger(__name__)
#: Folds of each simulated audit (calibrate_features' default).
NULL_AUDIT_FOLDS = 5


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
    experiment: str = calibration_layout.EXPERIMENT,
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
    with tracking.audit_run(uri, experiment, run_name=calibration_layout.run_name(model)) as run_id:
        calibration_layout.log_opened(
            model_path=model, fingerprint=info.fingerprint, access=access, seed=seed, n_members=len(member_records),
            n_nonmembers=len(nonmember_records), n_null=n_null, n_resamples=n_resamples,
            n_permutations=n_permutations)
        records = [*member_records, *nonmember_records]
        X = extract(adapter, records, names, config=FeatureConfig(), seed=seed, batch_size=batch_size, device=device,
                    progress=progress, cache_dir=cache_dir).values
        result = calibrate_features(X[: len(member_records)], X[len(member_records):], n_null=n_null,
                                    n_resamples=n_resamples, n_permutations=n_permutations, random_state=seed)
        calibration_layout.log_result(result, calibration_figures(result))
    return run_id, result
