"""The audit report: one self-contained HTML page (inline CSS, figures as base64 PNG, no scripts).

Input is what an audit logs to MLflow: the result JSON (`result.json`) and the per-image table
(`features.csv`). Every string taken from them is escaped; every optional field that is absent or
None renders as "not computed", so reports of older or partial runs still open.
"""

from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from cdi.errors import CDIError
from cdi.report import _figures

NOT_COMPUTED = '<span class="missing">not computed</span>'
REQUIRED_KEYS = ("p_value", "verdict", "alpha")
VERDICTS = ("used", "not_detected")
#: Columns of features.csv that are not features.
TABLE_COLUMNS = ("file_name", "path", "sha256", "set", "oof_score")

TEST_DESCRIPTIONS = {
    "permutation": "permutation test (exact p-value from shuffling the suspect/control labels)",
    "welch": "one-sided Welch t-test (the paper's protocol)",
}
TEST_DESCRIPTIONS["welch_one_sided"] = TEST_DESCRIPTIONS["welch"]  # the name audits before 2026-12-03 recorded
ACCESS_DESCRIPTIONS = {
    "gray": "gray-box: the model's noise predictions only",
    "white": "white-box: noise predictions and gradients through the model",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125;
       max-width: 980px; margin: 0 auto; padding: 1.5rem; line-height: 1.5; background: #fff; }
h1 { margin: 0 0 .4rem 0; font-size: 1.8rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
.verdict { border-radius: 8px; padding: 1.2rem 1.5rem; border-left: 10px solid; }
.verdict[data-verdict="used"] { background: #fdecea; border-color: #c0392b; }
.verdict[data-verdict="not_detected"] { background: #eaf2fb; border-color: #2471a3; }
.verdict .sentence { font-size: 1.15rem; margin: .3rem 0; }
.verdict .numbers { font-family: ui-monospace, monospace; margin: .3rem 0 0 0; }
.warning { background: #fff4ce; border: 2px solid #d4a017; border-radius: 6px; padding: .8rem 1rem;
           margin: 1rem 0; font-weight: 500; }
.warning strong { color: #8a5a00; }
table { border-collapse: collapse; margin: .5rem 0 1rem 0; }
th, td { text-align: left; padding: .3rem .8rem; border-bottom: 1px solid #e5e8eb; vertical-align: top; }
th { background: #f6f8fa; }
td.number { font-family: ui-monospace, monospace; text-align: right; }
code { font-family: ui-monospace, monospace; font-size: .9em; word-break: break-all; }
.missing { color: #6a737d; font-style: italic; }
.status-ok { color: #1e7e34; font-weight: 600; }
.status-flagged { color: #b02a37; font-weight: 600; }
.status-skipped { color: #6a737d; font-weight: 600; }
figure { margin: 1rem 0 1.5rem 0; }
img.figure { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
figcaption { color: #444; font-size: .95rem; }
.note { color: #444; }
footer { margin-top: 2.5rem; color: #6a737d; font-size: .9rem; }
"""


# -- formatting -------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """Escaped text of a value, or "not computed" when it is None."""
    return NOT_COMPUTED if value is None else escape(str(value))


def _number(value: Any, spec: str = ".3g") -> str:
    """A formatted number; "not computed" for None, "undefined" for NaN, escaped text otherwise."""
    if value is None:
        return NOT_COMPUTED
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return escape(str(value))
    if isinstance(value, float) and math.isnan(value):
        return '<span class="missing">undefined</span>'
    if spec.endswith("d") and isinstance(value, float):
        spec = ".0f" if value.is_integer() else ".3g"
    return escape(format(value, spec))


def _code(value: Any) -> str:
    return NOT_COMPUTED if value is None else f"<code>{escape(str(value))}</code>"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _rows(rows: Iterable[tuple[str, str]]) -> str:
    """Two-column table body; the first cell is trusted markup-free text, the second is markup."""
    return "\n".join(f"<tr><th scope=\"row\">{escape(label)}</th><td>{cell}</td></tr>" for label, cell in rows)


def _image(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img class="figure" alt="{escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


# -- sections ---------------------------------------------------------------------------------


def _verdict(result: Mapping[str, Any], n_warnings: int) -> str:
    verdict, p_value, alpha = result["verdict"], result["p_value"], result["alpha"]
    p_text, alpha_text = _number(p_value), _number(alpha, "g")
    if verdict == "used":
        title = "Verdict: used"
        sentence = (
            "The suspect images look more like this model's training data than the control images do. "
            f"This is statistically significant evidence that the suspect set was used to train the model "
            f"(p = {p_text} is below the significance level alpha = {alpha_text})."
        )
    else:
        title = "Verdict: not detected"
        sentence = (
            "The audit found no significant evidence that the suspect images were used to train this model "
            f"(p = {p_text} is not below the significance level alpha = {alpha_text}). "
            "This is not proof that they were not used."
        )
    if n_warnings:
        sentence += " Read the warning" + ("s" if n_warnings > 1 else "") + " below before relying on this verdict."
    test = result.get("test")
    test_text = TEST_DESCRIPTIONS.get(test, test) if isinstance(test, str) else test
    return (
        f'<section class="verdict" data-verdict="{escape(verdict)}">\n'
        f"<h1>{title}</h1>\n"
        f'<p class="sentence">{sentence}</p>\n'
        f'<p class="numbers">p-value = {p_text} &nbsp;|&nbsp; alpha = {alpha_text} &nbsp;|&nbsp; '
        f"test: {_text(test_text)}</p>\n"
        "</section>"
    )


def _warnings(result: Mapping[str, Any]) -> list[str]:
    """The result's warnings, plus one per flagged check the result's warnings do not mention."""
    found = [str(w) for w in (result.get("warnings") or [])]
    lowered = " ".join(found).lower()
    shift = _mapping(result.get("shift_check"))
    if shift.get("flagged") and "shift" not in lowered:
        found.append(
            f"The shift guard found that the suspect and control images differ in model-free image statistics "
            f"(AUC {_plain(shift.get('auc'), '.2f')}, p = {_plain(shift.get('p_value'))}): a 'used' verdict may "
            "reflect this distribution shift between P and U rather than training. Use a control set from the "
            "same source, period and processing as the suspect set."
        )
    null = _mapping(result.get("null_check"))
    if null.get("flagged") and "null check" not in lowered:
        found.append(
            f"The null check (the same test on two random halves of the control set) was significant "
            f"(p = {_plain(null.get('p_value'))}): the pipeline may be miscalibrated on these data; "
            "treat the verdict with caution."
        )
    return found


def _plain(value: Any, spec: str = ".3g") -> str:
    """A number as plain text (escaped later with the sentence it sits in)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return "not computed" if value is None else str(value)


def _warning_section(warnings: list[str]) -> str:
    if not warnings:
        return ""
    boxes = "\n".join(
        f'<div class="warning" role="alert"><strong>Warning.</strong> {escape(text)}</div>' for text in warnings
    )
    return f'<section id="warnings">\n{boxes}\n</section>'


def _calibration_text(calibration: Mapping[str, Any]) -> str:
    parts = []
    representation = calibration.get("representation", "raw")
    if representation != "raw":
        parts.append(f"{representation} features against the reference model(s) "
                     f"({calibration.get('reference_formula')}, same seeded noise)")
    if calibration.get("difficulty_calibration", "off") != "off":
        parts.append("per-image difficulty regressed out on label-free image statistics ("
                     + ", ".join(map(str, calibration.get("difficulty_covariates") or [])) + ")")
    return "; ".join(parts) if parts else "none (raw features)"


def _facts(result: Mapping[str, Any]) -> str:
    access = result.get("access")
    access_text = ACCESS_DESCRIPTIONS.get(access, access) if isinstance(access, str) else access
    features = result.get("features")
    features_text = NOT_COMPUTED if features is None else (
        f"{len(features)}" + (f" ({escape(', '.join(map(str, features)))})" if 0 < len(features) <= 30 else "")
    )
    rows = [
        ("Suspect images (P)", _number(result.get("n_suspect"), "d")),
        ("Control images (U)", _number(result.get("n_control"), "d")),
        *([("Left out (calibration data of a search)", _text(
            f"{held['suspect']} suspect, {held['control']} control (search run {held['search_run_id']})"))]
          if (held := result.get("excluded_calibration_images")) else []),
        ("Access level", _text(access_text)),
        ("Features used", features_text),
        ("Model fingerprint", _code(result.get("model_fingerprint"))),
        ("Model path", _code(result.get("model_path"))),
        *([("LoRA applied to the model", _code(f"{lora.get('path')} (sha256 {str(lora.get('sha256'))[:12]})"))]
          if isinstance(lora := result.get("lora"), Mapping) else []),
        *[(f"Reference model {k}" + (" (the base of the LoRA)" if ref.get("base_of_lora") else ""),
           _code(f"{ref.get('path')} (fingerprint {str(ref.get('fingerprint'))[:12]})"))
          for k, ref in enumerate(result.get("reference_models") or [], start=1) if isinstance(ref, Mapping)],
        *([("Calibration", _text(_calibration_text(calibration)))]
          if isinstance(calibration := result.get("calibration"), Mapping) else []),
        ("Seed", _text(result.get("seed"))),
        ("Cross-fitting folds", _text(result.get("folds"))),
        ("Run id", _code(result.get("run_id"))),
        ("Test statistic (Welch t of the scores)", _number(result.get("statistic"), ".3f")),
        ("AUC of the membership scores, suspect vs control", _number(result.get("auc"), ".3f")),
        ("Welch p-value (paper's protocol, for comparison)", _number(result.get("welch_p_value"))),
    ]
    return f'<section id="facts">\n<h2>Key facts</h2>\n<table class="facts">\n{_rows(rows)}\n</table>\n</section>'


def _check_cells(check: Mapping[str, Any] | None, measures: str) -> tuple[str, str]:
    """(outcome cell, status cell) of one check."""
    if not check:
        return NOT_COMPUTED, NOT_COMPUTED
    if check.get("skipped"):
        reason = check.get("reason")
        outcome = f"skipped: {escape(str(reason))}" if reason else "skipped"
        return outcome, '<span class="status-skipped">skipped</span>'
    if check.get("flagged"):
        return measures, '<span class="status-flagged">flagged</span>'
    return measures, '<span class="status-ok">passed</span>'


def _checks(result: Mapping[str, Any]) -> str:
    null = result.get("null_check")
    shift = result.get("shift_check")
    null_map, shift_map = _mapping(null), _mapping(shift)
    null_outcome, null_status = _check_cells(null_map or None, f"p = {_number(null_map.get('p_value'))}")
    shift_outcome, shift_status = _check_cells(
        shift_map or None,
        f"AUC = {_number(shift_map.get('auc'), '.2f')}, p = {_number(shift_map.get('p_value'))}",
    )
    return f"""<section id="checks">
<h2>Checks of the test itself</h2>
<table class="checks">
<tr><th>Check</th><th>What it asks</th><th>Outcome</th><th>Status</th></tr>
<tr><td>Null check</td><td>Run the whole test on two random halves of the control set, where there is nothing to
find. A significant result there means the test itself is miscalibrated on these data.</td>
<td>{null_outcome}</td><td>{null_status}</td></tr>
<tr><td>Shift guard</td><td>Can simple image statistics (brightness, colour, sharpness, compression, size),
which know nothing of the model, tell the suspect images from the control images? If so, the two sets
differ in ways that can mimic training.</td>
<td>{shift_outcome}</td><td>{shift_status}</td></tr>
</table>
</section>"""


def _effect(result: Mapping[str, Any]) -> str:
    effect = _mapping(result.get("effect_size"))
    value = effect.get("value")
    if value is None:
        body = f"<p>Effect size: {NOT_COMPUTED}.</p>"
    else:
        confidence = effect.get("confidence", 0.95)
        interval = (
            f"{_number(effect.get('ci_low'), '.2f')} to {_number(effect.get('ci_high'), '.2f')}"
            if effect.get("ci_low") is not None or effect.get("ci_high") is not None
            else NOT_COMPUTED
        )
        size = abs(float(value))
        words = (
            "an undefined" if not math.isfinite(size) else "a negligible" if size < 0.2 else "a small"
            if size < 0.5 else "a medium" if size < 0.8 else "a large"
        )
        body = (
            f"<p>Hedges' g = <strong>{_number(value, '.2f')}</strong> "
            f"({_number(confidence * 100, '.0f')}% bootstrap interval: {interval}), {words} effect.</p>\n"
            '<p class="note">The effect size says by how much the suspect images score higher than the control '
            "images, in standard deviations of the scores: 0 means no difference, 0.2 is small, 0.5 medium, "
            "0.8 and above large. Unlike the p-value it does not grow with the number of images.</p>"
        )
    return f'<section id="effect">\n<h2>Effect size</h2>\n{body}\n</section>'


def _score_figure(table: pd.DataFrame) -> str:
    if "oof_score" not in table.columns or "set" not in table.columns:
        return f"<p>Histogram of membership scores: {NOT_COMPUTED} (the table has no oof_score column).</p>"
    scores = pd.to_numeric(table["oof_score"], errors="coerce")
    suspect = scores[table["set"] == "suspect"].dropna().to_numpy()
    control = scores[table["set"] == "control"].dropna().to_numpy()
    if suspect.size == 0 and control.size == 0:
        return f"<p>Histogram of membership scores: {NOT_COMPUTED} (no scores in the table).</p>"
    mean_s = f"{suspect.mean():.2f}" if suspect.size else "none"
    mean_c = f"{control.mean():.2f}" if control.size else "none"
    alt = (
        f"Histogram of out-of-fold membership scores: {suspect.size} suspect images (mean {mean_s}) "
        f"and {control.size} control images (mean {mean_c})."
    )
    caption = (
        "<strong>Figure 1. Membership scores.</strong> Each image gets a score between 0 and 1 from a classifier "
        "that never saw that image's own label (out-of-fold). If the suspect images were used for training, "
        "their scores (red) tend to sit to the right of the control scores (blue). "
        f"Mean score: suspect {escape(mean_s)}, control {escape(mean_c)}."
    )
    return _image(_figures.score_histogram(suspect, control), alt, caption)


def _power(result: Mapping[str, Any]) -> str:
    curve = [row for row in (result.get("power_curve") or []) if isinstance(row, Mapping)]
    recommended = result.get("recommended_n")
    n_available = [v for v in (result.get("n_suspect"), result.get("n_control")) if isinstance(v, int)]
    if recommended is not None:
        advice = f"About <strong>{_number(recommended, 'd')}</strong> suspect and as many control images give a " \
                 "0.8 chance of detection (if the effect is as strong as in these data)."
        if n_available and isinstance(recommended, (int, float)) and recommended > min(n_available):
            advice += " That is more than this audit had."
    elif curve:
        advice = ("No set size tried reached a 0.8 chance of detection: with effects this weak, "
                  "more images are needed than this audit had.")
    else:
        advice = f"Recommended number of images: {NOT_COMPUTED}."
    if not curve:
        return (
            '<section id="power">\n<h2>How many images are needed</h2>\n'
            f"<p>Power curve: {NOT_COMPUTED}.</p>\n<p>{advice}</p>\n</section>"
        )
    n = [row.get("n") for row in curve]
    power = [row.get("power") for row in curve]
    median_p = [row.get("median_p") for row in curve]
    alt = "Power curve: " + "; ".join(
        f"n = {_plain(a)}: power {_plain(b, '.2f')}, median p {_plain(c)}" for a, b, c in zip(n, power, median_p)
    )
    numeric = all(isinstance(v, (int, float)) for v in (*n, *power, *median_p))
    figure = (
        _image(
            _figures.power_plot(n, power, median_p, result.get("alpha"), recommended),
            alt,
            "<strong>Figure 2. Detection power.</strong> The audit was repeated on random subsets of n suspect and "
            "n control images. Left: the share of repeats that reached the verdict 'used' (the dashed line is the "
            "usual 0.8 target). Right: the typical (median) p-value, on a log scale; the dashed line is alpha.",
        )
        if numeric
        else f"<p>Power curve figure: {NOT_COMPUTED} (non-numeric values).</p>"
    )
    rows = "\n".join(
        f'<tr><td class="number">{_number(a, "d")}</td><td class="number">{_number(b, ".2f")}</td>'
        f'<td class="number">{_number(c)}</td></tr>'
        for a, b, c in zip(n, power, median_p)
    )
    return (
        '<section id="power">\n<h2>How many images are needed</h2>\n'
        f"{figure}\n<p>{advice}</p>\n"
        '<table class="power"><tr><th>images per side</th><th>power</th><th>median p</th></tr>\n'
        f"{rows}\n</table>\n</section>"
    )


def _feature_names(result: Mapping[str, Any], table: pd.DataFrame) -> list[str]:
    calibration = result.get("calibration")
    names = calibration.get("scored_features") if isinstance(calibration, Mapping) else None
    names = names if names is not None else result.get("features")
    if names is None:
        names = [c for c in table.columns if c not in TABLE_COLUMNS]
    names = [str(n) for n in names]
    for extra in (*_mapping(result.get("feature_auc")), *_mapping(result.get("coefficients"))):
        if str(extra) not in names:
            names.append(str(extra))
    return names


def _features(result: Mapping[str, Any], table: pd.DataFrame) -> str:
    feature_auc = _mapping(result.get("feature_auc"))
    coefficients = _mapping(result.get("coefficients"))
    figure = ""
    if feature_auc:
        numeric = {str(k): v for k, v in feature_auc.items() if isinstance(v, (int, float))}
        if numeric:
            ranked = sorted(numeric.items(), key=lambda item: abs(item[1] - 0.5), reverse=True)
            alt = "Bar chart of single-feature AUC, suspect vs control: " + ", ".join(
                f"{name} {value:.2f}" for name, value in ranked
            )
            figure = _image(
                _figures.feature_auc_plot(numeric),
                alt,
                "<strong>Figure 3. Per-feature AUC.</strong> How well each feature alone tells a suspect image from "
                "a control image: 0.5 is chance; bars to the right (red) are higher on suspect images, bars to the "
                "left (blue) lower.",
            )
    else:
        figure = f"<p>Per-feature AUC chart: {NOT_COMPUTED}.</p>"
    names = _feature_names(result, table)
    rows = "\n".join(
        f'<tr><td><code>{escape(name)}</code></td><td class="number">{_number(feature_auc.get(name), ".3f")}</td>'
        f'<td class="number">{_number(coefficients.get(name), ".3f")}</td></tr>'
        for name in names
    )
    table_html = (
        '<table class="features"><tr><th>feature</th><th>AUC (suspect vs control)</th>'
        f"<th>coefficient (standardised)</th></tr>\n{rows}\n</table>"
        if names
        else f"<p>Feature list: {NOT_COMPUTED}.</p>"
    )
    return (
        '<section id="features">\n<h2>Features</h2>\n'
        f"{figure}\n"
        '<p class="note">Each feature measures, for one image, how the model reacts to it (for example how well '
        "it removes noise from it). The AUC says how well that feature alone separates suspect from control "
        "images: 0.5 is no better than chance, and values far from 0.5 in either direction separate well. "
        "The coefficient is the feature's weight in the classifier that combines all features into the "
        "membership score, on standardised features; its sign gives the direction.</p>\n"
        f"{table_html}\n</section>"
    )


_HOW_TO_READ = """<section id="how-to-read">
<h2>How to read this report</h2>
<ul>
<li><strong>What the p-value means.</strong> Suppose the suspect images were <em>not</em> used for training,
so that the model treats them just like the control images. The p-value is the probability that chance alone
would then make the suspect images look at least this much more "member-like" than the control images.
A p-value below alpha, the threshold fixed before the audit, leads to the verdict "used".
The p-value is not the probability that the images were not used.</li>
<li><strong>"Not detected" is not proof of non-use.</strong> The test may simply lack power: too few images,
gray-box access only, or a weak trace of the images in the model. The section "How many images are needed"
estimates how many images a reliable detection would take.</li>
<li><strong>The comparison is only as good as the control set.</strong> The test assumes that the control
images (U) are drawn independently from the same distribution as the suspect images (P): same source,
photographer or camera, period and processing, and that they were certainly not used for training. If U
differs from P in other ways, the model can score the two sets differently for reasons unrelated to
training, and a "used" verdict can be wrong. The shift guard catches visible differences of this kind but
cannot rule out all of them.</li>
<li><strong>Membership scores.</strong> A classifier combines the features into one score per image; each
image is scored by a classifier trained on the other images only (cross-fitting), so no image grades
itself.</li>
</ul>
</section>"""


# -- public API -------------------------------------------------------------------------------


def _check_result(result: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if result.get(key) is None]
    if missing:
        raise CDIError(
            f"result.json has no {', '.join(missing)}: it is not the result of a finished cdi audit; "
            "pass the run id of a finished audit"
        )
    if result["verdict"] not in VERDICTS:
        raise CDIError(f"result.json: verdict {result['verdict']!r} is not one of {', '.join(VERDICTS)}")


def render_report(result: dict, table: pd.DataFrame) -> str:
    """The HTML text of the audit report of `result` (result.json) and `table` (features.csv)."""
    _check_result(result)
    verdict = result["verdict"]
    run_id = result.get("run_id")
    title = f"CDI audit: {'used' if verdict == 'used' else 'not detected'}" + (f" (run {run_id})" if run_id else "")
    footer = (
        f"Created {_text(result.get('created'))} by cdi {_text(result.get('cdi_version'))}. "
        "cdi implements CDI (Dubinski et al., CVPR 2025)."
    )
    warnings = _warnings(result)
    body = "\n".join(
        part
        for part in (
            _verdict(result, len(warnings)),
            _warning_section(warnings),
            _facts(result),
            _checks(result),
            _effect(result),
            '<section id="scores">\n<h2>Membership scores</h2>\n' + _score_figure(table) + "\n</section>",
            _power(result),
            _features(result, table),
            _HOW_TO_READ,
            f"<footer>{footer}</footer>",
        )
        if part
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(result: dict, table: pd.DataFrame, path: str | Path) -> Path:
    """Render the report and write it to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_report(result, table), encoding="utf-8")
    return path
