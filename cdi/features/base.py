"""The shape every feature family shares: `Family(config).compute(adapter, batch) -> FeatureOutput`.

Index layout of the 26 features follows the paper's ablations (method doc, section 3):
0 DL, 1 SecMI, 2 PIA, 3 PIAN, 4-13 GM_t, 14-23 ML_t (t = 0, 100, ..., 900), 24 NO_loss, 25 NO_delta.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch

from cdi.models.base import DiffusionAdapter

MULTI_TIMESTEPS: tuple[int, ...] = tuple(range(0, 1000, 100))

FEATURE_NAMES: tuple[str, ...] = (
    "DL",
    "SecMI",
    "PIA",
    "PIAN",
    *(f"GM_{t}" for t in MULTI_TIMESTEPS),
    *(f"ML_{t}" for t in MULTI_TIMESTEPS),
    "NO_loss",
    "NO_delta",
)
#: Features that need only noise predictions (no input gradients): 14 of the 26.
GRAY_BOX_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if not n.startswith(("GM_", "NO_")))
ACCESS_LEVELS = ("gray", "white")


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of every family; defaults are the paper's configuration (on the 1000-step grid)."""

    dl_t: int = 100
    dl_draws: int = 5
    secmi_t: int = 100
    secmi_k: int = 10
    pia_t: int = 200
    pia_p: float = 5.0
    multi_timesteps: tuple[int, ...] = MULTI_TIMESTEPS
    gm_mask_ratio: float = 0.2
    no_t: int = 100
    no_evals: int = 8
    no_max_step: float = 0.1

    def __post_init__(self) -> None:
        """Refuse a setting of the wrong type or range when it is made (a config file, an API call),
        before any model pass; `check_timesteps` compares the timesteps with the model's schedule."""
        from cdi.errors import OptionError
        from cdi.models.base import REFERENCE_TIMESTEPS as GRID_TIMESTEPS

        for name in ("dl_t", "secmi_t", "pia_t", "no_t"):
            _check_number(self, name, int, minimum=0)
        for name in ("dl_draws", "secmi_k", "no_evals"):
            _check_number(self, name, int, minimum=1)
        _check_number(self, "pia_p", float, minimum=0.0, strict=True)
        _check_number(self, "no_max_step", float, minimum=0.0, strict=True)
        _check_number(self, "gm_mask_ratio", float, minimum=0.0, strict=True)
        if self.gm_mask_ratio > 1.0:
            raise OptionError(f"feature setting gm_mask_ratio {self.gm_mask_ratio!r}: the share of masked pixels "
                              "must lie in (0, 1] (default 0.2)")
        timesteps = self.multi_timesteps
        if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Iterable):
            raise OptionError(f"feature setting multi_timesteps {timesteps!r}: give a list of timesteps, "
                              "e.g. [0, 100, ..., 900]")
        timesteps = tuple(timesteps)
        if len(timesteps) != len(MULTI_TIMESTEPS) or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in timesteps):
            raise OptionError(f"feature setting multi_timesteps {list(timesteps)!r}: give {len(MULTI_TIMESTEPS)} "
                              "non-negative integer timesteps (the GM_t / ML_t features are named after 10 of them)")
        object.__setattr__(self, "multi_timesteps", timesteps)
        named = {"dl_t": self.dl_t, "secmi_t": self.secmi_t, "pia_t": self.pia_t, "no_t": self.no_t,
                 **{f"multi_timesteps[{k}]": t for k, t in enumerate(timesteps)}}
        for name, t in named.items():
            if t >= GRID_TIMESTEPS:
                raise OptionError(f"feature setting {name} {t}: timesteps are on the paper's {GRID_TIMESTEPS}-step grid "
                                  f"(0 to {GRID_TIMESTEPS - 1}, mapped onto the model's own schedule); choose one below "
                                  f"{GRID_TIMESTEPS}")
        if self.secmi_t + self.secmi_k >= GRID_TIMESTEPS:
            raise OptionError(f"feature setting secmi_t {self.secmi_t} + secmi_k {self.secmi_k}: must stay below "
                              f"{GRID_TIMESTEPS} (SecMI steps from secmi_t to secmi_t + secmi_k)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_number(config: "FeatureConfig", name: str, kind: type, minimum: float, strict: bool = False) -> None:
    from cdi.errors import OptionError

    value = getattr(config, name)
    valid_type = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if valid_type and kind is float:
        valid_type = value == value and abs(value) != float("inf")  # not NaN or infinite
    if not valid_type or value < minimum or (strict and value == minimum):
        need = ("an integer" if kind is int else "a number") + (f" > {minimum:g}" if strict else f" >= {minimum:g}")
        raise OptionError(f"feature setting {name} {value!r}: must be {need} (default {FeatureConfig.__dataclass_fields__[name].default!r})")


@dataclass
class FeatureBatch:
    """What families see of a batch: clean latents, conditioning and the identity of each image."""

    z0: torch.Tensor
    cond: Any
    sha256: Sequence[str]
    seed: int
    _clean_eps: torch.Tensor | None = field(default=None, repr=False)

    def clean_eps(self, adapter: DiffusionAdapter) -> torch.Tensor:
        """eps_hat(z0, 0, c), computed once per batch: PIA's eps0 and the first call of SecMI's DDIM
        inversion are this same deterministic model call."""
        if self._clean_eps is None:
            self._clean_eps = adapter.eps_hat(self.z0, adapter.timestep(0), self.cond)
        return self._clean_eps


@dataclass
class FeatureOutput:
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) float32


def l2(x: torch.Tensor) -> torch.Tensor:
    """Per-image un-squared L2 norm over all C*h*w entries."""
    return x.flatten(1).norm(p=2, dim=1)


def lp(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.flatten(1).norm(p=p, dim=1)


class FeatureFamily(ABC):
    """One signal family. `names` lists the features it produces, `access` what it needs."""

    names: ClassVar[tuple[str, ...]]
    access: ClassVar[str]  # "gray" (noise predictions only) or "white" (input gradients)

    def __init__(self, config: FeatureConfig, wanted: Iterable[str] | None = None) -> None:
        """`wanted`: the features to produce (default all of `names`); a family spends no model call on
        a feature nobody asked for, so the engine matches the cost model (`cdi.search.passes_per_image`)."""
        self.config = config
        self.wanted = frozenset(self.names if wanted is None else set(wanted) & set(self.names))

    @abstractmethod
    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput: ...
