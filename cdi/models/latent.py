"""What every latent diffusion pipeline shares: the VAE encoder, the latent grid and its size limit.

`encode` maps an image to the clean latent z0 once per image (method doc, section 2): by default the
mean of the VAE posterior, optionally a seeded posterior sample, times `vae.config.scaling_factor`
(after subtracting `shift_factor` where a VAE has one). A sampled z0 depends only on the seed and the
image's pixels, never on the batch it is encoded in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Hashable

import torch

from cdi.errors import ModelError
from cdi.hashing import sha256_text
from cdi.models.base import DiffusionAdapter, ModelInfo
from cdi.models.loading import MAX_IMAGE_SIZE, read_config
from cdi.models.prediction import to_epsilon


def max_latent_size(root: Path) -> tuple[int, str]:
    """The largest latent `sample_size` a denoiser over the pipeline's VAE may have (`MAX_IMAGE_SIZE` pixels)
    and its unit, from vae/config.json, read before anything is built."""
    factor = 2 ** (len(read_config(root / "vae").get("block_out_channels") or [64]) - 1)
    return max(MAX_IMAGE_SIZE // factor, 1), f"latent positions of {factor} pixels"


def sample_size(config: Any) -> int:
    """A denoiser's (square) latent resolution from its config."""
    size = config.sample_size
    return int(size if isinstance(size, int) else size[0])


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent position: each VAE block after the first halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sampled_fingerprint(fingerprint: str, latent_sample_seed: int | None) -> str:
    """Features of a sampled encoding must not share cache entries with those of the posterior mean."""
    if latent_sample_seed is None:
        return fingerprint
    return sha256_text(f"{fingerprint}\nencode=posterior-sample/{int(latent_sample_seed)}")


class LatentAdapter(DiffusionAdapter):
    """A denoiser over the latents of an `AutoencoderKL`; subclasses add conditioning and `eps_hat`."""

    def __init__(
        self,
        info: ModelInfo,
        vae: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        latent_sample_seed: int | None = None,
    ) -> None:
        super().__init__(info, alphas_cumprod)
        self.vae = vae.eval().requires_grad_(False)
        self.vae.enable_slicing()  # one image at a time through the encoder: bounded memory at any batch size
        self.prediction_type = prediction_type
        self.latent_sample_seed = latent_sample_seed

    @property
    def latent_channels(self) -> int:
        """Channels of the encoded latent z0."""
        return int(self.vae.config.latent_channels)

    @staticmethod
    def check_latent_channels(root: Path, denoiser: str, in_channels: int, vae: Any) -> None:
        if int(in_channels) != int(vae.config.latent_channels):
            raise ModelError(
                f"{root / denoiser / 'config.json'}: in_channels {in_channels} differs from the VAE's latent_channels "
                f"{vae.config.latent_channels} ({root / 'vae' / 'config.json'}); the pipeline's components do not fit"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # The VAE runs in float32 whatever the autocast: SD-family VAEs overflow in float16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            posterior = self.vae.encode(x.float()).latent_dist
            if self.latent_sample_seed is None:
                z0 = posterior.mean
            else:
                z0 = posterior.mean + posterior.std * self._posterior_noise(x, posterior.mean)
            config = self.vae.config
            if getattr(config, "shift_factor", None) is not None:
                z0 = z0 - config.shift_factor
            return z0 * config.scaling_factor

    def encoder_identity(self) -> Hashable | None:
        """The VAE's files (by sha256; a LoRA never adapts the VAE) and how a latent is drawn from its posterior."""
        vae = tuple(sorted((name, digest) for name, digest in self.info.files.items() if name.startswith("vae/")))
        return (type(self).encode.__qualname__, vae, self.latent_sample_seed) if vae else None

    def _posterior_noise(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise per image, seeded from (latent_sample_seed, the image's pixels)."""
        draws = []
        for image in x.detach().float().cpu():
            digest = hashlib.sha256(f"cdi/encode/{self.latent_sample_seed}/".encode())
            digest.update(image.contiguous().numpy().tobytes())
            seed = int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            draws.append(torch.randn(like.shape[1:], generator=generator, dtype=torch.float32))
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)

    def as_epsilon(self, output: torch.Tensor, z_t: torch.Tensor, t: int) -> torch.Tensor:
        """Keep the first C channels (learned-variance models predict 2C), then read the output as epsilon."""
        return to_epsilon(output[:, : z_t.shape[1]], z_t, self.alpha_bar(t), self.prediction_type)

    def timesteps(self, z_t: torch.Tensor, t: int) -> torch.Tensor:
        """The integer timestep as a (B,) tensor on the latents' device."""
        return torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
