"""Latent statistics: the per-channel mean and standard deviation of each image's encoded latent z0.

Not a membership feature (it is not in `FEATURE_NAMES` and no scorer sees it): the shift guard
(`cdi.stats.shift`) uses it for latent models, whose encoder is part of the pipeline but not of the
suspected training and sees shifts (texture, compression) that pixel statistics can miss. It runs in
the extraction engine like any family, so it gets the device, the cache and the out-of-memory back-off;
it costs the encode only, which every feature list pays once.
"""

from __future__ import annotations

from cdi.features.base import FeatureBatch, FeatureFamily, FeatureOutput, Passes
from cdi.models.base import DiffusionAdapter

#: Latent channels the names cover (Stable Diffusion: 4, SD3 / FLUX: 16).
MAX_CHANNELS = 16


def latent_statistic_names(channels: int) -> tuple[str, ...]:
    """The columns of a latent with `channels` channels: latent_mean_0.., then latent_std_0.."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"latent statistics cover 1 to {MAX_CHANNELS} channels, not {channels}")
    return (*(f"latent_mean_{c}" for c in range(channels)), *(f"latent_std_{c}" for c in range(channels)))


class LatentStatistics(FeatureFamily):
    names = latent_statistic_names(MAX_CHANNELS)
    access = "gray"

    def passes(self) -> Passes:
        return Passes()  # the encode, which is not counted

    def compute(self, adapter: DiffusionAdapter, batch: FeatureBatch) -> FeatureOutput:
        z0 = batch.z0.flatten(2).float()
        mean, std = z0.mean(dim=2), z0.std(dim=2)
        out = {}
        for name in self.wanted:
            kind, channel = name.rsplit("_", 1)
            if int(channel) >= z0.shape[1]:
                raise ValueError(f"{name}: the latent has {z0.shape[1]} channels")
            out[name] = (mean if kind == "latent_mean" else std)[:, int(channel)]
        return FeatureOutput(out)
