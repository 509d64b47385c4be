"""Multiple loss (ML_t) and gradient masking (GM_t) over t = 0, 100, ..., 900, one shared noise draw.

ML_t = ||eps_hat(z_t, t) - eps||_2 with z_t = q(z0, t, eps).
GM_t (CDI paper):
  a) g = d ||eps_hat(z_t, t) - eps||_2 / d z_t, per image (the batch loss is a sum of per-image
     losses, so each image's gradient is its own);
  b) M = the floor(ratio * D) entries of largest |g| per image (D = C*h*w);
  c) z_m = M * eps + (1 - M) * z0 (the reference code's form: the clean z0 outside the mask);
  d) GM_t = ||M * (eps - z0) - M * eps_hat(z_m, t)||_2.
ML_t is exactly the forward of step a), so `GradientMasking` yields ML_t at no extra cost.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from cdi.errors import OptionError
from cdi.features.base import (
    GRID_TIMESTEPS,
    FeatureBatch,
    FeatureFamily,
    FeatureOutput,
    Passes,
    l2,
    positive,
    timesteps,
)
from cdi.models.base import DiffusionAdapter

#: The timesteps GM_t and ML_t are named after (on the paper's 1000-step grid).
MULTI_TIMESTEPS: tuple[int, ...] = tuple(range(0, GRID_TIMESTEPS, 100))
SHARED_NOISE = "GM_ML"
#: Read by both families: one declaration, so the two cannot disagree.
TIMESTEPS_SETTING = timesteps("multi_timesteps", MULTI_TIMESTEPS,
                              why=f"the GM_t / ML_t features are named after {len(MULTI_TIMESTEPS)} of them")


def top_fraction_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per image, 1 on the floor(ratio * D) entries of largest |scores|, 0 elsewhere."""
    flat = scores.abs().flatten(1)
    k = int(ratio * flat.shape[1])
    mask = torch.zeros_like(flat)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1).indices, 1.0)
    return mask.view_as(scores)


def _check_timesteps(family: FeatureFamily) -> None:
    """A wanted GM_t / ML_t must be computed: its t must be one of the `multi_timesteps` setting."""
    computed = set(family.config.multi_timesteps)
    for name in sorted(family.wanted):
        t = int(name.split("_", 1)[1])
        if t not in computed:
            raise OptionError(f"feature {name}: its timestep {t} is not in the feature setting multi_timesteps "
                              f"{list(family.config.multi_timesteps)}; add it there or leave {name} out")


class MultipleLoss(FeatureFamily):
    names = tuple(f"ML_{t}" for t in MULTI_TIMESTEPS)
    access = "gray"
    settings = (TIMESTEPS_SETTING,)

    def __init__(self, config: Any, wanted: Iterable[str] | None = None) -> None:
        super().__init__(config, wanted)
        _check_timesteps(self)

    def passes(self) -> Passes:
        return Passes(forward=sum(f"ML_{t}" in self.wanted for t in self.config.multi_timesteps))

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        eps = batch.noise(batch.z0, SHARED_NOISE)
        wanted = [t_ref for t_ref in self.config.multi_timesteps if f"ML_{t_ref}" in self.wanted]
        ts = [adapter.timestep(t_ref) for t_ref in wanted]
        # One model call per timestep, or fewer larger ones with timestep batching (`batch.calls`).
        predictions = batch.calls.eps_hat(adapter, [adapter.q(batch.z0, t, eps) for t in ts], ts, batch.cond)
        return FeatureOutput({f"ML_{t_ref}": l2(e - eps) for t_ref, e in zip(wanted, predictions)})


class GradientMasking(FeatureFamily):
    names = (*(f"GM_{t}" for t in MULTI_TIMESTEPS), *MultipleLoss.names)
    access = "white"
    settings = (TIMESTEPS_SETTING, positive("gm_mask_ratio", 0.2, at_most=1.0, what="the share of masked pixels"))
    fused = {f"ML_{t}": f"GM_{t}" for t in MULTI_TIMESTEPS}  # ML_t is the forward of GM_t's step a)

    def __init__(self, config: Any, wanted: Iterable[str] | None = None) -> None:
        super().__init__(config, wanted)
        _check_timesteps(self)

    def passes(self) -> Passes:
        # Per GM_t: the gradient's forward+backward (a), the masked forward (d); ML_t comes with (a).
        n = sum(f"GM_{t}" in self.wanted for t in self.config.multi_timesteps)
        return Passes(forward=n, forward_backward=n)

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        z0 = batch.z0
        eps = batch.noise(z0, SHARED_NOISE)
        wanted = [t_ref for t_ref in self.config.multi_timesteps if f"GM_{t_ref}" in self.wanted]
        ts = [adapter.timestep(t_ref) for t_ref in wanted]
        # a) every timestep's forward+backward (one call each, or fewer larger ones: `batch.calls`) ...
        losses, grads = batch.calls.loss_gradients(adapter, [adapter.q(z0, t, eps).detach() for t in ts], ts,
                                                   batch.cond, [eps] * len(ts))
        out = {f"ML_{t_ref}": loss for t_ref, loss in zip(wanted, losses) if f"ML_{t_ref}" in self.wanted}
        masks = [top_fraction_mask(grad, self.config.gm_mask_ratio) for grad in grads]
        # ... then every timestep's masked forward (d).
        with torch.no_grad():
            masked = [mask * eps + (1 - mask) * z0 for mask in masks]
            predictions = batch.calls.eps_hat(adapter, masked, ts, batch.cond)
            for t_ref, mask, e in zip(wanted, masks, predictions):
                out[f"GM_{t_ref}"] = l2(mask * (eps - z0) - mask * e)
        return FeatureOutput(out)
