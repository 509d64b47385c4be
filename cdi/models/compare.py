"""Can a reference model calibrate the audited model's features? (method doc, section 8)

A reference's features are compared image by image with the target's, computed with the same seeded
noise. That is only meaningful when both models see the same z0 grid and the same noise levels:
the same image size and channels, the same latent space (latent channels and scaling of the VAE)
and the same diffusion schedule (number of training timesteps and alpha_bar). A reference that *is*
the target (same fingerprint) would cancel every feature to zero.
"""

from __future__ import annotations

import logging

import torch

from cdi.errors import ModelError
from cdi.models.base import DiffusionAdapter

log = logging.getLogger(__name__)


def _latent_space(adapter: DiffusionAdapter) -> tuple | None:
    vae = getattr(adapter, "vae", None)
    if vae is None:
        return None
    config = vae.config
    return (int(config.latent_channels), float(config.scaling_factor), getattr(config, "shift_factor", None))


def _vae_files(adapter: DiffusionAdapter) -> dict[str, str]:
    return {name: digest for name, digest in adapter.info.files.items() if name.startswith("vae/")}


def check_comparable(target: DiffusionAdapter, reference: DiffusionAdapter, option: str = "--reference-model") -> None:
    """Refuse (ModelError, one line naming the reference and the fix) a reference that cannot calibrate."""
    t, r = target.info, reference.info
    where = f"{option} {r.path}"
    if r.fingerprint == t.fingerprint:
        raise ModelError(f"{where}: is the audited model itself (same fingerprint {r.fingerprint[:12]}); "
                         "a reference must be a model that was not trained on the suspect images, e.g. the base model")
    differences = []
    if (r.image_size, r.image_channels) != (t.image_size, t.image_channels):
        differences.append(f"image size/channels {r.image_size}px x {r.image_channels} vs the model's "
                           f"{t.image_size}px x {t.image_channels}")
    if _latent_space(reference) != _latent_space(target):
        differences.append(f"latent space {_latent_space(reference) or 'pixels'} vs the model's "
                           f"{_latent_space(target) or 'pixels'} (latent channels, VAE scaling)")
    if r.num_train_timesteps != t.num_train_timesteps:
        differences.append(f"{r.num_train_timesteps} training timesteps vs the model's {t.num_train_timesteps}")
    elif not torch.allclose(reference.alphas_cumprod, target.alphas_cumprod, rtol=1e-5, atol=1e-7):
        differences.append("another noise schedule (alphas_cumprod of scheduler_config.json differ)")
    if differences:
        raise ModelError(f"{where}: cannot be compared with the audited model ({'; '.join(differences)}); "
                         "use a reference of the same architecture and schedule, e.g. the base model of a fine-tune")
    if _latent_space(target) is not None and _vae_files(reference) != _vae_files(target):
        log.warning("%s: its VAE weights differ from the audited model's; each model encodes the images with "
                    "its own VAE, so the calibration also removes differences of encoding", where)


__all__ = ["check_comparable"]
