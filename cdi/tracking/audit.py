"""How an audit is laid out in MLflow: the only module that names an audit run's params, metrics, tags and
artifacts. `cdi.audit` hands it result objects.

One run per audit, in experiment `cdi-audits` unless told otherwise, named `audit-<model folder>-<fingerprint[:8]>`:
- params: model path and fingerprint, set sizes, access level, features, seed, alpha, folds, the feature
  configuration (`feature.*`), reference models and calibration, and the versions of cdi, torch,
  diffusers, lightning (a param whose value is None is not logged);
- metrics, by kind: `stats.*` the test and its checks (`stats.p_value`, `stats.t_statistic`, `stats.auc`,
  `stats.df`, `stats.welch_p_value`, `stats.effect_size`, `stats.null_check_p_value`, `stats.shift_auc`,
  `stats.shift_p_value`, `stats.recommended_n`, `stats.mean_score_suspect`, `stats.mean_score_control`),
  `extraction.*` the work done (`extraction.seconds`, `extraction.cache_hits`, `extraction.cache_misses`,
  `extraction.images_per_second`, `extraction.seconds.<family>`, `extraction.reference.*`), and MLflow's
  own `system/*`;
- inputs: the suspect and control sets as MLflow datasets (`log_image_sets`), the target and reference
  models as MLflow 3 logged models (`log_audited_models`);
- artifacts: `features.csv` (one row per image), `result.json`, `manifest.json`, `summary.md`, `report.html`;
- tags: `cdi.verdict`, `cdi.status` (extracting, scoring, done; failed on a FAILED run, interrupted on a
  KILLED one), `cdi.model_fingerprint`, `cdi.reference_fingerprints`, `cdi.search_run_id`,
  `cdi.null_check_flagged`, `cdi.shift_flagged`, and the Markdown description (`mlflow.note.content`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cdi.text import printable_path
from cdi.tracking import NOTE_TAG, log_metrics, log_params, redact_text, redact_value, set_tags

EXPERIMENT = "cdi-audits"
STATS = "stats."
EXTRACTION = "extraction."


def run_name(model_path: str | Path, fingerprint: str) -> str:
    """`audit-<model folder>-<fingerprint[:8]>`."""
    return f"audit-{Path(model_path).resolve().name}-{fingerprint[:8]}"


def set_status(status: str) -> None:
    """The `cdi.status` tag: extracting, scoring, done (failed and interrupted are set by `audit_run`)."""
    set_tags({"cdi.status": status})


def log_opened(params: Mapping[str, Any], *, fingerprint: str, reference_fingerprints: Sequence[str] = (),
               search_run_id: str | None = None, image_sets: Sequence[tuple[str, Any, Any]] = ()) -> None:
    """What identifies the audit, written before any model pass so a stopped audit can be found and resumed:
    tags, params (`params`, the audit's configuration and versions) and the image sets as datasets."""
    set_tags({
        "cdi.model_fingerprint": fingerprint, "cdi.status": "extracting",
        **({"cdi.reference_fingerprints": ",".join(reference_fingerprints)} if reference_fingerprints else {}),
        **({"cdi.search_run_id": str(search_run_id)} if search_run_id is not None else {}),
    })
    log_params(params)
    log_image_sets(image_sets)


def metrics(result: Any, target: Any, references: Sequence[Any], scores: np.ndarray, labels: np.ndarray
            ) -> dict[str, float]:
    """The run's metrics from the `AuditResult`, the target's and references' `ExtractionReport`s and the
    scorer's scores of every image (`labels`: 1 suspect, 0 control)."""
    extras = result.extras
    stats = {
        "p_value": result.p_value,
        "t_statistic": result.statistic,
        "auc": result.auc,
        **({"df": result.df} if np.isfinite(result.df) else {}),
        "welch_p_value": extras["welch_p_value"],
        "effect_size": extras["effect_size"]["value"],
        **({"null_check_p_value": extras["null_check"]["p_value"]} if not extras["null_check"]["skipped"] else {}),
        **({"shift_auc": extras["shift_check"]["auc"], "shift_p_value": extras["shift_check"]["p_value"]}
           if not extras["shift_check"]["skipped"] else {}),
        **({"recommended_n": extras["recommended_n"]} if extras["recommended_n"] is not None else {}),
        "mean_score_suspect": float(scores[labels == 1].mean()),
        "mean_score_control": float(scores[labels == 0].mean()),
    }
    extraction = {
        "seconds": target.seconds,
        "cache_hits": target.cache_hits,
        "cache_misses": target.cache_misses,
        **({"images_per_second": target.images_per_second} if target.cache_misses else {}),
        **{f"seconds.{family}": sec for family, sec in target.family_seconds.items()},
        **({"reference.cache_hits": sum(e.cache_hits for e in references),
            "reference.cache_misses": sum(e.cache_misses for e in references),
            "reference.seconds": sum(e.seconds for e in references)} if references else {}),
    }
    return {**{STATS + k: v for k, v in stats.items()}, **{EXTRACTION + k: v for k, v in extraction.items()}}


def log_result(result: Any, *, target: Any, references: Sequence[Any], scores: np.ndarray, labels: np.ndarray,
               table: Any, summary_markdown: str, manifest: Mapping[str, Any], report_html: str | None,
               models: Sequence[tuple[str, str, Path, str]]) -> None:
    """Everything an audit logs once it is decided: metrics, verdict tags, evidence artifacts, model links."""
    log_metrics(metrics(result, target, references, scores, labels))
    extras = result.extras
    set_tags({
        "cdi.verdict": result.verdict,
        "cdi.status": "done",
        "cdi.null_check_flagged": str(extras["null_check"]["flagged"]).lower(),
        "cdi.shift_flagged": str(extras["shift_check"]["flagged"]).lower(),
    })
    log_evidence(result.to_dict(), table, summary_markdown, manifest, report_html)
    log_audited_models(models, p_value=result.p_value)


def image_set_digest(sha256s: Any) -> str:
    """The MLflow dataset digest of an image set: the same pictures give the same digest whatever the folder or
    file names (sha256 over the sorted image sha256s, cut to the 32 characters MLflow stores)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(sha256s)).encode()).hexdigest()[:32]


def log_image_sets(sets: Any) -> None:
    """Log each audited image set as an MLflow dataset input of the active run: `sets` holds
    (context, folder, records) with context "suspect" or "control" (`log_image_table`)."""
    for context, folder, records in sets:
        root = Path(folder).resolve()
        log_image_table(context, f"{context}: {printable_path(root.name)}", root, [r.path for r in records],
                        [r.sha256 for r in records], [r.label for r in records], [r.caption for r in records])


def log_image_table(context: str, name: str, source: Path, paths: Sequence[Any], sha256s: Sequence[str],
                    labels: Sequence[Any] | None = None, captions: Sequence[Any] | None = None) -> None:
    """One image set as an MLflow dataset input of the active run: a small table (file relative to `source`,
    sha256, label, caption) whose source is the folder and whose digest comes from the images
    (`image_set_digest`): the UI's Datasets column then says what was used, and every run on one image set
    shares one digest."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    n = len(sha256s)
    table = pd.DataFrame({
        "file": [printable_path(_relative(p, source)) for p in paths],
        "sha256": list(sha256s),
        "label": [None if label is None else str(label) for label in (labels or [None] * n)],
        "caption": list(captions or [None] * n),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways"
        dataset = from_pandas(table, source=str(source), name=name, digest=image_set_digest(sha256s))
    mlflow.log_input(dataset, context=context)


def log_audited_models(models: Any, p_value: float | None = None) -> list[str]:
    """Link the active run to one MLflow 3 logged model per audited model: `models` holds (role, fingerprint,
    path, pipeline class) with role "target" or "reference". Each model is an external logged model named
    `<role>-<fingerprint[:12]>`, found again by later audits of the same model in this experiment (its tags hold
    the full fingerprint), so the UI's Models tab lists every audit of one model: each audit logs its p-value
    against the target model (and a marker metric against each reference). Returns the model ids."""
    import mlflow

    run = mlflow.active_run()
    ids = []
    for role, fingerprint, path, pipeline_class in models:
        name = f"{role}-{fingerprint[:12]}"
        found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"name = '{name}'", output_format="list", max_results=1)
        model = found[0] if found else mlflow.create_external_model(
            name=name, source_run_id=run.info.run_id, model_type="diffusers-pipeline",
            tags={"cdi.model_fingerprint": fingerprint, "cdi.role": role, "cdi.pipeline_class": pipeline_class,
                  "cdi.model_path": redact_text(str(path), mlflow.get_tracking_uri())})
        ids.append(model.model_id)
    # A metric logged against a logged model links the run to it (the model's metrics name their runs);
    # MLflow OSS does not take logged models as run inputs.
    for (role, *_), model_id in zip(models, ids):
        if role == "target" and p_value is not None:
            mlflow.log_metric(STATS + "p_value", float(p_value), model_id=model_id)
        else:
            mlflow.log_metric("audited_as_reference", 1.0, model_id=model_id)
    return ids


def _relative(path: Any, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def log_evidence(
    result: Mapping[str, Any],
    table: "Any",
    summary_markdown: str,
    manifest: Mapping[str, Any],
    report_html: str | None,
) -> None:
    """Log the per-image table, result JSON, manifest, report and the Markdown description.

    Every string in them is stored without the tracking URI's secrets (numbers are left as they are).
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    table = table.copy()
    for column in table.select_dtypes(include="object").columns:
        table[column] = table[column].map(lambda cell: redact_text(cell, uri) if isinstance(cell, str) else cell)
    summary_markdown = redact_text(summary_markdown, uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table.to_csv(folder / "features.csv", index=False)
        strict = json.dumps(redact_value(result, uri), indent=2, sort_keys=True, allow_nan=False)  # valid JSON only
        (folder / "result.json").write_text(strict)
        (folder / "summary.md").write_text(summary_markdown)
        (folder / "manifest.json").write_text(json.dumps(redact_value(manifest, uri), indent=2, sort_keys=True))
        if report_html is not None:
            (folder / "report.html").write_text(redact_text(report_html, uri))
        mlflow.log_artifacts(str(folder))
    mlflow.set_tag(NOTE_TAG, summary_markdown)


