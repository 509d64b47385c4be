"""Calibration data for a search: features of images whose membership is known, extracted once.

Two sources:
- known membership: a reference model with member and non-member folders (default: the demo);
- split: a seeded fraction of an owner's P and U, held out for the search; the rest stays for the
  audit, and the held-out images' hashes travel with the search result so the audit can refuse them.
All features of the search space are extracted in one pass (`cdi.features.extract`, cached on disk),
so a trial costs only scoring. With reference models (`--reference-model`, checked comparable with the
model as an audit checks them) the same features of the same images are extracted on each of them with
the same seed and feature configuration (the same noise draws), and every image's label-free
difficulty covariates are computed, so that trials can search the calibration of `cdi.stats.difficulty`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdi.data import ImageRecord, build_image_sets, check_decodable, discover_images
from cdi.errors import ImageSetError, OptionError
from cdi.search.objective import CalibrationData


#: (setting, value, features): a non-default feature-setting value the search varies (`SearchSpace.variants`).
Variant = tuple[str, Any, Sequence[str]]


def _features(adapter: Any, model: str | Path, records: Sequence[ImageRecord], names: Sequence[str],
              variants: Sequence[Variant], *, reference_models: Sequence[str | Path], seed: int, batch_size: int,
              device: str, cache_dir: str | Path | None, progress: bool,
              pixels: bool = False, difficulty: str = "off") -> tuple[dict[str, Any], dict[str, Any]]:
    """CalibrationData fields (X, names, X_reference, covariates) of `records`, and what describes them;
    `pixels`: the covariates carry each image's pixels too (difficulty modes "image+pca" and, with DL's seeded
    noise of each image on a pixel model, "image+pca+wiener").

    `difficulty`: the difficulty mode of trials whose space does not sample one ("auto": the one an audit of
    these images on this model resolves to, `cdi.audit.resolve_difficulty`), so that trials score features
    calibrated as the audit will calibrate them; its covariates are computed too.

    Each model gets the default configuration's features, then each variant's affected features only.
    """
    from cdi.audit import (difficulty_covariates_of, load_references, reference_entries, resolve_difficulty,
                           wiener_noise_of)
    from cdi.models.latent import LatentAdapter
    from cdi.features import FeatureConfig, extract_models
    from cdi.search.space import variant_column
    from cdi.stats.difficulty import DIFFICULTY_COVARIATE_NAMES, PIXEL_MODES

    references, _ = load_references(adapter, reference_models, model=model, lora=None, allow_pickle=False,
                                    latent_sample_seed=None)
    info = adapter.info
    check_decodable(records, info.image_size, info.image_channels)
    difficulty = resolve_difficulty(difficulty, adapter, len(records), FeatureConfig())
    pixels = pixels or difficulty in PIXEL_MODES
    options = dict(seed=seed, batch_size=batch_size, device=device, progress=progress, cache_dir=cache_dir)

    models = [adapter, *references]  # each block in one engine pass over the model and its references
    blocks = [[report.values for report in extract_models(models, records, names, **options)]]
    for setting, value, features in variants:
        blocks.append([report.values for report in extract_models(
            models, records, features, config=FeatureConfig(**{setting: value}), **options)])
    X, *X_reference = (np.hstack(per_model) for per_model in zip(*blocks))

    columns = [*names, *(variant_column(f, setting, value) for setting, value, features in variants for f in features)]
    covariates = difficulty_covariates_of(records, info.image_size, info.image_channels, pixels=pixels)
    fields = dict(X=X, names=tuple(columns), X_reference=X_reference,
                  covariates=covariates, difficulty_default=difficulty,
                  wiener=wiener_noise_of(records, adapter, FeatureConfig(), seed)
                  if pixels and not isinstance(adapter, LatentAdapter) else None)
    description: dict[str, Any] = {"model": str(Path(model).resolve()), "model_fingerprint": info.fingerprint}
    if references:
        description["reference_models"] = [{key: entry[key] for key in ("path", "fingerprint")}
                                           for entry in reference_entries(references)]
    description["difficulty_covariates"] = list(DIFFICULTY_COVARIATE_NAMES)
    description["trial_difficulty_default"] = difficulty
    return fields, description


def known_membership(model: str | Path, members: str | Path, nonmembers: Sequence[str | Path], names: Sequence[str],
                     *, variants: Sequence[Variant] = (), reference_models: Sequence[str | Path] = (), seed: int = 0,
                     batch_size: int = 50, device: str = "auto", cache_dir: str | Path | None = None,
                     progress: bool = False, pixels: bool = False, difficulty: str = "off") -> CalibrationData:
    """Members (label 1) and non-members (label 0) of a model whose training set is known."""
    from cdi.models import load_model

    if not nonmembers:
        raise OptionError("--nonmembers: give at least one folder of images the model was not trained on")
    member_records = discover_images(members, "suspect", "--members")
    nonmember_records = [r for folder in nonmembers for r in discover_images(folder, "control", "--nonmembers")]
    member_hashes = {r.sha256: r for r in member_records}
    for record in nonmember_records:
        if record.sha256 in member_hashes:
            raise ImageSetError(f"{record.path}: also a member ({member_hashes[record.sha256].path}); "
                                "members and non-members must be disjoint")
    records = [*member_records, *nonmember_records]
    fields, models = _features(load_model(model), model, records, names, variants, reference_models=reference_models,
                               seed=seed, batch_size=batch_size, device=device, cache_dir=cache_dir,
                               progress=progress, pixels=pixels, difficulty=difficulty)
    return CalibrationData(
        y=np.array([1] * len(member_records) + [0] * len(nonmember_records)), **fields,
        sha256=[r.sha256 for r in records], files=[str(r.path) for r in records],
        description={"mode": "known", **models, "members": str(Path(members).resolve()),
                     "nonmembers": [str(Path(f).resolve()) for f in nonmembers],
                     "n_members": len(member_records), "n_nonmembers": len(nonmember_records)},
    )


def held_out(records: Sequence[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A seeded `fraction` of `records`, chosen by content (sha256 order), not by file order."""
    ordered = sorted(records, key=lambda r: r.sha256)
    count = int(round(fraction * len(ordered)))
    chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(chosen)]


def split(model: str | Path, suspect: str | Path, control: str | Path, names: Sequence[str], *, fraction: float,
          variants: Sequence[Variant] = (), reference_models: Sequence[str | Path] = (), seed: int = 0,
          batch_size: int = 50, device: str = "auto", cache_dir: str | Path | None = None,
          progress: bool = False, pixels: bool = False, difficulty: str = "off") -> CalibrationData:
    """A seeded `fraction` of the owner's P (label 1) and U (label 0), held out for the search."""
    if not 0.0 < fraction < 1.0:
        raise OptionError(f"--calibration-fraction {fraction}: must lie strictly between 0 and 1 (e.g. 0.3)")
    from cdi.models import load_model

    adapter = load_model(model)
    info = adapter.info
    suspect_records, control_records = build_image_sets(suspect, control, info.image_size, info.image_channels)
    p_cal, u_cal = held_out(suspect_records, fraction, seed), held_out(control_records, fraction, seed + 1)
    if min(len(p_cal), len(u_cal)) < 6:
        raise OptionError(f"--calibration-fraction {fraction}: holds out {len(p_cal)} suspect and {len(u_cal)} "
                          "control images; at least 6 per side are needed: raise the fraction or add images")
    records = [*p_cal, *u_cal]
    fields, models = _features(adapter, model, records, names, variants, reference_models=reference_models, seed=seed,
                               batch_size=batch_size, device=device, cache_dir=cache_dir, progress=progress,
                               pixels=pixels, difficulty=difficulty)
    return CalibrationData(
        y=np.array([1] * len(p_cal) + [0] * len(u_cal)), **fields,
        sha256=[r.sha256 for r in records], files=[str(r.path) for r in records],
        description={"mode": "split", **models,
                     "suspect": str(Path(suspect).resolve()), "control": str(Path(control).resolve()),
                     "fraction": fraction, "n_members": len(p_cal), "n_nonmembers": len(u_cal)},
    )


__all__ = ["held_out", "known_membership", "split"]
