"""How a calibration (`cdi calibrate`) is laid out in MLflow: one run in `cdi-calibration`, named
`calibrate-<model folder>`;
- params: model path and fingerprint, access, seed, image counts, null audits, resamples, permutations;
- metrics (`stats.*`): `stats.fpr_<test>_<alpha>` and its upper 95 % bound `..._ci_high`,
  `stats.power_n<n>` (power against images per side), `stats.power_r<r>` (against contamination);
- artifacts: `calibration.json` (the whole result), `false_positive_rate.csv`, `power.csv` and the
  figures `cdi.report.calibration` draws.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from cdi.tracking import log_metrics, log_params

EXPERIMENT = "cdi-calibration"
ARTIFACT = "calibration.json"


def run_name(model_path: str | Path) -> str:
    """`calibrate-<model folder>`."""
    return f"calibrate-{Path(model_path).resolve().name}"


def log_opened(*, model_path: str | Path, fingerprint: str, access: str, seed: int, n_members: int,
               n_nonmembers: int, n_null: int, n_resamples: int, n_permutations: int) -> None:
    log_params({
        "model_path": str(Path(model_path).resolve()), "model_fingerprint": fingerprint, "access": access,
        "seed": seed, "n_members": n_members, "n_nonmembers": n_nonmembers, "n_null": n_null,
        "n_resamples": n_resamples, "n_permutations": n_permutations,
    })


def metrics(result: Any) -> dict[str, float]:
    """The metrics of a `cdi.stats.error_rates.CalibrationResult`."""
    found = {}
    for row in result.false_positive:
        found[f"stats.fpr_{row['test']}_{row['alpha']}"] = row["rate"]
        found[f"stats.fpr_{row['test']}_{row['alpha']}_ci_high"] = row["ci_high"]
    for row in result.power_vs_n:
        found[f"stats.power_n{row['n']}"] = row["power"]
    for row in result.power_vs_contamination:
        found[f"stats.power_r{row['contamination']}"] = row["power"]
    return found


def log_result(result: Any, figures: Mapping[str, Any]) -> None:
    """Metrics and artifacts of the calibration `result`; `figures`: artifact name -> matplotlib Figure."""
    import mlflow
    import pandas as pd

    log_metrics(metrics(result))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / ARTIFACT).write_text(json.dumps(asdict(result), indent=2))
        pd.DataFrame(result.false_positive).to_csv(folder / "false_positive_rate.csv", index=False)
        pd.DataFrame(result.power_vs_n + result.power_vs_contamination).to_csv(folder / "power.csv", index=False)
        for name, figure in figures.items():
            figure.savefig(folder / name, dpi=110)
        mlflow.log_artifacts(str(folder))


__all__ = ["ARTIFACT", "EXPERIMENT", "log_opened", "log_result", "metrics", "run_name"]
