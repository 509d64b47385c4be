"""What a search may switch on and off, and what each choice costs in model passes per image.

A search space (YAML under `search/spaces/`) names on/off switches for feature families (DL, SecMI,
PIA, PIAN, NO) and for timestep groups of GM and ML, plus ranges of the scorer settings (C, penalty,
folds). Features keep the paper's index order (method doc, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cdi.errors import OptionError
from cdi.features.base import FEATURE_NAMES, GRAY_BOX_FEATURES, FeatureConfig

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
DEFAULT_GROUPS: dict[str, tuple[int, ...]] = {"low": (0, 100, 200, 300), "mid": (400, 500, 600), "high": (700, 800, 900)}
PENALTIES = ("l2", "l1")


def passes_per_image(features: Sequence[str], config: FeatureConfig | None = None) -> int:
    """Model passes (forwards + backwards) one image costs for `features`, from the definitions.

    DL: `dl_draws` forwards; SecMI: secmi_t / secmi_k inversion steps + 2; PIA and PIAN share eps0:
    2 forwards for either, 3 for both; GM_t: 2 forwards + 1 backward; ML_t: 1 forward, free when
    GM_t runs (same z_t, same eps); NO: `no_evals` forward+backward evaluations. The encode is not
    counted (every subset pays it once).
    """
    config = config or FeatureConfig()
    wanted = set(features)
    passes = 0
    if "DL" in wanted:
        passes += config.dl_draws
    if "SecMI" in wanted:
        passes += config.secmi_t // config.secmi_k + 2
    pia = {"PIA", "PIAN"} & wanted
    passes += 0 if not pia else (2 if len(pia) == 1 else 3)
    for t in config.multi_timesteps:
        if f"GM_{t}" in wanted:
            passes += 3
        elif f"ML_{t}" in wanted:
            passes += 1
    if {"NO_loss", "NO_delta"} & wanted:
        passes += 2 * config.no_evals
    return passes


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
            raise OptionError(f"search space {self.name!r}: timestep(s) {bad_t} are not on the 0, 100, ..., 900 grid")
        if not 0 < self.C_low <= self.C_high:
            raise OptionError(f"search space {self.name!r}: need 0 < C low <= C high")
        if not self.penalties or any(p not in PENALTIES for p in self.penalties):
            raise OptionError(f"search space {self.name!r}: penalties must be a non-empty subset of {PENALTIES}")
        if not self.folds or any(int(k) < 2 for k in self.folds):
            raise OptionError(f"search space {self.name!r}: folds must be integers >= 2")

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

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one configuration on an Optuna trial."""
        params: dict[str, Any] = {switch: trial.suggest_categorical(switch, [True, False]) for switch in self.switches}
        params["C"] = trial.suggest_float("C", self.C_low, self.C_high, log=True)
        params["penalty"] = trial.suggest_categorical("penalty", list(self.penalties))
        params["folds"] = trial.suggest_categorical("folds", [int(k) for k in self.folds])
        return params

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> SearchSpace:
        scorer = data.get("scorer", {}) or {}
        C = scorer.get("C", {}) or {}
        groups = data.get("timestep_groups", DEFAULT_GROUPS)
        return cls(
            name=str(data.get("name", name)),
            families=tuple(data.get("families", FAMILY_FEATURES)),
            timestep_families=tuple(data.get("timestep_families", TIMESTEP_FAMILIES)),
            groups={str(g): tuple(int(t) for t in ts) for g, ts in groups.items()},
            C_low=float(C.get("low", 1e-2)),
            C_high=float(C.get("high", 1e2)),
            penalties=tuple(scorer.get("penalty", PENALTIES)),
            folds=tuple(int(k) for k in scorer.get("folds", (3, 5))),
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


__all__ = ["DEFAULT_GROUPS", "FAMILY_FEATURES", "SearchSpace", "access_for", "builtin_space", "passes_per_image"]
