"""The result a search hands to an audit (`best_config.yaml`), and the guard against reusing its data.

Hyperparameters chosen on some images must not be judged on the same images (method doc, section 5).
What an audit run from a search does with an image whose sha256 is among the search's calibration images
depends on where the calibration data came from:

- split mode (a seeded part of the owner's own P and U was held out for the search): the audit leaves
  those images out and says how many; the rest of P and U is untouched by the search;
- known membership (members and non-members of a reference model): such an image is refused, since
  the owner pointed the audit at images the configuration was chosen on.

`feature_calibration` says how the audit maps extracted features to the scorer's input
(`cdi.stats.difficulty.calibrate`): `representation`, `reference_formula`, `difficulty_calibration`.
A representation other than raw was chosen on reference models' features (`calibration.reference_models`),
so an audit with it needs reference models too (`check_references`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cdi.errors import ImageSetError, OptionError
from cdi.options import MAX_SEED

CONFIG_ARTIFACT = "best_config.yaml"


@dataclass
class SearchConfig:
    """The chosen configuration: features and scorer settings, and the data it was chosen on."""

    features: list[str]
    C: float
    penalty: str
    folds: int
    access: str
    seed: int
    feature_settings: dict[str, Any] = field(default_factory=dict)  # FeatureConfig fields the search chose
    feature_calibration: dict[str, str] = field(default_factory=dict)  # representation, reference_formula, ...
    objective: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # description; `sha256`: the images' hashes
    search_run_id: str | None = None
    study_name: str | None = None

    @property
    def calibration_hashes(self) -> set[str]:
        return set(self.calibration.get("sha256", []) or [])

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(asdict(self), sort_keys=False)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> SearchConfig:
        """Every key is checked for type and range here, before any model pass; a key the audit would not
        honour (e.g. `alpha`, which is the user's choice, not the search's) is refused, never ignored."""
        missing = [key for key in ("features", "C", "penalty", "folds", "access", "seed") if key not in data]
        if missing:
            raise OptionError(f"--config {where}: missing key(s) {', '.join(missing)}; "
                              f"use the {CONFIG_ARTIFACT} a `cdi search` run exported")
        unknown = [str(key) for key in data if key not in cls.__dataclass_fields__]
        if unknown:
            hint = {"alpha": "the significance level is the auditor's choice: pass --alpha",
                    "permutations": "pass --permutations", "n_permutations": "pass --permutations",
                    "test": "pass --test"}.get(unknown[0], f"known keys: {', '.join(cls.__dataclass_fields__)}")
            raise OptionError(f"--config {where}: key {unknown[0]!r} is not a setting an audit takes from a search "
                              f"config ({hint}); remove it")
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        known.update(features=_features(data["features"], where), C=_number(data["C"], "C", where),
                     folds=_integer(data["folds"], "folds", where, minimum=2),
                     seed=_integer(data["seed"], "seed", where, minimum=0, maximum=MAX_SEED),
                     penalty=_choice(data["penalty"], "penalty", ("l2", "l1"), where),
                     access=_choice(data["access"], "access", ("gray", "white"), where),
                     feature_settings=_mapping(data.get("feature_settings"), "feature_settings", where),
                     feature_calibration=_feature_calibration(data.get("feature_calibration"), where))
        for key in ("objective", "calibration"):
            known[key] = _mapping(data.get(key), key, where)
        config = cls(**known)
        config.feature_config(where)  # an unknown or invalid setting is refused here, not mid-audit
        return config

    def feature_config(self, where: str = "") -> Any:
        """The feature configuration of the audit: the paper's defaults with the searched settings."""
        from cdi.features import FeatureConfig

        option = f"--config {where}".strip()
        unknown = sorted(set(self.feature_settings) - set(FeatureConfig.__dataclass_fields__))
        if unknown:
            raise OptionError(f"{option}: unknown feature setting(s) {', '.join(unknown)}; "
                              f"use the {CONFIG_ARTIFACT} a `cdi search` run exported")
        try:
            return FeatureConfig(**self.feature_settings)
        except OptionError as exc:
            raise OptionError(f"{option}: feature_settings: {exc}") from None

    @classmethod
    def read(cls, path: str | Path) -> SearchConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise OptionError(f"--config {path}: no such file; pass the {CONFIG_ARTIFACT} of a search")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise OptionError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise OptionError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
        return cls.from_dict(data, str(path))




def _features(value: Any, where: str) -> list[str]:
    """A list of feature names; a string is read as a comma-separated list (as --features), never as letters."""
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise OptionError(f"--config {where}: features must be a list of feature names, e.g. [DL, SecMI]; "
                          f"got {value!r}")
    from cdi.features import FEATURE_NAMES

    unknown = [v for v in value if v not in FEATURE_NAMES]
    if unknown:
        raise OptionError(f"--config {where}: unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURE_NAMES)}")
    return [str(v) for v in value]


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise OptionError(f"--config {where}: {key} {value!r} must be a positive number (e.g. 1.0)")
    return float(value)


def _integer(value: Any, key: str, where: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise OptionError(f"--config {where}: {key} {value!r} must be an integer {bound}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise OptionError(f"--config {where}: {key} {value!r} must be one of {', '.join(choices)}")
    return str(value)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"--config {where}: {key} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _feature_calibration(value: Any, where: str) -> dict[str, str]:
    """`feature_calibration` of a config file, checked key by key (absent: the audit's own options apply)."""
    from cdi.search.space import CALIBRATION_CHOICES

    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"--config {where}: feature_calibration must be a mapping of "
                          f"{', '.join(CALIBRATION_CHOICES)}; use the {CONFIG_ARTIFACT} a `cdi search` run exported")
    out = {}
    for key, choice in value.items():
        choice = "off" if choice is False else choice  # YAML 1.1 reads a bare off as false
        if key not in CALIBRATION_CHOICES:
            raise OptionError(f"--config {where}: unknown feature_calibration key {key!r}; known: "
                              f"{', '.join(CALIBRATION_CHOICES)}")
        if choice not in CALIBRATION_CHOICES[key]:
            raise OptionError(f"--config {where}: feature_calibration.{key} {choice!r} is not one of "
                              f"{', '.join(CALIBRATION_CHOICES[key])}")
        out[str(key)] = str(choice)
    return out


def check_references(config: SearchConfig, n_references: int) -> None:
    """Refuse an audit without reference models whose search chose reference-calibrated features.

    `n_references`: the reference models the audit loaded (with `--lora` and no `--reference-model`,
    the base model counts as one).
    """
    representation = config.feature_calibration.get("representation", "raw")
    if representation == "raw" or n_references > 0:
        return
    source = f"search run {config.search_run_id}" if config.search_run_id else "the search"
    used = [entry.get("path", "?") for entry in config.calibration.get("reference_models", []) or []]
    raise OptionError(
        f"--config/--from-search: {source} chose representation {representation!r}, which needs reference models"
        + (f" (it used {', '.join(used)})" if used else "")
        + "; pass --reference-model DIR, or search with representation raw"
    )


def check_no_calibration_images(records: Sequence[Any], config: SearchConfig) -> None:
    """Refuse an audit whose images (P or U) include any of the search's calibration images."""
    hashes = config.calibration_hashes
    for record in records:
        if record.sha256 in hashes:
            shared = sum(r.sha256 in hashes for r in records)
            source = f"search run {config.search_run_id}" if config.search_run_id else "the search"
            raise ImageSetError(
                f"{record.path}: this image (and {shared - 1} more) was calibration data of {source}; "
                "a configuration must not be judged on the images it was chosen on: remove them or audit other images"
            )


def exclude_calibration_images(
    suspect: Sequence[Any], control: Sequence[Any], config: SearchConfig, min_size: int,
) -> tuple[list[Any], list[Any], list[Any]]:
    """Apply the search's calibration data to an audit's sets: (suspect, control, excluded records).

    Split mode leaves the held-out images out (each set must keep `min_size` images); any other mode
    refuses a shared image (`check_no_calibration_images`).
    """
    if config.calibration.get("mode") != "split":
        check_no_calibration_images([*suspect, *control], config)
        return list(suspect), list(control), []
    hashes = config.calibration_hashes
    kept_suspect = [r for r in suspect if r.sha256 not in hashes]
    kept_control = [r for r in control if r.sha256 not in hashes]
    excluded = [r for r in [*suspect, *control] if r.sha256 in hashes]
    source = f"search run {config.search_run_id}" if config.search_run_id else "the search"
    for option, kept, records in (("--suspect", kept_suspect, suspect), ("--control", kept_control, control)):
        if len(kept) < min_size:
            raise ImageSetError(
                f"{option}: {len(records) - len(kept)} of its {len(records)} images were held out as calibration data "
                f"of {source}, leaving {len(kept)} (at least {min_size} are needed); add images or search with a "
                "smaller --calibration-fraction"
            )
    return kept_suspect, kept_control, excluded


__all__ = ["CONFIG_ARTIFACT", "SearchConfig", "check_no_calibration_images", "check_references",
           "exclude_calibration_images"]
