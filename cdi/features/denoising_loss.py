"""Denoising loss (DL): mean over R noise draws of ||eps_hat(q(z0, t, eps_r), t) - eps_r||_2. Lower = member."""

from __future__ import annotations

from cdi.features.base import FeatureBatch, FeatureFamily, FeatureOutput, Passes, count, l2, timestep
from cdi.models.base import DiffusionAdapter


class DenoisingLoss(FeatureFamily):
    names = ("DL",)
    access = "gray"
    settings = (timestep("dl_t", 100), count("dl_draws", 5))

    def passes(self) -> Passes:
        return Passes(forward=self.config.dl_draws)  # one forward per draw

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        t = adapter.timestep(self.config.dl_t)
        draws = [batch.noise(batch.z0, "DL", self.config.dl_t, draw)
                 for draw in range(self.config.dl_draws)]
        # One call per draw, or fewer larger ones with timestep batching (`batch.calls`); summed in draw order.
        predictions = batch.calls.eps_hat(adapter, [adapter.q(batch.z0, t, eps) for eps in draws],
                                          [t] * len(draws), batch.cond)
        total = 0.0
        for eps, e in zip(draws, predictions):
            total = total + l2(e - eps)
        return FeatureOutput({"DL": total / self.config.dl_draws})
