"""The audit's Markdown summary (the MLflow run's description and `summary.md`)."""

from __future__ import annotations

from typing import Any


def summary_markdown(result: Any) -> str:
    """The Markdown description of an audit's MLflow run (`summary.md`, the run's note): verdict, warnings,
    what was audited and the checks. `result`: a `cdi.audit.AuditResult`."""
    if result.verdict == "used":
        headline = (
            f"**Verdict: used.** The suspect images score as more member-like than the control images "
            f"(one-sided p = {result.p_value:.3g} < alpha = {result.alpha})."
        )
    else:
        headline = (
            f"**Verdict: not detected.** No significant evidence that the suspect images were used "
            f"(one-sided p = {result.p_value:.3g} >= alpha = {result.alpha}). This is not proof of non-use."
        )
    extras = result.extras
    warnings = [f"> **Warning.** {w}" for w in extras.get("warnings", [])]
    null = extras.get("null_check") or {}
    shift = extras.get("shift_check") or {}
    checks = []
    if null:
        checks.append("| null check (two halves of U) | " + (
            f"skipped: {null.get('reason')}" if null.get("skipped") else
            f"p = {null['p_value']:.3g}" + (" **flagged**" if null.get("flagged") else " (ok)")) + " |")
    if shift:
        checks.append("| shift guard (image statistics) | " + (
            f"skipped: {shift.get('reason')}" if shift.get("skipped") else
            f"AUC {shift['auc']:.2f}, p = {shift['p_value']:.3g}" + (" **flagged**" if shift.get("flagged") else " (ok)"))
            + " |")
    if extras.get("welch_p_value") is not None:
        checks.append(f"| Welch p (paper's protocol) | {extras['welch_p_value']:.3g} |")
    if extras.get("recommended_n"):
        checks.append(f"| recommended set size (power 0.8) | {extras['recommended_n']} per side |")
    return "\n".join(
        [
            "# CDI audit",
            "",
            headline,
            "",
            *[line for w in warnings for line in (w, "")],
            "| | |",
            "|---|---|",
            f"| model | `{result.model_path}` |",
            f"| model fingerprint | `{result.model_fingerprint}` |",
            *([f"| LoRA | `{lora['path']}` |"] if (lora := extras.get("lora")) else []),
            *[f"| reference model {k} | `{ref['path']}` (`{ref['fingerprint'][:12]}`) |"
              for k, ref in enumerate(extras.get("reference_models") or [], start=1)],
            *([f"| calibration | {cal['representation']}"
               + (f" ({cal['reference_formula']})" if cal.get("reference_formula") else "")
               + f", difficulty {cal['difficulty_calibration']} |"] if (cal := extras.get("calibration")) else []),
            f"| suspect / control images | {result.n_suspect} / {result.n_control} |",
            f"| test | {result.test}, Welch t = {result.statistic:.3f} |",
            f"| AUC of out-of-fold scores | {result.auc:.3f} |",
            f"| access / features | {result.access} / {len(result.features)} |",
            f"| seed / folds | {result.seed} / {result.folds} |",
            *checks,
            *([f"| left out (search calibration data) | {held['suspect']} / {held['control']} "
               f"(search run {held['search_run_id']}) |"] if (held := extras.get("excluded_calibration_images")) else []),
            "",
            "The p-value is valid only if the control images are i.i.d. with the suspect images "
            "(same source, camera, period and processing). A distribution shift between the two sets "
            "can produce a 'used' verdict without training.",
        ]
    )
