"""What a search may switch on and off; what each choice costs in model passes per image is the
families' own count (`cdi.features.passes_per_image`, re-exported here).

A search space (YAML under `search/spaces/`) names on/off switches for feature families (DL, SecMI,
PIA, PIAN, NO) and for timestep groups of GM and ML, ranges of the scorer settings (C, penalty,
folds) and, optionally, values of feature settings that change what a family computes: the noise
optimisation budget (`no_evals`) and the gradient-masking ratio (`gm_mask_ratio`). Each value of a
feature setting other than the default is extracted once, for the affected family only, as extra
calibration columns named `<feature>@<setting>=<value>`. Features keep the paper's index order
(method doc, section 3).

An optional `calibration` section searches how the features are calibrated before scoring
(`cdi.stats.difficulty`, method doc, section 8), each key a list of values sampled as a categorical:

    calibration:
      representation: [raw, calibrated, both]   # needs reference models (`cdi search --reference-model`)
      reference_formula: [difference, log_ratio]
      difficulty_calibration: ["off", image]    # a bare off reads as false in YAML; both forms work

Without reference models `representation` is fixed to raw (and `reference_formula` is not sampled);
`reference_formula` is only sampled for a trial whose representation is not raw. An absent key (or
section) fixes raw / difference / off, so a space without the section scores as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cdi.errors import OptionError
from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES, FeatureConfig, features_reading, passes_per_image
from cdi.features.gradient_masking import MULTI_TIMESTEPS
from cdi.stats.difficulty import DIFFICULTY_MODES, REFERENCE_FORMULAS, REPRESENTATIONS

#: Families switched as a whole, and the features each one produces.
FAMILY_FEATURES: dict[str, tuple[str, ...]] = {
    "DL": ("DL",),
    "SecMI": ("SecMI",),
    "PIA": ("PIA",),
    "PIAN": ("PIAN",),
    "NO": ("NO_loss", "NO_delta"),
}
#: Families switched per timestep group.
TIMESTEP_FAMILIES = ("GM", "ML")
DEFAULT_GROUPS: dict[str, tuple[int, ...]] = {"low": MULTI_TIMESTEPS[:4], "mid": MULTI_TIMESTEPS[4:7],
                                              "high": MULTI_TIMESTEPS[7:]}
PENALTIES = ("l2", "l1")
#: Feature settings a search may vary, and the features each one changes (from the families' declarations).
SETTING_FEATURES: dict[str, tuple[str, ...]] = {setting: features_reading(setting)
                                                for setting in ("no_evals", "gm_mask_ratio")}
#: Keys of a space's `calibration` section, the values each may take, and the value of an absent key.
CALIBRATION_CHOICES: dict[str, tuple[str, ...]] = {
    "representation": REPRESENTATIONS,
    "reference_formula": REFERENCE_FORMULAS,
    "difficulty_calibration": DIFFICULTY_MODES,
}
CALIBRATION_DEFAULTS: dict[str, str] = {"representation": "raw", "reference_formula": "difference",
                                        "difficulty_calibration": "off"}


def variant_column(feature: str, setting: str, value: Any) -> str:
    """Calibration column of `feature` computed with a non-default value of a feature setting."""
    return f"{feature}@{setting}={value}"


@dataclass(frozen=True)
class SearchSpace:
    """Switches and scorer ranges of one search; `features(params)` maps a trial to feature names."""

    name: str = "white"
    families: tuple[str, ...] = tuple(FAMILY_FEATURES)
    timestep_families: tuple[str, ...] = TIMESTEP_FAMILIES
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: dict(DEFAULT_GROUPS))
    C_low: float = 1e-2
    C_high: float = 1e2
    penalties: tuple[str, ...] = PENALTIES
    folds: tuple[int, ...] = (3, 5)
    settings: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # e.g. {"no_evals": (4, 8, 16)}
    calibration: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. {"representation": ("raw", "both")}

    def __post_init__(self) -> None:
        if any(isinstance(f, bool) for f in self.families):
            raise OptionError(f"search space {self.name!r}: a family reads as true/false; quote \"NO\" in YAML")
        unknown = [f for f in self.families if f not in FAMILY_FEATURES]
        unknown += [f for f in self.timestep_families if f not in TIMESTEP_FAMILIES]
        if unknown:
            raise OptionError(f"search space {self.name!r}: unknown famil(y/ies) {', '.join(unknown)}; known: "
                              f"{', '.join([*FAMILY_FEATURES, *TIMESTEP_FAMILIES])}")
        bad_t = [t for ts in self.groups.values() for t in ts if f"GM_{t}" not in FEATURE_NAMES]
        if bad_t:
            raise OptionError(f"search space {self.name!r}: timestep(s) {bad_t} are not on the "
                              f"{MULTI_TIMESTEPS[0]}, {MULTI_TIMESTEPS[1]}, ..., {MULTI_TIMESTEPS[-1]} grid")
        if not 0 < self.C_low <= self.C_high:
            raise OptionError(f"search space {self.name!r}: need 0 < C low <= C high")
        if not self.penalties or any(p not in PENALTIES for p in self.penalties):
            raise OptionError(f"search space {self.name!r}: penalties must be a non-empty subset of {PENALTIES}")
        if not self.folds or any(int(k) < 2 for k in self.folds):
            raise OptionError(f"search space {self.name!r}: folds must be integers >= 2")
        for setting, values in self.settings.items():
            if setting not in SETTING_FEATURES:
                raise OptionError(f"search space {self.name!r}: feature setting {setting!r} cannot be searched; "
                                  f"known: {', '.join(SETTING_FEATURES)}")
            valid = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1) if setting == "no_evals" \
                else (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)
            if not values or not all(valid(v) for v in values):
                rule = "integers >= 1" if setting == "no_evals" else "numbers strictly between 0 and 1"
                raise OptionError(f"search space {self.name!r}: feature_settings.{setting} must be a non-empty list "
                                  f"of {rule}, got {list(values)}")
        for key, values in self.calibration.items():
            if key not in CALIBRATION_CHOICES:
                raise OptionError(f"search space {self.name!r}: calibration.{key} cannot be searched; "
                                  f"known: {', '.join(CALIBRATION_CHOICES)}")
            if not values or any(v not in CALIBRATION_CHOICES[key] for v in values):
                raise OptionError(f"search space {self.name!r}: calibration.{key} must be a non-empty list of "
                                  f"{', '.join(CALIBRATION_CHOICES[key])}, got {list(values)}")

    @property
    def switches(self) -> tuple[str, ...]:
        """Parameter names of the on/off switches, e.g. `use_DL`, `use_GM_low`."""
        return (*(f"use_{f}" for f in self.families),
                *(f"use_{f}_{g}" for f in self.timestep_families for g in self.groups))

    def switch_features(self, switch: str) -> tuple[str, ...]:
        name = switch.removeprefix("use_")
        if name in FAMILY_FEATURES:
            return FAMILY_FEATURES[name]
        family, group = name.split("_", 1)
        return tuple(f"{family}_{t}" for t in self.groups[group])

    @property
    def all_features(self) -> tuple[str, ...]:
        """The union the search draws from: extracted once, before the first trial."""
        wanted = {f for switch in self.switches for f in self.switch_features(switch)}
        return tuple(n for n in FEATURE_NAMES if n in wanted)

    @property
    def access(self) -> str:
        return access_for(self.all_features)

    def features(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Feature names switched on by a trial's parameters, in the paper's index order."""
        wanted = {f for switch in self.switches if params.get(switch) for f in self.switch_features(switch)}
        return tuple(n for n in FEATURE_NAMES if n in wanted)

    def variants(self) -> list[tuple[str, Any, tuple[str, ...]]]:
        """(setting, value, features) for every searched value that is not the default: one extraction each."""
        default = FeatureConfig().to_dict()
        wanted = set(self.all_features)
        out = []
        for setting, values in self.settings.items():
            affected = tuple(f for f in SETTING_FEATURES[setting] if f in wanted)
            out += [(setting, v, affected) for v in dict.fromkeys(values) if v != default[setting] and affected]
        return out

    @property
    def all_columns(self) -> tuple[str, ...]:
        """Calibration columns the search needs: every feature, plus each non-default variant."""
        return (*self.all_features,
                *(variant_column(f, setting, v) for setting, v, features in self.variants() for f in features))

    def feature_settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's values of the searched feature settings (empty when the space searches none)."""
        return {setting: params[setting] for setting in self.settings}

    def columns(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Calibration columns of a trial: its features, each taken in the variant of its settings."""
        default = FeatureConfig().to_dict()
        chosen = self.feature_settings(params)
        out = []
        for feature in self.features(params):
            column = feature
            for setting, value in chosen.items():
                if feature in SETTING_FEATURES[setting] and value != default[setting]:
                    column = variant_column(feature, setting, value)
            out.append(column)
        return tuple(out)

    def feature_config(self, params: Mapping[str, Any]) -> FeatureConfig:
        return FeatureConfig(**self.feature_settings(params))

    def uses_references(self) -> bool:
        """Whether a trial can score reference-calibrated features (a representation other than raw)."""
        return any(v != "raw" for v in self.calibration.get("representation", ()))

    def uses_covariates(self) -> bool:
        """Whether a trial can regress the features on the difficulty covariates."""
        return any(v != "off" for v in self.calibration.get("difficulty_calibration", ()))

    def feature_calibration(self, params: Mapping[str, Any]) -> dict[str, str]:
        """A trial's calibration (`cdi.stats.difficulty.calibrate`): every key, defaults for those not sampled."""
        return {key: str(params.get(key, default)) for key, default in CALIBRATION_DEFAULTS.items()}

    def suggest(self, trial: Any, references: bool = False) -> dict[str, Any]:
        """Draw one configuration on an Optuna trial; `references`: the calibration data have reference features."""
        params: dict[str, Any] = {switch: trial.suggest_categorical(switch, [True, False]) for switch in self.switches}
        params["C"] = trial.suggest_float("C", self.C_low, self.C_high, log=True)
        params["penalty"] = trial.suggest_categorical("penalty", list(self.penalties))
        params["folds"] = trial.suggest_categorical("folds", [int(k) for k in self.folds])
        for setting, values in self.settings.items():
            params[setting] = trial.suggest_categorical(setting, list(values))
        choices = self.calibration
        if references and "representation" in choices:
            params["representation"] = trial.suggest_categorical("representation", list(choices["representation"]))
        if params.get("representation", "raw") != "raw" and "reference_formula" in choices:
            params["reference_formula"] = trial.suggest_categorical("reference_formula",
                                                                    list(choices["reference_formula"]))
        if "difficulty_calibration" in choices:
            params["difficulty_calibration"] = trial.suggest_categorical("difficulty_calibration",
                                                                         list(choices["difficulty_calibration"]))
        return params

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> SearchSpace:
        scorer = data.get("scorer", {}) or {}
        C = scorer.get("C", {}) or {}
        groups = data.get("timestep_groups", DEFAULT_GROUPS)
        calibration = data.get("calibration", {}) or {}
        if not isinstance(calibration, Mapping):
            raise OptionError(f"search space {data.get('name', name)!r}: calibration must be a mapping such as "
                              "{representation: [raw, calibrated]}")
        return cls(
            name=str(data.get("name", name)),
            families=tuple(data.get("families", FAMILY_FEATURES)),
            timestep_families=tuple(data.get("timestep_families", TIMESTEP_FAMILIES)),
            groups={str(g): tuple(int(t) for t in ts) for g, ts in groups.items()},
            C_low=float(C.get("low", 1e-2)),
            C_high=float(C.get("high", 1e2)),
            penalties=tuple(scorer.get("penalty", PENALTIES)),
            folds=tuple(int(k) for k in scorer.get("folds", (3, 5))),
            settings={str(k): tuple(v if isinstance(v, (list, tuple)) else [v])
                      for k, v in (data.get("feature_settings", {}) or {}).items()},
            calibration={str(k): tuple(_calibration_value(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs]))
                         for k, vs in calibration.items()},
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise OptionError(f"--space {path}: no such file; pass a search space YAML (see search/spaces/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise OptionError(f"--space {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        return cls.from_dict(data, name=path.stem)


def _calibration_value(value: Any) -> Any:
    """YAML 1.1 reads a bare `off` as false: take it for the value "off" it was written as."""
    return "off" if value is False else value


def access_for(features: Sequence[str]) -> str:
    """The lowest access level that computes `features`."""
    return "gray" if all(f in GRAY_BOX_FEATURES for f in features) else "white"


def builtin_space(access: str) -> SearchSpace:
    """The default space for an access level: every family (white) or the gradient-free ones (gray)."""
    if access == "gray":
        return SearchSpace(name="gray", families=("DL", "SecMI", "PIA", "PIAN"), timestep_families=("ML",))
    if access == "white":
        return SearchSpace()
    raise OptionError(f"--access {access!r}: choose gray or white")


__all__ = ["CALIBRATION_CHOICES", "CALIBRATION_DEFAULTS", "DEFAULT_GROUPS", "FAMILY_FEATURES", "SETTING_FEATURES",
           "SearchSpace", "access_for", "builtin_space", "passes_per_image", "variant_column"]
