"""Figures of a calibration run (`cdi calibrate`): power against images per side and against contamination."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

#: The power a data owner plans for, drawn as a guide line.
PLANNED_POWER = 0.8


def calibration_figures(result: Any) -> dict[str, Figure]:
    """`power_vs_n.png` and `power_vs_contamination.png` of a `cdi.stats.error_rates.CalibrationResult`,
    each only where the result has points."""
    figures = {}
    for rows, key, name, label in (
        (result.power_vs_n, "n", "power_vs_n.png", "images per side"),
        (result.power_vs_contamination, "contamination", "power_vs_contamination.png", "contamination ratio r"),
    ):
        if not rows:
            continue
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        ax.plot([r[key] for r in rows], [r["power"] for r in rows], marker="o")
        ax.axhline(PLANNED_POWER, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"power at alpha = {rows[0]['alpha']}")
        ax.set_ylim(0, 1.02)
        fig.tight_layout()
        figures[name] = fig
    return figures


__all__ = ["PLANNED_POWER", "calibration_figures"]
