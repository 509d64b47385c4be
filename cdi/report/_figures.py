"""Figures of the audit report, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so rendering a
report leaves no global figure state behind and does not depend on the user's backend.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SUSPECT_COLOUR = "#c0392b"
CONTROL_COLOUR = "#2471a3"
TARGET_POWER = 0.8
_DPI = 100


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No "Software" text chunk: the same inputs give the same bytes whatever the matplotlib build.
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def score_histogram(suspect: Sequence[float], control: Sequence[float]) -> bytes:
    """Histogram of out-of-fold membership scores, suspect over control, on shared bins in [0, 1]."""
    suspect = np.asarray(suspect, dtype=float)
    control = np.asarray(control, dtype=float)
    suspect, control = suspect[np.isfinite(suspect)], control[np.isfinite(control)]
    bins = np.linspace(0.0, 1.0, 21)
    figure = Figure(figsize=(7.0, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.hist(control, bins=bins, color=CONTROL_COLOUR, alpha=0.55, label=f"control (U), n = {control.size}")
    axes.hist(suspect, bins=bins, color=SUSPECT_COLOUR, alpha=0.55, label=f"suspect (P), n = {suspect.size}")
    for values, colour in ((control, CONTROL_COLOUR), (suspect, SUSPECT_COLOUR)):
        if values.size:
            axes.axvline(values.mean(), color=colour, linestyle="--", linewidth=1.5)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("membership score (out-of-fold; higher = more like training data)")
    axes.set_ylabel("images")
    axes.set_title("Scores of suspect vs control images (dashed: means)")
    axes.legend(loc="best", frameon=False)
    return _png(figure)


def power_plot(
    n: Sequence[float],
    power: Sequence[float],
    median_p: Sequence[float],
    alpha: float | None,
    recommended_n: int | None,
) -> bytes:
    """Left: power against images per side with the 0.8 target. Right: median p on a log axis."""
    n = np.asarray(n, dtype=float)
    power = np.asarray(power, dtype=float)
    median_p = np.asarray(median_p, dtype=float)
    # A log axis cannot show p = 0 (possible for Welch p far below float precision): draw it at
    # a tenth of the smallest positive value so that the point stays visible at the bottom.
    positive = median_p[median_p > 0]
    floor = positive.min() / 10.0 if positive.size else 1e-16
    shown_p = np.where(median_p > 0, median_p, floor)

    figure = Figure(figsize=(9.0, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(n, power, marker="o", color=SUSPECT_COLOUR)
    left.axhline(TARGET_POWER, color="black", linestyle="--", linewidth=1, label=f"target power {TARGET_POWER}")
    if recommended_n is not None:
        left.axvline(recommended_n, color="grey", linestyle=":", label=f"recommended n = {recommended_n}")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("images per side (n suspect = n control)")
    left.set_ylabel("power (share of resamples with p < alpha)")
    left.set_title("Detection power")
    left.legend(loc="lower right", frameon=False)

    right.plot(n, shown_p, marker="o", color=CONTROL_COLOUR)
    right.set_yscale("log")
    if alpha is not None:
        right.axhline(alpha, color="black", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
        right.legend(loc="upper right", frameon=False)
    right.set_xlabel("images per side (n suspect = n control)")
    right.set_ylabel("median p-value (log scale)")
    right.set_title("Typical p-value")
    return _png(figure)


def feature_auc_plot(feature_auc: Mapping[str, float]) -> bytes:
    """Horizontal bars of single-image AUC (suspect vs control) per feature, 0.5 = no signal."""
    names = list(feature_auc)
    values = np.array([feature_auc[name] for name in names], dtype=float)
    height = max(2.4, 0.28 * len(names) + 1.2)
    figure = Figure(figsize=(7.0, height), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    colours = [SUSPECT_COLOUR if v > 0.5 else CONTROL_COLOUR for v in np.nan_to_num(values, nan=0.5)]
    axes.barh(positions, np.nan_to_num(values, nan=0.5) - 0.5, left=0.5, color=colours)
    axes.axvline(0.5, color="black", linewidth=1)
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("AUC of one feature, suspect vs control (0.5 = no signal)")
    axes.set_title("Which features separate the sets")
    return _png(figure)
