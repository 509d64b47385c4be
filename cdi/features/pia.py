"""PIA and PIAN: proximal initialisation (Kong et al. 2024). Lower = member.

eps0 = eps_hat(z0, 0); z_t = q(z0, t, eps0); PIA = ||eps0 - eps_hat(z_t, t)||_p with t = 200, p = 5.
PIAN uses the normalised noise eps0~ = eps0 * sqrt(2/pi) / mean|eps0| instead of eps0, so that
mean|eps0~| = E|N(0, 1)| = sqrt(2/pi). The reference code inverts this constant (sqrt(pi/2)); cdi
uses the correct one. eps0 is shared: 3 model calls for both features, 2 when SecMI runs in the
same pass (its first inversion call is eps0).
"""

from __future__ import annotations

import math

from cdi.features.base import FeatureBatch, FeatureFamily, FeatureOutput, Passes, lp, positive, timestep
from cdi.models.base import DiffusionAdapter


class PIA(FeatureFamily):
    names = ("PIA", "PIAN")
    access = "gray"
    settings = (timestep("pia_t", 200), positive("pia_p", 5.0))

    def passes(self) -> Passes:
        # eps0 is the batch's clean_eps; then one forward per wanted feature.
        return Passes(forward=len(self.wanted), shared=frozenset({"clean_eps"}))

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        t, p = adapter.timestep(self.config.pia_t), self.config.pia_p
        eps0 = batch.clean_eps(adapter)
        noises = {}
        if "PIA" in self.wanted:
            noises["PIA"] = eps0
        if "PIAN" in self.wanted:
            mean_abs = eps0.abs().flatten(1).mean(dim=1).clamp_min(1e-12)
            noises["PIAN"] = eps0 * (math.sqrt(2.0 / math.pi) / mean_abs).view(-1, *([1] * (eps0.dim() - 1)))
        # Both queries at t: two calls, or one of twice the rows with timestep batching (`batch.calls`).
        predictions = batch.calls.eps_hat(adapter, [adapter.q(batch.z0, t, e) for e in noises.values()],
                                          [t] * len(noises), batch.cond)
        return FeatureOutput({name: lp(e - e_hat, p) for (name, e), e_hat in zip(noises.items(), predictions)})
