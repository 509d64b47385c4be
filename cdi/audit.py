"""The audit a user calls: model and two image folders in, p-value, verdict and MLflow run out."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import cdi
from cdi import tracking
from cdi.data import (
    MIN_SET_SIZE,
    ImageRecord,
    build_image_sets,
    decode_image,
    printable_path,
)
from cdi.errors import OptionError
from cdi.features import FeatureConfig, extract, extract_models, resolve_features
from cdi.features.extraction import ExtractionOptions, worker_rank
from cdi.features.latent_statistics import latent_statistic_names
from cdi.manifest import build_manifest, image_entries, image_metadata
from cdi.models import load_model
from cdi.models.latent import LatentAdapter
from cdi.options import MAX_SEED
from cdi.stats import image_statistics
from cdi.stats.assessment import assess, evidence_fields
from cdi.stats.difficulty import (
    DIFFICULTY_CHOICES,
    PIXEL_MODES,
    REFERENCE_FORMULAS,
    REPRESENTATIONS,
    WienerNoise,
    calibrate,
    difficulty_covariates,
)
from cdi.stats.hypothesis import TESTS
from cdi.stats.progress import StderrProgress, reporting
from cdi.tracking import audit as audit_layout

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
        """The result as plain JSON values: a number that is not finite (the permutation test's `df`) is null,
        so result.json is valid JSON for every reader, not only Python's."""
        data = asdict(self)
        data.update(data.pop("extras"))
        return _finite_or_null(data)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


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


def _image_statistics(records: Sequence[ImageRecord], latents: Any | None) -> np.ndarray:
    """Model-free statistics of each image as decoded from its file (for the shift guard); for latent models
    the per-channel mean and standard deviation of the VAE latent are appended (`latents`: their
    ExtractionReport from `extract_step`, see `cdi.features.latent_statistics`)."""
    rows = []
    for record in records:
        image = decode_image(record.path, 3)
        rows.append(image_statistics(np.asarray(image, dtype=np.uint8), image.size))
    stats = np.stack(rows)
    return stats if latents is None else np.hstack([stats, latents.values.astype(np.float32)])


def difficulty_covariates_of(records: Sequence[ImageRecord], size: int, channels: int,
                             pixels: bool = False) -> np.ndarray:
    """Label-free difficulty covariates of each image as the model sees it (`cdi.stats.difficulty`), one row
    per record, with the image's pixels appended when `pixels` (mode "image+pca"); the audit and the search
    compute them here."""
    from cdi.data import load_image

    return np.stack([difficulty_covariates(load_image(r.path, size, channels).numpy(), pixels=pixels)
                     for r in records])


def wiener_noise_of(records: Sequence[ImageRecord], adapter: Any, config: FeatureConfig, seed: int) -> WienerNoise:
    """DL's seeded noise draws of each record, as the DL family draws them on `adapter` (same seed, timestep
    and draws), and alpha_bar at that timestep: what mode "image+pca+wiener" needs (`cdi.stats.difficulty`)."""
    import torch

    from cdi.features.seeded_noise import image_noise

    info = adapter.info
    like = torch.zeros((len(records), info.image_channels, info.image_size, info.image_size))
    sha256 = [r.sha256 for r in records]
    draws = [image_noise(like, sha256, seed, "DL", config.dl_t, draw).flatten(1).numpy()
             for draw in range(config.dl_draws)]
    return WienerNoise(np.stack(draws, axis=1), float(adapter.alpha_bar(adapter.timestep(config.dl_t))))


#: Default of `--difficulty-calibration`: "auto" resolves per model (`resolve_difficulty`; benchmarks/power.py
#: measured the gain of each mode, see benchmarks/README.md "Statistical power").
DEFAULT_DIFFICULTY = "auto"
#: Mode "auto" picks image+pca+wiener only while its covariates (pixels and DL's noise draws of every image,
#: float64) fit in this many bytes; beyond, the five image statistics ("image").
AUTO_DIFFICULTY_BYTES = 2 * 1024**3


def resolve_difficulty(requested: str, adapter: Any, n_images: int, config: FeatureConfig) -> str:
    """The difficulty mode an audit uses. "auto": image+pca+wiener on a pixel model (the mode measured best
    without a reference), "image" when its covariates would exceed AUTO_DIFFICULTY_BYTES, and "off" on a
    latent model (the Wiener covariate needs the model's own input space; nothing measured there yet)."""
    if requested != "auto":
        return requested
    if isinstance(adapter, LatentAdapter):
        return "off"
    info = adapter.info
    values = n_images * info.image_channels * info.image_size**2 * (config.dl_draws + 1)
    return "image+pca+wiener" if 8 * values <= AUTO_DIFFICULTY_BYTES else "image"


def _check_calibration_options(representation: str, reference_formula: str, difficulty: str) -> None:
    if representation not in REPRESENTATIONS:
        raise OptionError(f"--representation {representation!r}: choose one of {', '.join(REPRESENTATIONS)}")
    if reference_formula not in REFERENCE_FORMULAS:
        raise OptionError(f"--reference-formula {reference_formula!r}: choose one of {', '.join(REFERENCE_FORMULAS)}")
    if difficulty not in DIFFICULTY_CHOICES:
        raise OptionError(f"--difficulty-calibration {difficulty!r}: choose one of {', '.join(DIFFICULTY_CHOICES)}")


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


def _report(result: "AuditResult", table: Any) -> str:
    from cdi.report import (
        render_report,  # part of cdi: result.json names report.html, so it must exist
    )

    return render_report(result.to_dict(), table)


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


@dataclass(frozen=True)
class TestSettings:
    """What the test is: features, seed, cross-fitting, scorer, hypothesis test, and the scorer's input."""

    names: tuple[str, ...]
    access: str
    feature_config: FeatureConfig
    seed: int
    alpha: float
    folds: int
    C: float
    penalty: str
    test: str
    n_permutations: int
    power_resamples: int
    representation: str
    reference_formula: str
    difficulty_calibration: str


@dataclass
class AuditPlan:
    """Everything the audit will do, checked and loaded before any model pass or tracking call."""

    model: Path
    suspect: Path
    control: Path
    adapter: Any
    references: list[Any]
    reference_defaulted: bool
    suspect_records: list[ImageRecord]
    control_records: list[ImageRecord]
    excluded: list[ImageRecord]
    dropped: list[ImageRecord]
    settings: TestSettings
    extraction: ExtractionOptions
    lora_record: dict[str, Any] | None
    search_config: Any
    prompt: str | None
    class_label: str | int | None
    latent_sample_seed: int | None
    duplicates: str
    warnings: list[str]

    @property
    def records(self) -> list[ImageRecord]:
        return [*self.suspect_records, *self.control_records]

    @property
    def labels(self) -> np.ndarray:
        return np.array([1] * len(self.suspect_records) + [0] * len(self.control_records))

    @property
    def recorded_references(self) -> list[dict[str, Any]]:
        return reference_entries(self.references, self.reference_defaulted)

    def configuration(self) -> dict[str, Any]:
        """The run's params (and the manifest's configuration); a resumed run must match them."""
        info, s, x, search = self.adapter.info, self.settings, self.extraction, self.search_config
        references = self.recorded_references
        return {
            "model_path": str(self.model.resolve()),
            "model_fingerprint": info.fingerprint,
            "pipeline_class": info.pipeline_class,
            "conditioning": info.conditioning,
            "prompt": self.prompt,
            "class_label": self.class_label,
            "latent_sample_seed": self.latent_sample_seed,
            "n_suspect": len(self.suspect_records),
            "n_control": len(self.control_records),
            "images_sha256": images_digest(self.records),
            "access": s.access,
            "features": list(s.names),
            "seed": s.seed,
            "alpha": s.alpha,
            "folds": s.folds,
            "C": s.C,
            "penalty": s.penalty,
            "test": s.test,
            "n_permutations": s.n_permutations if s.test == "permutation" else None,
            "power_resamples": s.power_resamples,
            "batch_size": x.batch_size,
            "devices": x.devices,
            "num_nodes": x.num_nodes,
            "precision": x.precision,
            "timestep_batching": x.timestep_batching,
            "compile": x.compile,
            "threads": x.threads or None,
            **{f"feature.{key}": value for key, value in s.feature_config.to_dict().items()},
            "suspect_path": str(self.suspect.resolve()),
            "control_path": str(self.control.resolve()),
            "duplicates": self.duplicates,
            "duplicates_dropped": len(self.dropped),
            **({"cdi.search_run_id": search.search_run_id, "search.C": search.C,
                "search.penalty": search.penalty, "search.excluded_images": len(self.excluded)}
               if search is not None else {}),
            **({"lora_path": self.lora_record["path"], "lora_sha256": self.lora_record["sha256"]}
               if self.lora_record else {}),
            "reference_models": [entry["path"] for entry in references],
            "reference_fingerprints": [entry["fingerprint"] for entry in references],
            "calibration.representation": s.representation if self.references else "raw",
            "calibration.reference_formula": s.reference_formula if self.references else None,
            "calibration.difficulty": s.difficulty_calibration,
        }


def plan_audit(
    model: str | Path, suspect: str | Path, control: str | Path, settings: dict[str, Any],
    extraction: ExtractionOptions, *, search_config: Any = None, allow_pickle: bool = False,
    prompt: str | None = None, class_label: str | int | None = None, latent_sample_seed: int | None = None,
    reference_models: Sequence[str | Path] = (), lora: str | Path | None = None, duplicates: str = "refuse",
) -> AuditPlan:
    """Check every option, apply the whole search config once, load the model(s) and the image sets.

    `settings`: the TestSettings fields as the caller gave them (a search config overrides its own keys).
    """
    settings = dict(settings)
    if search_config is not None:  # the one place a search's choices are applied
        settings.update(names=search_config.features, access=search_config.access, folds=search_config.folds,
                        seed=search_config.seed, C=float(search_config.C), penalty=str(search_config.penalty))
        if search_config.feature_settings:  # e.g. the NO budget the search chose
            settings["feature_config"] = replace(settings["feature_config"], **search_config.feature_settings)
        chosen = getattr(search_config, "feature_calibration", None) or {}
        for key in ("representation", "reference_formula", "difficulty_calibration"):
            settings[key] = chosen.get(key, settings[key])
    settings["difficulty_calibration"] = settings["difficulty_calibration"] or DEFAULT_DIFFICULTY
    _check_options(settings["alpha"], settings["folds"], settings["seed"])
    if settings["test"] not in TESTS:
        raise OptionError(f"--test {settings['test']!r}: choose permutation (exact, default) or welch "
                          "(the paper's protocol)")
    if not 0 <= settings["power_resamples"] <= MAX_POWER_RESAMPLES:
        raise OptionError(f"--power-resamples {settings['power_resamples']}: must lie between 0 and "
                          f"{MAX_POWER_RESAMPLES:,} (default 100; 0 skips the power curve)")
    warnings = check_permutations(settings["n_permutations"], settings["alpha"], settings["test"])
    _check_cache_dir(extraction.cache_dir, extraction.use_cache)
    settings["names"] = resolve_features(settings["names"], settings["access"])
    _check_calibration_options(settings["representation"], settings["reference_formula"],
                               settings["difficulty_calibration"])
    adapter = load_model(model, allow_pickle=allow_pickle, latent_sample_seed=latent_sample_seed, lora=lora)
    info = adapter.info
    if settings["difficulty_calibration"] == "image+pca+wiener" and isinstance(adapter, LatentAdapter):
        raise OptionError(f"--difficulty-calibration image+pca+wiener: {model} is a latent model ({info.family}); "
                          "the Wiener covariate works on pixel models only: choose image+pca")
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
    _check_folds(settings["folds"], len(suspect_records), len(control_records))
    settings["difficulty_calibration"] = resolve_difficulty(
        settings["difficulty_calibration"], adapter, len(suspect_records) + len(control_records),
        settings["feature_config"])
    lora_record = {"path": info.lora, "sha256": info.files.get(f"lora/{Path(lora).name}")} if lora else None
    return AuditPlan(
        model=Path(model), suspect=Path(suspect), control=Path(control), adapter=adapter, references=references,
        reference_defaulted=reference_defaulted, suspect_records=suspect_records, control_records=control_records,
        excluded=excluded, dropped=dropped, settings=TestSettings(**settings), extraction=extraction,
        lora_record=lora_record, search_config=search_config, prompt=prompt, class_label=class_label,
        latent_sample_seed=latent_sample_seed, duplicates=duplicates, warnings=warnings)


@dataclass
class Extracted:
    """The features of the plan's images on the target and on each reference model (same seeded noise)."""

    target: Any  # cdi.features.extraction.ExtractionReport
    references: list[Any]
    #: Latent models: the per-channel statistics of each image's latent, for the shift guard (else None).
    latent_statistics: Any = None


def extract_step(plan: AuditPlan) -> Extracted:
    """Every feature on the target and on each reference with the same records, names, config and seed, so every
    noise draw equals the target's (common random numbers): one engine pass for all of them where they lack the
    same images (`extract_models`)."""
    s, x = plan.settings, plan.extraction
    show = x.progress and worker_rank() == 0
    target, *references = extract_models([plan.adapter, *plan.references], plan.records, s.names, s.feature_config,
                                         s.seed, x, progress=show)
    latents = None
    if plan.adapter.info.family != "pixel_unet":  # the encoder's view of each image, for the shift guard
        latents = extract(plan.adapter, plan.records, latent_statistic_names(plan.adapter.latent_channels),
                          s.feature_config, s.seed, x, progress=False, precision="32", timestep_batching="off",
                          compile="off")
    return Extracted(target, references, latents)


@dataclass
class Assessed:
    calibrated: Any  # cdi.stats.difficulty.Calibrated: what the scorer saw
    found: Any  # cdi.stats.assessment.Assessment


def assess_step(plan: AuditPlan, extracted: Extracted) -> Assessed:
    """Calibrate the features (reference models, difficulty), then cross-fit, test and check."""
    s, info, records = plan.settings, plan.adapter.info, plan.records
    calibrated = calibrate(
        extracted.target.values, [e.values for e in extracted.references], s.names,
        difficulty_covariates_of(records, info.image_size, info.image_channels,
                                 pixels=s.difficulty_calibration in PIXEL_MODES)
        if s.difficulty_calibration != "off" else None,
        representation=s.representation, formula=s.reference_formula, difficulty=s.difficulty_calibration,
        wiener=wiener_noise_of(records, plan.adapter, s.feature_config, s.seed)
        if s.difficulty_calibration == "image+pca+wiener" else None,
    )
    image_stats = _image_statistics(records, extracted.latent_statistics)
    # progress on stderr, decided as extraction's bar is (stdout may carry the result JSON)
    progress = StderrProgress() if plan.extraction.progress and worker_rank() == 0 else None
    try:
        with reporting(progress):
            found = assess(
                calibrated.values, plan.labels, image_stats,
                alpha=s.alpha, folds=s.folds, seed=s.seed, test=s.test, n_permutations=s.n_permutations,
                power_resamples=s.power_resamples, C=s.C, penalty=s.penalty,
            )
    finally:
        if progress is not None:
            progress.close()
    return Assessed(calibrated, found)


def result_of(plan: AuditPlan, assessed: Assessed, run_id: str, uri: str) -> AuditResult:
    """The AuditResult of an assessed plan."""
    s, fitted, search = plan.settings, assessed.found.test, plan.search_config
    evidence = evidence_fields(assessed.found, assessed.calibrated.names)
    excluded = plan.excluded
    return AuditResult(
        p_value=float(fitted.p_value_),
        verdict=str(fitted.verdict_),
        alpha=s.alpha,
        n_suspect=len(plan.suspect_records),
        n_control=len(plan.control_records),
        test=assessed.found.test_name,
        statistic=float(fitted.statistic_),
        df=float(fitted.df_),
        auc=float(fitted.auc_),
        access=s.access,
        features=list(s.names),
        seed=s.seed,
        folds=s.folds,
        model_path=str(plan.model.resolve()),
        model_fingerprint=plan.adapter.info.fingerprint,
        run_id=run_id,
        tracking_uri=tracking.redact_uri(uri),
        experiment=tracking.experiment_name(run_id),  # `mlflow run` chooses its own experiment
        extras={
            **evidence,
            "warnings": [*evidence["warnings"], *verdict_warnings(
                evidence, verdict=str(fitted.verdict_), test=s.test, n_suspect=len(plan.suspect_records),
                n_control=len(plan.control_records), permutation_warnings=plan.warnings,
                dropped_duplicates=len(plan.dropped))],
            **({"duplicates_dropped": [{"set": r.role, "path": printable_path(r.path), "sha256": r.sha256}
                                       for r in plan.dropped]} if plan.dropped else {}),
            "reference_models": plan.recorded_references,
            "calibration": assessed.calibrated.describe(),
            **({"lora": plan.lora_record} if plan.lora_record else {}),
            "report_artifact": REPORT_ARTIFACT,
            "manifest_artifact": MANIFEST_ARTIFACT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **({"excluded_calibration_images": {
                "suspect": sum(r.role == "suspect" for r in excluded),
                "control": sum(r.role == "control" for r in excluded),
                "search_run_id": search.search_run_id}} if excluded else {}),
        },
    )


def features_table(plan: AuditPlan, extracted: Extracted, assessed: Assessed) -> Any:
    """features.csv: one row per image with its raw, reference and scored features and out-of-fold score."""
    import pandas as pd

    records, names = plan.records, list(plan.settings.names)
    table = pd.DataFrame({
        "file_name": [printable_path(r.name) for r in records],
        "path": [printable_path(r.path) for r in records],
        "sha256": [r.sha256 for r in records],
        "set": [r.role for r in records],
    })
    columns = [pd.DataFrame(extracted.target.values, columns=names)]
    for k, reference in enumerate(extracted.references, start=1):
        columns.append(pd.DataFrame(reference.values, columns=[f"ref{k}:{n}" for n in names]))
    if assessed.calibrated.names != names:
        columns.append(pd.DataFrame(assessed.calibrated.values, columns=assessed.calibrated.names))
    table = pd.concat([table, *columns], axis=1)
    table["oof_score"] = assessed.found.test.scores_
    return table


def audit_manifest(plan: AuditPlan, configuration: dict[str, Any]) -> dict[str, Any]:
    info, suspect, control = plan.adapter.info, plan.suspect, plan.control

    def entries(records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
        return [*image_entries([r for r in records if r.role == "suspect"], suspect),
                *image_entries([r for r in records if r.role == "control"], control)]

    return build_manifest(
        plan.model.resolve(), info.fingerprint, info.files, image_entries(plan.suspect_records, suspect),
        image_entries(plan.control_records, control), configuration, _versions(),
        excluded_images=[*entries(plan.excluded), *({**entry, "reason": "duplicate"} for entry in entries(plan.dropped))],
        reference_models=[{**entry, "files": dict(sorted(r.info.files.items()))}
                          for entry, r in zip(plan.recorded_references, plan.references)],
        metadata=image_metadata(suspect, control),
    )


def open_record(plan: AuditPlan, configuration: dict[str, Any]) -> None:
    """The run's identifying tags and its params, written before extraction so a stopped audit is findable."""
    audit_layout.log_opened(
        {**configuration, **_versions()}, fingerprint=plan.adapter.info.fingerprint,
        reference_fingerprints=configuration["reference_fingerprints"] if plan.references else (),
        search_run_id=plan.search_config.search_run_id if plan.search_config is not None else None,
        image_sets=[("suspect", plan.suspect, plan.suspect_records), ("control", plan.control, plan.control_records)])


def record_step(plan: AuditPlan, extracted: Extracted, assessed: Assessed, configuration: dict[str, Any],
                run_id: str, uri: str) -> AuditResult:
    """Metrics, tags, the per-image table, result JSON, manifest, summary and report of the run."""
    from cdi.report import summary_markdown

    result = result_of(plan, assessed, run_id, uri)
    table = features_table(plan, extracted, assessed)
    audit_layout.log_result(
        result, target=extracted.target, references=extracted.references, scores=assessed.found.test.scores_,
        labels=plan.labels, table=table, summary_markdown=summary_markdown(result),
        manifest=audit_manifest(plan, configuration), report_html=_report(result, table),
        models=[("target", plan.adapter.info.fingerprint, plan.model.resolve(), plan.adapter.info.pipeline_class),
                *(("reference", r.info.fingerprint, Path(r.info.path).resolve(), r.info.pipeline_class)
                  for r in plan.references)])
    return result


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
    extraction: ExtractionOptions | None = None,
    allow_pickle: bool = False,
    experiment: str = audit_layout.EXPERIMENT,
    tracking_uri: str | None = None,
    feature_config: FeatureConfig | None = None,
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
    `extraction` (`cdi.features.ExtractionOptions`): how the features are computed (batch size, device, cache,
    processes, precision); default `ExtractionOptions()`.
    `search_config` (a `cdi.search.SearchConfig`): the search this audit's settings come from, applied whole
    (features, access, folds, seed, C, penalty, feature settings and calibration replace those arguments),
    as `cdi audit --config` does; its run id is recorded, and its calibration images are left out (held
    out of this P and U) or refused (a reference model's), see `cdi.search.config`.

    `reference_models`: models not trained on P or U (e.g. the base of a fine-tune), queried with the same
    seeded noise; `representation` says what the scorer gets (raw, calibrated or both, formula
    `reference_formula`), see `cdi.stats.difficulty`. `lora`: a LoRA file applied to `model` (the audited
    model is base + LoRA; the base is the reference when none is given). `difficulty_calibration`
    (a mode of `cdi.stats.difficulty.DIFFICULTY_MODES` or "auto", the default, see `resolve_difficulty`): regress
    the features on label-free image covariates (off: don't).
    `duplicates`: "refuse" (default) any picture found more than once (exact or near copies, `cdi.data.duplicates`),
    or "keep-one": keep the first copy of each picture within a set (a picture in both sets is always refused).

    The steps: plan (check and load everything), extract, assess, record; each is a function of this module.
    """
    settings = dict(names=features, access=access, feature_config=feature_config or FeatureConfig(), seed=seed,
                    alpha=alpha, folds=folds, C=C, penalty=penalty, test=test, n_permutations=n_permutations,
                    power_resamples=power_resamples, representation=representation,
                    reference_formula=reference_formula, difficulty_calibration=difficulty_calibration)
    extraction = extraction or ExtractionOptions()
    plan = plan_audit(model, suspect, control, settings, extraction, search_config=search_config,
                      allow_pickle=allow_pickle, prompt=prompt, class_label=class_label,
                      latent_sample_seed=latent_sample_seed, reference_models=reference_models, lora=lora,
                      duplicates=duplicates)
    if worker_rank() > 0:
        # A launcher (Lightning's ddp, torchrun, SLURM) started this process as one more rank: it only
        # computes its share of the features into the shared cache; rank 0 scores and logs the audit.
        extract_step(plan)
        return None
    uri = tracking.resolve_tracking_uri(tracking_uri)
    configuration = plan.configuration()
    # audit_run connects first (an unreachable store fails before any model pass), checks that a resumed
    # run audited this model, these images and settings, and that the artifact store takes a file.
    with tracking.audit_run(uri, experiment, run_name=audit_layout.run_name(plan.model, plan.adapter.info.fingerprint),
                            resume_run_id=resume_run_id, expected_params=configuration) as run_id:
        open_record(plan, configuration)
        extracted = extract_step(plan)
        audit_layout.set_status("scoring")
        assessed = assess_step(plan, extracted)
        result = record_step(plan, extracted, assessed, configuration, run_id, uri)
    log.info("audit %s: verdict %s, p = %.3g", run_id, result.verdict, result.p_value)
    return result
