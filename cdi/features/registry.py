"""Which families compute which features, and the plan for a requested feature list."""

from __future__ import annotations

from typing import Iterable, Sequence

from cdi.errors import OptionError
from cdi.features.base import ACCESS_LEVELS, FEATURE_NAMES, GRAY_BOX_FEATURES, FeatureConfig, FeatureFamily
from cdi.features.denoising_loss import DenoisingLoss
from cdi.features.gradient_masking import GradientMasking, MultipleLoss
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


def plan_families(names: Sequence[str], config: FeatureConfig) -> list[FeatureFamily]:
    """The families to run for `names`, each told which of its features to produce; ML_t comes from
    GM_t's forward pass when GM_t runs."""
    wanted = set(names)
    plan: list[FeatureFamily] = []
    covered: set[str] = set()
    for family_cls in FAMILIES:
        useful = wanted.intersection(family_cls.names) - covered
        if family_cls is GradientMasking:
            # ML_t rides on GM_t's forward only where GM_t runs; other ML_t are MultipleLoss's.
            useful = {n for n in useful if n.startswith("GM_") or f"GM_{n.removeprefix('ML_')}" in wanted}
        if useful:
            plan.append(family_cls(config, useful))
            covered.update(useful)
    return plan
