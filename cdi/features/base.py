"""The contract every feature family keeps: `Family(config, wanted).compute(adapter, batch) -> FeatureOutput`.

A family is one module holding one `FeatureFamily` subclass, which declares
- `names`: the features it produces, in the paper's index order (method doc, section 3);
- `access`: "gray" (noise predictions only) or "white" (input gradients);
- `settings`: the `FeatureConfig` fields it reads, each a `Setting` with its default and its check;
- `passes()`: the model passes one image costs for the wanted features under the settings;
- `compute(adapter, batch)`: one (B,) float tensor per wanted feature.
`cdi.features.registry` adds the declarations up: `FEATURE_NAMES`, the gray-box list, `FeatureConfig`,
the plan of a feature list and its cost (`passes_per_image`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from cdi.errors import OptionError
from cdi.features.batching import UNBATCHED, ModelCalls
from cdi.features.seeded_noise import image_noise
from cdi.models.base import REFERENCE_TIMESTEPS as GRID_TIMESTEPS
from cdi.models.base import DiffusionAdapter



@dataclass(frozen=True)
class Setting:
    """One `FeatureConfig` field a family reads: its name, default and type annotation, and `check`,
    which returns the value to store (a list of timesteps as a tuple) or raises `OptionError`."""

    name: str
    default: Any
    annotation: str
    check: Callable[[Any], Any] = field(repr=False, compare=False)


def timestep(name: str, default: int) -> Setting:
    """A timestep on the paper's 1000-step grid."""

    def check(value: Any) -> int:
        _check_number(name, value, int, default, minimum=0)
        _check_on_grid(name, value)
        return value

    return Setting(name, default, "int", check)


def count(name: str, default: int) -> Setting:
    """A number of draws, steps or evaluations: an integer >= 1."""

    def check(value: Any) -> int:
        _check_number(name, value, int, default, minimum=1)
        return value

    return Setting(name, default, "int", check)


def positive(name: str, default: float, at_most: float | None = None, what: str = "") -> Setting:
    """A finite number > 0; with `at_most`, also <= at_most (`what` names the quantity in the message)."""

    def check(value: Any) -> float:
        _check_number(name, value, float, default, minimum=0.0, strict=True)
        if at_most is not None and value > at_most:
            raise OptionError(f"feature setting {name} {value!r}: {what} must lie in (0, {at_most:g}] "
                              f"(default {default!r})")
        return value

    return Setting(name, default, "float", check)


def timesteps(name: str, default: tuple[int, ...], why: str) -> Setting:
    """A list of len(default) timesteps on the grid, stored as a tuple; `why` says why that many."""

    def check(value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise OptionError(f"feature setting {name} {value!r}: give a list of timesteps, "
                              f"e.g. [{default[0]}, {default[1]}, ..., {default[-1]}]")
        value = tuple(value)
        if len(value) != len(default) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
            raise OptionError(f"feature setting {name} {list(value)!r}: give {len(default)} "
                              f"non-negative integer timesteps ({why})")
        for k, t in enumerate(value):
            _check_on_grid(f"{name}[{k}]", t)
        return value

    return Setting(name, tuple(default), "tuple[int, ...]", check)


def _check_number(name: str, value: Any, kind: type, default: Any, minimum: float, strict: bool = False) -> None:
    valid_type = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if valid_type and kind is float:
        valid_type = value == value and abs(value) != float("inf")  # not NaN or infinite
    if not valid_type or value < minimum or (strict and value == minimum):
        need = ("an integer" if kind is int else "a number") + (f" > {minimum:g}" if strict else f" >= {minimum:g}")
        raise OptionError(f"feature setting {name} {value!r}: must be {need} (default {default!r})")


def _check_on_grid(name: str, t: int) -> None:
    if t >= GRID_TIMESTEPS:
        raise OptionError(f"feature setting {name} {t}: timesteps are on the paper's {GRID_TIMESTEPS}-step grid "
                          f"(0 to {GRID_TIMESTEPS - 1}, mapped onto the model's own schedule); choose one below "
                          f"{GRID_TIMESTEPS}")


@dataclass(frozen=True)
class Passes:
    """Model passes one image costs: `forward` denoiser calls without a backward, `forward_backward` calls
    followed by one backward pass through the denoiser (an input gradient), and `shared`: the calls of
    `FeatureBatch` it uses, which a batch makes once for all families (each one forward, e.g. `clean_eps`).
    The encode is not counted (every feature list pays it once)."""

    forward: int = 0
    forward_backward: int = 0
    shared: frozenset[str] = frozenset()

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.forward_backward + other.forward_backward,
                      self.shared | other.shared)

    @property
    def forwards(self) -> int:
        """Every denoiser forward, shared ones once."""
        return self.forward + self.forward_backward + len(self.shared)

    @property
    def total(self) -> int:
        """The search's cost: forwards plus backwards (a forward+backward pass counts two)."""
        return self.forwards + self.forward_backward


@dataclass
class FeatureBatch:
    """What families see of a batch: clean latents, conditioning and the identity of each image."""

    z0: torch.Tensor
    cond: Any
    sha256: Sequence[str]
    seed: int
    #: How a family makes its several same-shaped model calls (`cdi.features.batching`): unbatched by default.
    calls: ModelCalls = field(default=UNBATCHED, repr=False)
    #: Seeded noise already drawn for this batch's images, by (feature, t, draw, shape, dtype, device): shared
    #: by every family of the batch and, in a pass over several models, by every model (common random numbers).
    noise_drawn: dict | None = field(default=None, repr=False)
    _clean_eps: torch.Tensor | None = field(default=None, repr=False)

    def noise(self, like: torch.Tensor, feature: str, t: int | str = "-", draw: int = 0) -> torch.Tensor:
        """`cdi.features.seeded_noise.image_noise` of this batch's images, drawn once per batch (and pass): a
        fresh copy each call, so a family may change it in place. The same bits as drawing it anew."""
        if self.noise_drawn is None:
            return image_noise(like, self.sha256, self.seed, feature, t, draw)
        key = (feature, t, draw, tuple(like.shape), like.dtype, like.device)
        with torch.inference_mode(False):  # a plain tensor, usable by gradient families after gray ones
            drawn = self.noise_drawn.get(key)
            if drawn is None:
                drawn = self.noise_drawn[key] = image_noise(like, self.sha256, self.seed, feature, t, draw)
            return drawn.clone()

    def clean_eps(self, adapter: DiffusionAdapter) -> torch.Tensor:
        """eps_hat(z0, 0, c), computed once per batch: PIA's eps0 and the first call of SecMI's DDIM
        inversion are this same deterministic model call (shared call "clean_eps" of `Passes`)."""
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
    """One signal family: the features it produces, what it needs, what it reads and what it costs.

    `fused` maps a feature another family defines (and lists in `names` here too) to the feature of this
    family whose passes yield it for free: this family produces it only beside that feature (ML_t beside
    GM_t). Every other name is this family's own (`own_names`): its access level is this family's, and
    this family's settings are the ones that change it.
    """

    names: ClassVar[tuple[str, ...]]
    access: ClassVar[str]  # "gray" (noise predictions only) or "white" (input gradients)
    settings: ClassVar[tuple[Setting, ...]] = ()
    fused: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Any, wanted: Iterable[str] | None = None) -> None:
        """`config`: a `FeatureConfig`; `wanted`: the features to produce (default all of `names`; at least
        one must be `claim`ed). A family spends no model call on a feature nobody asked for, so `passes()`
        is what `compute` costs."""
        self.config = config
        self.wanted = frozenset(self.names if wanted is None else self.claim(wanted))
        if not self.wanted:
            raise ValueError(f"{type(self).__name__} produces none of {sorted(wanted or ())}")

    @classmethod
    def own_names(cls) -> tuple[str, ...]:
        return tuple(n for n in cls.names if n not in cls.fused)

    @classmethod
    def claim(cls, wanted: Iterable[str]) -> frozenset[str]:
        """Which of `wanted` this family produces: its own, and a fused one where its host is wanted too."""
        wanted = set(wanted)
        return frozenset(n for n in cls.names if n in wanted and cls.fused.get(n, n) in wanted)

    @classmethod
    def check_settings(cls, config: Any) -> None:
        """Rules between settings (each `Setting` checks its own value); raise `OptionError`."""

    @abstractmethod
    def passes(self) -> Passes:
        """Model passes per image of `compute` for `self.wanted` under `self.config`."""

    @abstractmethod
    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput: ...
