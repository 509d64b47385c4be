"""The audit a user calls: model and two image folders in, p-value, verdict and MLflow run out."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import cdi
from cdi import tracking
from cdi.data import MIN_SET_SIZE, ImageRecord, build_image_sets, decode_image, printable_path
from cdi.errors import OptionError
from cdi.features import FeatureConfig, extract, resolve_features
from cdi.features.extraction import worker_rank
from cdi.models import load_model
from cdi.manifest import build_manifest, image_entries, image_metadata
from cdi.stats import image_statistics
from cdi.stats.assessment import TEST_NAMES, assess, evidence_fields
from cdi.stats.difficulty import DIFFICULTY_MODES, REFERENCE_FORMULAS, REPRESENTATIONS, calibrate, difficulty_covariates

log = logging.getLogger(__name__)



@dataclass
class AuditResult:
    """What an audit concludes, as written to `--output` and to the run's `result.json`."""

    p_value: float
    verdict: str  # "used" or "not_detected"
    alpha: float
    n_suspect: int
    n_control: int
    test: str
    statistic: float
    df: float
    auc: float
    access: str
    features: list[str]
    seed: int
    folds: int
    model_path: str
    model_fingerprint: str
    run_id: str
    tracking_uri: str
    experiment: str
    cdi_version: str = cdi.__version__
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extras"))
        return data


def _versions() -> dict[str, str]:
    import diffusers
    import lightning
    import torch

    return {
        "version.cdi": cdi.__version__,
        "version.torch": torch.__version__,
        "version.diffusers": diffusers.__version__,
        "version.lightning": lightning.__version__,
    }


REPORT_ARTIFACT = "report.html"
MANIFEST_ARTIFACT = "manifest.json"


def _image_statistics(records: Sequence[ImageRecord], adapter: Any, batch_size: int) -> np.ndarray:
    """Model-free statistics of each image as decoded from its file (for the shift guard).

    For latent models the per-channel mean and standard deviation of the VAE latent are appended:
    the encoder is part of the pipeline but not of the suspected training, and it sees shifts
    (texture, compression) that pixel statistics can miss.
    """
    rows = []
    for record in records:
        image = decode_image(record.path, 3)
        rows.append(image_statistics(np.asarray(image, dtype=np.uint8), image.size))
    stats = np.stack(rows)
    if adapter.info.family == "pixel_unet":
        return stats
    import torch

    from cdi.data import load_image

    info, latents = adapter.info, []
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            batch = torch.stack([load_image(r.path, info.image_size, info.image_channels)
                                 for r in records[start : start + batch_size]])
            z0 = adapter.encode(batch).flatten(2).float()
            latents.append(torch.cat([z0.mean(dim=2), z0.std(dim=2)], dim=1).numpy())
    return np.hstack([stats, np.vstack(latents)])


def difficulty_covariates_of(records: Sequence[ImageRecord], size: int, channels: int) -> np.ndarray:
    """Label-free difficulty covariates of each image as the model sees it (`cdi.stats.difficulty`), one row
    per record; the audit, the search and the power benchmark all compute them here."""
    from cdi.data import load_image

    return np.stack([difficulty_covariates(load_image(r.path, size, channels).numpy()) for r in records])


#: Default of `--difficulty-calibration` (benchmarks/power.py measured its gain; see benchmarks/README.md).
DEFAULT_DIFFICULTY = "off"


def _check_calibration_options(representation: str, reference_formula: str, difficulty: str) -> None:
    if representation not in REPRESENTATIONS:
        raise OptionError(f"--representation {representation!r}: choose one of {', '.join(REPRESENTATIONS)}")
    if reference_formula not in REFERENCE_FORMULAS:
        raise OptionError(f"--reference-formula {reference_formula!r}: choose one of {', '.join(REFERENCE_FORMULAS)}")
    if difficulty not in DIFFICULTY_MODES:
        raise OptionError(f"--difficulty-calibration {difficulty!r}: choose one of {', '.join(DIFFICULTY_MODES)}")


def reference_entries(references: Sequence[Any], defaulted: bool = False) -> list[dict[str, Any]]:
    """What the result JSON and the run record about each reference model."""
    return [{"path": str(Path(r.info.path).resolve()), "fingerprint": r.info.fingerprint,
             "pipeline_class": r.info.pipeline_class, "base_of_lora": defaulted} for r in references]


def load_references(adapter: Any, reference_models: Sequence[str | Path], *, model: str | Path, lora: Any,
                    allow_pickle: bool, latent_sample_seed: int | None) -> tuple[list[Any], bool]:
    """The reference adapters, checked comparable with `adapter`; with `--lora` and no reference the base
    pipeline (`--model` without the LoRA) is the reference. Returns (references, defaulted to the base)."""
    from cdi.models.compare import check_comparable

    defaulted = bool(lora) and not reference_models
    paths = [model] if defaulted else list(reference_models)
    references, seen = [], {}
    for path in paths:
        reference = load_model(path, allow_pickle=allow_pickle, latent_sample_seed=latent_sample_seed)
        option = "--model (the base of --lora, used as reference)" if defaulted else "--reference-model"
        check_comparable(adapter, reference, option)
        if reference.info.fingerprint in seen:
            raise OptionError(f"--reference-model {path}: the same model as --reference-model {seen[reference.info.fingerprint]} "
                              "(same fingerprint); give each reference once")
        seen[reference.info.fingerprint] = path
        references.append(reference)
    return references, defaulted


def _report(result: "AuditResult", table: Any) -> str | None:
    try:
        from cdi.report import render_report
    except ImportError:  # the report package is optional at import time
        return None
    return render_report(result.to_dict(), table)


#: Seeds go to scikit-learn's random_state (0 to 2**32 - 1) and into the seeded noise.
MAX_SEED = 2**32 - 1
#: Beyond this many permutations the p-value's resolution (1e-5) is far below any alpha in use, and the
#: test's time (one cross-fit per permutation) runs into hours.
MAX_PERMUTATIONS = 100_000
MAX_POWER_RESAMPLES = 10_000


def _check_options(alpha: float, folds: int, seed: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise OptionError(f"--alpha {alpha}: must lie strictly between 0 and 1 (e.g. 0.01)")
    if folds < 2:
        raise OptionError(f"--folds {folds}: cross-fitting needs at least 2 folds (default 5)")
    if not 0 <= seed <= MAX_SEED:
        raise OptionError(f"--seed {seed}: must be an integer from 0 to {MAX_SEED} (2**32 - 1)")


def check_permutations(n_permutations: int, alpha: float, test: str, option: str = "--permutations") -> list[str]:
    """Refuse a permutation count that cannot reject at `alpha` or that is beyond MAX_PERMUTATIONS; return
    the warnings of a count that can reject but gives the test too coarse a p-value (under 10 / alpha)."""
    if test != "permutation":
        return []
    if not 1 <= n_permutations <= MAX_PERMUTATIONS:
        raise OptionError(f"{option} {n_permutations}: must lie between 1 and {MAX_PERMUTATIONS:,} (each permutation "
                          f"refits the cross-fitted scorer; {MAX_PERMUTATIONS:,} resolve p-values to 1e-5)")
    smallest = 1.0 / (n_permutations + 1)
    needed = max(1, int(np.floor(1.0 / alpha)) - 1)
    while 1.0 / (needed + 1) >= alpha:  # the smallest count whose smallest p-value is below alpha
        needed += 1
    if smallest >= alpha:
        raise OptionError(
            f"{option} {n_permutations} at --alpha {alpha:g}: the smallest p-value this test can give is "
            f"1/({n_permutations}+1) = {smallest:.3g}, so it can never reject; use at least {needed} "
            f"(better {int(np.ceil(10 / alpha))}; default 1000)")
    if n_permutations + 1 < 10 / alpha:
        return [f"only {n_permutations} permutations at alpha {alpha:g}: the p-value cannot go below {smallest:.3g}, "
                f"so even strong evidence only just rejects and power is lost; use at least {int(np.ceil(10 / alpha))}"]
    return []


def _check_folds(folds: int, n_suspect: int, n_control: int) -> None:
    """Each fold must hold at least two images of each set (stratified cross-fitting)."""
    most = min(n_suspect, n_control) // 2
    if folds > most:
        raise OptionError(f"--folds {folds}: the smaller set has {min(n_suspect, n_control)} images, so at most {most} "
                          "folds keep two images of each set per fold; use fewer folds (default 5) or add images")


def _check_cache_dir(cache_dir: str | Path | None, use_cache: bool) -> None:
    """A cache folder that cannot be created or written is the user's option, not a lost tracking store."""
    if not use_cache:
        return
    from cdi.features.cache import default_cache_dir

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    option = "--cache-dir" if cache_dir else "the default cache folder ($CDI_CACHE_DIR or ~/.cache/cdi/features)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OptionError(f"{option} {folder}: cannot be written ({exc.strerror or type(exc).__name__}); "
                          "choose a writable folder with --cache-dir, or pass --no-cache") from None


def verdict_warnings(result_extras: dict[str, Any], *, verdict: str, test: str, n_suspect: int, n_control: int,
                     permutation_warnings: Sequence[str], dropped_duplicates: int = 0) -> list[str]:
    """Every reason the verdict is weaker than it looks, beyond the assessment's own (shift, null check)."""
    out = list(permutation_warnings)
    if test == "welch":
        out.append("the Welch t-test (the paper's protocol) is anti-conservative on cross-fitted scores: its p-value "
                   "can be too small; rerun with --test permutation (the default) for a p-value to defend")
    recommended = result_extras.get("recommended_n")
    if verdict != "used" and recommended and recommended > min(n_suspect, n_control):
        out.append(f"not detected with {min(n_suspect, n_control)} images in the smaller set, but the power curve "
                   f"estimates {recommended} per side for power 0.8: absence of evidence, not evidence of absence")
    if verdict != "used" and not result_extras.get("power_curve"):
        out.append("no power curve was computed (--power-resamples 0): a 'not detected' verdict says nothing about "
                   "whether this many images could have shown use")
    null = result_extras.get("null_check") or {}
    if null.get("skipped"):
        out.append(f"the null check was skipped ({null.get('reason')}): calibration on these data is unchecked")
    if dropped_duplicates:
        out.append(f"{dropped_duplicates} duplicate image(s) were left out (--duplicates keep-one): each picture "
                   "counts once")
    return out


def images_digest(records: Sequence[ImageRecord]) -> str:
    """One sha256 over the role, image hash and conditioning of every audited image (order-free): a resumed
    run must have audited exactly these images."""
    from cdi.hashing import sha256_text

    rows = sorted(f"{r.role}\t{r.sha256}\t{r.label!r}\t{r.caption!r}" for r in records)
    return sha256_text("\n".join(rows))


def _class_id(label: int | str, class_names: dict, where: str) -> int:
    if isinstance(label, int):
        return label
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    wanted = text.lower()
    for class_id, names in class_names.items():
        if wanted in (alias.strip().lower() for alias in str(names).split(",")):
            return int(class_id)
    raise OptionError(f"{where}: class {text!r} is not in the model's id2label; give a class id or one of its names")


def apply_conditioning(records: list, adapter: Any, prompt: str | None, class_label: str | None) -> list:
    """Fill captions/labels missing from metadata.jsonl with --prompt/--class-label; resolve class names."""
    conditioning = adapter.info.conditioning
    class_names = getattr(adapter, "class_names", {}) or {}
    out = []
    for record in records:
        label = record.label if record.label is not None else class_label
        caption = record.caption if record.caption is not None else prompt
        if label is not None:
            where = f"{record.path}" if record.label is not None else "--class-label"
            label = _class_id(label, class_names, where)
            n_classes = getattr(adapter, "num_classes", None) if conditioning == "class" else None
            if n_classes and not 0 <= label < int(n_classes):
                raise OptionError(f"{where}: class label {label} is outside the model's classes 0..{int(n_classes) - 1}; "
                                  + ("fix its label in metadata.jsonl" if record.label is not None else "give a valid class"))
        out.append(replace(record, label=label, caption=caption))
    missing = {
        "text": sum(r.caption is None for r in out),
        "class": sum(r.label is None for r in out),
    }.get(conditioning, 0)
    if missing:
        log.warning(
            "%d of %d images have no %s: the model is queried unconditionally for them (%s), a weaker signal; "
            "give metadata.jsonl beside the images or --%s",
            missing, len(out), "caption" if conditioning == "text" else "class label",
            "empty prompt" if conditioning == "text" else "null class",
            "prompt" if conditioning == "text" else "class-label",
        )
    return out


def summary_markdown(result: AuditResult) -> str:
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


def audit(
    model: str | Path,
    suspect: str | Path,
    control: str | Path,
    *,
    alpha: float = 0.01,
    access: str = "white",
    features: Sequence[str] | None = None,
    seed: int = 0,
    folds: int = 5,
    batch_size: int = 16,
    device: str = "auto",
    allow_pickle: bool = False,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    feature_config: FeatureConfig | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    prompt: str | None = None,
    class_label: str | int | None = None,
    latent_sample_seed: int | None = None,
    test: str = "permutation",
    n_permutations: int = 1000,
    power_resamples: int = 100,
    search_config: Any = None,
    C: float = 1.0,
    penalty: str = "l2",
    resume_run_id: str | None = None,
    reference_models: Sequence[str | Path] = (),
    lora: str | Path | None = None,
    representation: str = "calibrated",
    reference_formula: str = "difference",
    difficulty_calibration: str | None = None,
    duplicates: str = "refuse",
) -> AuditResult | None:
    """Audit `model` for use of the `suspect` images against the `control` images.

    Returns None in a non-zero rank of a multi-process launch (rank 0 returns the result).
    `search_config` (a `cdi.search.SearchConfig`): the search this audit's settings come from; its run id
    is recorded, its C, penalty and feature settings are applied, and its calibration images are left
    out (held out of this P and U) or refused (a reference model's), see `cdi.search.config`.

    `reference_models`: models not trained on P or U (e.g. the base of a fine-tune), queried with the same
    seeded noise; `representation` says what the scorer gets (raw, calibrated or both, formula
    `reference_formula`), see `cdi.stats.difficulty`. `lora`: a LoRA file applied to `model` (the audited
    model is base + LoRA; the base is the reference when none is given). `difficulty_calibration`
    ("image" or "off"; default DEFAULT_DIFFICULTY): regress the features on label-free image covariates.
    `duplicates`: "refuse" (default) any picture found more than once (exact or near copies, `cdi.data.duplicates`),
    or "keep-one": keep the first copy of each picture within a set (a picture in both sets is always refused).
    """
    import pandas as pd

    _check_options(alpha, folds, seed)
    if test not in TEST_NAMES:
        raise OptionError(f"--test {test!r}: choose permutation (exact, default) or welch (the paper's protocol)")
    if not 0 <= power_resamples <= MAX_POWER_RESAMPLES:
        raise OptionError(f"--power-resamples {power_resamples}: must lie between 0 and {MAX_POWER_RESAMPLES:,} "
                          "(default 100; 0 skips the power curve)")
    permutation_warnings = check_permutations(n_permutations, alpha, test)
    _check_cache_dir(cache_dir, use_cache)
    names = resolve_features(features, access)
    feature_config = feature_config or FeatureConfig()
    if search_config is not None:
        chosen = getattr(search_config, "feature_calibration", None) or {}  # what the search chose, if it did
        representation = chosen.get("representation", representation)
        reference_formula = chosen.get("reference_formula", reference_formula)
        difficulty_calibration = chosen.get("difficulty_calibration", difficulty_calibration)
    difficulty_calibration = difficulty_calibration or DEFAULT_DIFFICULTY
    _check_calibration_options(representation, reference_formula, difficulty_calibration)
    adapter = load_model(model, allow_pickle=allow_pickle, latent_sample_seed=latent_sample_seed, lora=lora)
    info = adapter.info
    references, reference_defaulted = load_references(
        adapter, reference_models, model=model, lora=lora, allow_pickle=allow_pickle,
        latent_sample_seed=latent_sample_seed)
    if search_config is not None:
        from cdi.search import check_references

        check_references(search_config, len(references))
    if reference_defaulted:
        log.warning("--lora without --reference-model: the base model %s (without the LoRA) is the reference", model)
    dropped: list[ImageRecord] = []
    suspect_records, control_records = build_image_sets(suspect, control, info.image_size, info.image_channels,
                                                        duplicates=duplicates, dropped=dropped)
    suspect_records = apply_conditioning(suspect_records, adapter, prompt, class_label)
    control_records = apply_conditioning(control_records, adapter, prompt, class_label)
    excluded: list = []
    if search_config is not None:
        from cdi.search import exclude_calibration_images

        suspect_records, control_records, excluded = exclude_calibration_images(
            suspect_records, control_records, search_config, MIN_SET_SIZE)
        C, penalty = float(search_config.C), str(search_config.penalty)
        if search_config.feature_settings:  # e.g. the NO budget the search chose
            feature_config = replace(feature_config, **search_config.feature_settings)
    records = [*suspect_records, *control_records]
    _check_folds(folds, len(suspect_records), len(control_records))

    def run_extraction(show_progress: bool, cached: bool, model_adapter: Any = adapter):
        return extract(
            model_adapter, records, names, config=feature_config, seed=seed, batch_size=batch_size, device=device,
            progress=show_progress, cache_dir=cache_dir, use_cache=cached, devices=devices, num_nodes=num_nodes,
            strategy=strategy, precision=precision, threads=threads,
        )

    if worker_rank() > 0:
        # A launcher (Lightning's ddp, torchrun, SLURM) started this process as one more rank: it only
        # computes its share of the features into the shared cache; rank 0 scores and logs the audit.
        for model_adapter in (adapter, *references):
            run_extraction(show_progress=False, cached=True, model_adapter=model_adapter)
        return None
    uri = tracking.resolve_tracking_uri(tracking_uri)
    labels = np.array([1] * len(suspect_records) + [0] * len(control_records))
    recorded_references = reference_entries(references, reference_defaulted)
    lora_record = {"path": info.lora, "sha256": info.files.get(f"lora/{Path(lora).name}")} if lora else None

    configuration = {
        "model_path": str(Path(model).resolve()),
        "model_fingerprint": info.fingerprint,
        "pipeline_class": info.pipeline_class,
        "conditioning": info.conditioning,
        "prompt": prompt,
        "class_label": class_label,
        "latent_sample_seed": latent_sample_seed,
        "n_suspect": len(suspect_records),
        "n_control": len(control_records),
        "images_sha256": images_digest(records),
        "access": access,
        "features": list(names),
        "seed": seed,
        "alpha": alpha,
        "folds": folds,
        "C": C,
        "penalty": penalty,
        "test": TEST_NAMES[test],
        "n_permutations": n_permutations if test == "permutation" else None,
        "power_resamples": power_resamples,
        "batch_size": batch_size,
        "devices": devices,
        "num_nodes": num_nodes,
        "precision": precision,
        "threads": threads or None,
        **{f"feature.{key}": value for key, value in feature_config.to_dict().items()},
        "suspect_path": str(Path(suspect).resolve()),
        "control_path": str(Path(control).resolve()),
        "duplicates": duplicates,
        "duplicates_dropped": len(dropped),
        **({"cdi.search_run_id": search_config.search_run_id, "search.C": search_config.C,
            "search.penalty": search_config.penalty, "search.excluded_images": len(excluded)}
           if search_config is not None else {}),
        **({"lora_path": lora_record["path"], "lora_sha256": lora_record["sha256"]} if lora_record else {}),
        "reference_models": [entry["path"] for entry in recorded_references],
        "reference_fingerprints": [entry["fingerprint"] for entry in recorded_references],
        "calibration.representation": representation if references else "raw",
        "calibration.reference_formula": reference_formula if references else None,
        "calibration.difficulty": difficulty_calibration,
    }
    # audit_run connects first (an unreachable store fails before any model pass), checks that a resumed
    # run audited this model, these images and settings, and that the artifact store takes a file.
    with tracking.audit_run(uri, experiment, run_name=f"audit-{Path(model).name}",
                            resume_run_id=resume_run_id, expected_params=configuration) as run_id:
        tracking.set_tags({"cdi.model_fingerprint": info.fingerprint, "cdi.status": "extracting",
                           **({"cdi.reference_fingerprints": ",".join(e["fingerprint"] for e in recorded_references)}
                              if references else {}),
                           **({"cdi.search_run_id": str(search_config.search_run_id)} if search_config is not None else {})})
        tracking.log_params({**configuration, **_versions()})
        extraction = run_extraction(show_progress=progress, cached=use_cache)
        # Same records, names, config and seed: every noise draw equals the target's (common random numbers).
        reference_extractions = [run_extraction(show_progress=progress, cached=use_cache, model_adapter=r)
                                 for r in references]
        X = extraction.values
        tracking.set_tags({"cdi.status": "scoring"})
        calibrated = calibrate(
            X, [e.values for e in reference_extractions], names,
            difficulty_covariates_of(records, info.image_size, info.image_channels)
            if difficulty_calibration != "off" else None,
            representation=representation, formula=reference_formula, difficulty=difficulty_calibration,
        )
        scored_names = calibrated.names
        found = assess(
            calibrated.values, labels, _image_statistics(records, adapter, batch_size), scored_names, alpha=alpha,
            folds=folds, seed=seed, test=test, n_permutations=n_permutations, power_resamples=power_resamples, C=C,
            penalty=penalty,
        )
        fitted = found.test
        result = AuditResult(
            p_value=float(fitted.p_value_),
            verdict=str(fitted.verdict_),
            alpha=alpha,
            n_suspect=len(suspect_records),
            n_control=len(control_records),
            test=found.test_name,
            statistic=float(fitted.statistic_),
            df=float(fitted.df_),
            auc=float(fitted.auc_),
            access=access,
            features=list(names),
            seed=seed,
            folds=folds,
            model_path=str(Path(model).resolve()),
            model_fingerprint=info.fingerprint,
            run_id=run_id,
            tracking_uri=tracking.redact_uri(uri),
            experiment=tracking.experiment_name(run_id),  # `mlflow run` chooses its own experiment
            extras={
                **(evidence := evidence_fields(found, scored_names)),
                "warnings": [*evidence["warnings"], *verdict_warnings(
                    evidence, verdict=str(fitted.verdict_), test=test, n_suspect=len(suspect_records),
                    n_control=len(control_records), permutation_warnings=permutation_warnings,
                    dropped_duplicates=len(dropped))],
                **({"duplicates_dropped": [{"set": r.role, "path": printable_path(r.path), "sha256": r.sha256}
                                           for r in dropped]} if dropped else {}),
                "reference_models": recorded_references,
                "calibration": calibrated.describe(),
                **({"lora": lora_record} if lora_record else {}),
                "report_artifact": REPORT_ARTIFACT,
                "manifest_artifact": MANIFEST_ARTIFACT,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **({"excluded_calibration_images": {
                    "suspect": sum(r.role == "suspect" for r in excluded),
                    "control": sum(r.role == "control" for r in excluded),
                    "search_run_id": search_config.search_run_id}} if excluded else {}),
            },
        )
        table = pd.DataFrame(
            {
                "file_name": [printable_path(r.name) for r in records],
                "path": [printable_path(r.path) for r in records],
                "sha256": [r.sha256 for r in records],
                "set": [r.role for r in records],
            }
        )
        columns = [pd.DataFrame(X, columns=list(names))]
        for k, reference_extraction in enumerate(reference_extractions, start=1):
            columns.append(pd.DataFrame(reference_extraction.values, columns=[f"ref{k}:{n}" for n in names]))
        if scored_names != list(names):
            columns.append(pd.DataFrame(calibrated.values, columns=scored_names))
        table = pd.concat([table, *columns], axis=1)
        table["oof_score"] = fitted.scores_
        extras = result.extras
        tracking.log_metrics(
            {
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
                "mean_score_suspect": float(fitted.scores_[labels == 1].mean()),
                "mean_score_control": float(fitted.scores_[labels == 0].mean()),
                "extraction_seconds": extraction.seconds,
                "cache_hits": extraction.cache_hits,
                "cache_misses": extraction.cache_misses,
                **({"images_per_second": extraction.images_per_second} if extraction.cache_misses else {}),
                **{f"seconds.{family}": sec for family, sec in extraction.family_seconds.items()},
                **({"reference_cache_hits": sum(e.cache_hits for e in reference_extractions),
                    "reference_cache_misses": sum(e.cache_misses for e in reference_extractions),
                    "reference_extraction_seconds": sum(e.seconds for e in reference_extractions)}
                   if references else {}),
            }
        )
        manifest = build_manifest(
            Path(model).resolve(), info.fingerprint, info.files, image_entries(suspect_records, suspect),
            image_entries(control_records, control), configuration, _versions(),
            excluded_images=[*image_entries([r for r in excluded if r.role == "suspect"], suspect),
                             *image_entries([r for r in excluded if r.role == "control"], control),
                             *({**entry, "reason": "duplicate"} for entry in
                               [*image_entries([r for r in dropped if r.role == "suspect"], suspect),
                                *image_entries([r for r in dropped if r.role == "control"], control)])],
            reference_models=[{**entry, "files": dict(sorted(r.info.files.items()))}
                              for entry, r in zip(recorded_references, references)],
            metadata=image_metadata(suspect, control),
        )
        tracking.set_tags({
            "cdi.verdict": result.verdict,
            "cdi.status": "done",
            "cdi.null_check_flagged": str(extras["null_check"]["flagged"]).lower(),
            "cdi.shift_flagged": str(extras["shift_check"]["flagged"]).lower(),
        })
        tracking.log_evidence(result.to_dict(), table, summary_markdown(result), manifest, _report(result, table))
    log.info("audit %s: verdict %s, p = %.3g", run_id, result.verdict, result.p_value)
    return result
