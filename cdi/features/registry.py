"""The families, and what their declarations add up to: the feature names in index order, the
gray-box features, `FeatureConfig`, the plan for a requested feature list and its cost in model passes.

To add a family, write its module (see `cdi.features.base`) and put its class in `FAMILIES`: its place
there is the place of its features in `FEATURE_NAMES` and of its settings in `FeatureConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, field, make_dataclass
from typing import Any, Iterable, Sequence

from cdi.errors import OptionError
from cdi.features.base import FeatureFamily, Passes, Setting
from cdi.options import ACCESS_LEVELS
from cdi.features.denoising_loss import DenoisingLoss
from cdi.features.gradient_masking import GradientMasking, MultipleLoss
from cdi.features.latent_statistics import LatentStatistics
from cdi.features.noise_optimisation import NoiseOptimisation
from cdi.features.pia import PIA
from cdi.features.secmi import SecMI

FAMILIES: tuple[type[FeatureFamily], ...] = (
    DenoisingLoss,
    SecMI,
    PIA,
    GradientMasking,
    MultipleLoss,
    NoiseOptimisation,
)
#: Families the engine runs for the checks, not for the scorer: their names are not in `FEATURE_NAMES`.
AUXILIARY_FAMILIES: tuple[type[FeatureFamily], ...] = (LatentStatistics,)


def _defining_families(families: Sequence[type[FeatureFamily]]) -> dict[str, type[FeatureFamily]]:
    """Each feature and the one family that defines it (lists it in `names`, not as `fused`), in order."""
    defined: dict[str, type[FeatureFamily]] = {}
    for family in families:
        if family.access not in ACCESS_LEVELS:
            raise TypeError(f"{family.__name__}.access {family.access!r}: choose one of {ACCESS_LEVELS}")
        for name in family.own_names():
            if name in defined:
                raise TypeError(f"feature {name} is defined by {defined[name].__name__} and {family.__name__}")
            defined[name] = family
    for family in families:
        for name, host in family.fused.items():
            if name not in defined or host not in family.own_names():
                raise TypeError(f"{family.__name__}.fused: {name} -> {host} needs {name} defined by another "
                                f"family and {host} by {family.__name__}")
    return defined


def _declared_settings(families: Sequence[type[FeatureFamily]]) -> dict[str, Setting]:
    """Every family's settings, in `FAMILIES` order; a setting two families read is one shared `Setting`."""
    settings: dict[str, Setting] = {}
    for family in families:
        for setting in family.settings:
            if settings.setdefault(setting.name, setting) is not setting:
                raise TypeError(f"setting {setting.name} is declared twice ({family.__name__}); share one Setting")
    return settings


DEFINED_BY: dict[str, type[FeatureFamily]] = _defining_families(FAMILIES)
#: Index layout of the features (method doc, section 3): DL, SecMI, PIA, PIAN, GM_t, ML_t, NO_loss, NO_delta.
FEATURE_NAMES: tuple[str, ...] = tuple(DEFINED_BY)
#: Features that need only noise predictions (no input gradients): those of the gray families.
GRAY_BOX_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if DEFINED_BY[n].access == "gray")
SETTINGS: dict[str, Setting] = _declared_settings(FAMILIES)


def _check(config: Any) -> None:
    """Refuse a setting of the wrong type or range when it is made (a config file, an API call),
    before any model pass; the adapter maps the timesteps onto the model's schedule."""
    for setting in SETTINGS.values():
        value = getattr(config, setting.name)
        checked = setting.check(value)
        if checked is not value:
            object.__setattr__(config, setting.name, checked)
    for family in FAMILIES:
        family.check_settings(config)


def _to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


FeatureConfig = make_dataclass(
    "FeatureConfig",
    [(s.name, s.annotation, field(default=s.default)) for s in SETTINGS.values()],
    namespace={
        "__module__": __name__,
        "__doc__": "Settings of every family (each family's `settings`, in `FAMILIES` order); defaults are the "
                   "paper's configuration (on the 1000-step grid).",
        "__post_init__": _check,
        "to_dict": _to_dict,
    },
    frozen=True,
)


def features_reading(setting: str) -> tuple[str, ...]:
    """The features whose values a setting changes: those defined by the families that declare it."""
    return tuple(n for n in FEATURE_NAMES if any(s.name == setting for s in DEFINED_BY[n].settings))


def features_for_access(access: str) -> tuple[str, ...]:
    if access not in ACCESS_LEVELS:
        raise OptionError(f"--access {access!r}: choose one of {', '.join(ACCESS_LEVELS)}")
    return GRAY_BOX_FEATURES if access == "gray" else FEATURE_NAMES


def resolve_features(names: Iterable[str] | None, access: str) -> tuple[str, ...]:
    """Validate a requested feature list against the access level; keep the paper's index order."""
    allowed = features_for_access(access)
    if names is None:
        return allowed
    requested = list(names)
    unknown = [n for n in requested if n not in FEATURE_NAMES]
    if unknown:
        raise OptionError(f"--features: unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURE_NAMES)}")
    needs_white = [n for n in requested if n not in allowed]
    if needs_white:
        raise OptionError(f"--features: {', '.join(needs_white)} need input gradients; use --access white")
    if not requested:
        raise OptionError("--features: empty list; name at least one feature")
    return tuple(n for n in FEATURE_NAMES if n in set(requested))


def plan_families(names: Sequence[str], config: Any) -> list[FeatureFamily]:
    """The families to run for `names`, each told which of its features to produce. In `FAMILIES` order,
    each family claims what is not covered yet, so a fused feature comes from its host's passes (ML_t
    from GM_t's forward) where the host runs, and from its own family otherwise."""
    wanted = set(names)
    plan: list[FeatureFamily] = []
    covered: set[str] = set()
    for family_cls in (*FAMILIES, *AUXILIARY_FAMILIES):
        useful = family_cls.claim(wanted) - covered
        if useful:
            plan.append(family_cls(config, useful))
            covered.update(useful)
    return plan


def plan_passes(plan: Sequence[FeatureFamily]) -> Passes:
    """What a plan costs per image: every family's passes, each shared batch call once."""
    total = Passes()
    for family in plan:
        total = total + family.passes()
    return total


def passes_per_image(features: Sequence[str], config: Any | None = None) -> int:
    """Model passes (forwards + backwards) one image costs for `features`, from the families' declarations
    (`FeatureFamily.passes`) for the plan the engine runs. Unknown names cost nothing."""
    return plan_passes(plan_families(features, config or FeatureConfig())).total
