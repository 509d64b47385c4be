"""SecMI_stat: error of a deterministic DDIM round trip near t = 100 (Duan et al. 2023). Lower = member.

1. DDIM inversion of z0 along 0 -> k -> 2k -> ... -> t (eps_hat queried at 0, k, ..., t - k): z~_t.
2. One step up and back: z^_t = DDIM(DDIM(z~_t, t -> t + k), t + k -> t).
3. Feature ||z~_t - z^_t||_2. With t = 100, k = 10: 12 model calls (11 beside PIA, which shares the
   first); step 2 always in float32.
(The original SecMI stops one step earlier, 90 -> 100 -> 90; cdi follows the CDI configuration.)
"""

from __future__ import annotations

from typing import Any

from cdi.errors import OptionError
from cdi.features.base import (
    GRID_TIMESTEPS,
    FeatureBatch,
    FeatureFamily,
    FeatureOutput,
    Passes,
    count,
    l2,
    timestep,
)
from cdi.models.base import DiffusionAdapter


class SecMI(FeatureFamily):
    names = ("SecMI",)
    access = "gray"
    settings = (timestep("secmi_t", 100), count("secmi_k", 10))

    @classmethod
    def check_settings(cls, config: Any) -> None:
        if config.secmi_t + config.secmi_k >= GRID_TIMESTEPS:
            raise OptionError(f"feature setting secmi_t {config.secmi_t} + secmi_k {config.secmi_k}: must stay below "
                              f"{GRID_TIMESTEPS} (SecMI steps from secmi_t to secmi_t + secmi_k)")
        if config.secmi_t % config.secmi_k:
            # the DDIM inversion walks 0, k, 2k, ...: it would overshoot secmi_t, then round-trip at secmi_t
            raise OptionError(f"feature setting secmi_t {config.secmi_t}: must be a multiple of secmi_k "
                              f"{config.secmi_k} (the inversion reaches secmi_t in steps of secmi_k; default 100 and 10)")

    def passes(self) -> Passes:
        steps = len(range(0, self.config.secmi_t, self.config.secmi_k))  # inversion calls
        # The first inversion call is the batch's clean_eps (PIA's eps0); then the step up and back.
        return Passes(forward=max(steps - 1, 0) + 2, shared=frozenset({"clean_eps"} if steps else ()))

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        t_end, k = self.config.secmi_t, self.config.secmi_k
        z = batch.z0
        for s in range(0, t_end, k):
            first = batch.clean_eps(adapter) if s == 0 else None  # PIA's eps0 when both run
            z = adapter.ddim_step(z, adapter.timestep(s), adapter.timestep(s + k), batch.cond, eps=first)
        t, t_up = adapter.timestep(t_end), adapter.timestep(t_end + k)
        # The feature is a small difference of two nearby latents: under bf16 autocast the round trip's
        # rounding (~1e-2 relative) is as large as the difference itself (measured: median 60 % error on
        # the demo). An error in z~_t enters both latents alike, so only these two calls need float32.
        with adapter.full_precision(z.device.type):
            z = z.float()
            z_up = adapter.ddim_step(z, t, t_up, batch.cond)
            z_back = adapter.ddim_step(z_up, t_up, t, batch.cond)
        return FeatureOutput({"SecMI": l2(z - z_back)})
