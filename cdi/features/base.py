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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
