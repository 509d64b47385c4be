"""The adapter contract: the few operations every CDI feature is built from (method doc, section 2).

An adapter wraps one suspect model. Features only ever call `encode`, `alpha_bar`, `q`,
`eps_hat` and `ddim_step`, so a new model family needs nothing but a new adapter.
"""

from __future__ import annotations

import contextlib

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Sequence

import torch
from torch import nn

#: Feature timesteps are written on the 1000-step grid of the paper; `DiffusionAdapter.timestep`
#: maps them onto a model trained with another number of steps.
REFERENCE_TIMESTEPS = 1000


@dataclass(frozen=True)
class ModelInfo:
    """What an audit records about the suspect model."""

    path: str
    family: str
    pipeline_class: str
    fingerprint: str
    conditioning: str  # "none", "class" or "text"
    image_channels: int
    image_size: int
    num_train_timesteps: int
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (a LoRA: "lora/<file name>")
    lora: str | None = None  # resolved path of the LoRA file merged into the weights, if any


class DiffusionAdapter(nn.Module, ABC):
    """A suspect diffusion model seen through the operations CDI needs.

    Weights are frozen at construction: gradients are only ever taken w.r.t. inputs.
    """

    #: The diffusers LoRA loader (in `diffusers.loaders`) whose `lora_state_dict` converts kohya / A1111
    #: LoRA files for this family; None: PEFT and diffusers namings only (see `cdi.models.lora`).
    lora_converter: str | None = None

    def __init__(self, info: ModelInfo, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.info = info
        # float64 buffer so that sqrt(1 - alpha_bar) stays accurate near t = 0.
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)

    @property
    def denoiser(self) -> nn.Module:
        """The network `eps_hat` runs (UNet or transformer): the one half-precision extraction keeps in
        bf16/fp16 while it runs (encoders and VAE stay float32)."""
        for name in ("unet", "transformer"):
            module = getattr(self, name, None)
            if isinstance(module, nn.Module):
                return module
        raise AttributeError(f"{type(self).__name__} has no unet or transformer")

    def lora_targets(self) -> dict[str, nn.Module]:
        """The modules a LoRA file may adapt, keyed by the prefix of their tensors in the file (`unet`,
        `transformer`, `text_encoder`, ...); the denoiser first: tensors without a prefix go to it."""
        return {name: module for name in ("unet", "transformer")
                if isinstance(module := getattr(self, name, None), nn.Module)}

    @contextlib.contextmanager
    def full_precision(self, device_type: str):
        """Model calls inside run in float32 even in a bf16/fp16 extraction: autocast off and, where the
        denoiser's weights are held in half precision, the weights widened for the block (exactly: half
        -> float32 -> half is lossless). For the few steps whose result is a small difference of two
        model outputs, where half-precision rounding would swamp the difference."""
        module = self.denoiser
        dtype = next(module.parameters()).dtype
        with torch.autocast(device_type=device_type, enabled=False):
            if dtype == torch.float32:
                yield
                return
            with torch.inference_mode(False):  # weights made under inference mode could not serve autograd later
                module.to(torch.float32)
            try:
                yield
            finally:
                with torch.inference_mode(False):
                    module.to(dtype)

    # -- conditioning -----------------------------------------------------------------------
    @abstractmethod
    def condition(self, labels: Sequence[int | None], captions: Sequence[str | None]) -> Any:
        """Per-batch conditioning object passed unchanged to `eps_hat` (None if unconditional)."""

    def encoder_identity(self) -> Hashable | None:
        """Two adapters whose identities are equal and not None encode every image to the same bits, so an
        extraction over both (a target and its reference) encodes each batch once; None: not known to be shared."""
        return None

    # -- the contract -----------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, C, H, W) -> clean latent z0 (identity for pixel models)."""

    @abstractmethod
    def eps_hat(self, z_t: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
        """Noise prediction at integer model timestep `t`, differentiable w.r.t. `z_t`."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def timestep(self, t_reference: int) -> int:
        """Map a timestep of the paper's 1000-step grid onto this model's own grid."""
        if self.num_train_timesteps == REFERENCE_TIMESTEPS:
            return int(t_reference)
        scaled = round(t_reference * self.num_train_timesteps / REFERENCE_TIMESTEPS)
        return int(min(max(scaled, 0), self.num_train_timesteps - 1))

    def alpha_bar(self, t: int) -> torch.Tensor:
        """Cumulative product of (1 - beta) at model timestep t (0-indexed, as diffusers)."""
        return self.alphas_cumprod[t]

    def q(self, z0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion: sqrt(ab_t) z0 + sqrt(1 - ab_t) eps."""
        ab = self.alpha_bar(t)
        return (ab.sqrt() * z0 + (1 - ab).sqrt() * eps).to(z0.dtype)

    def ddim_step(self, z: torch.Tensor, s: int, s_next: int, cond: Any,
                  eps: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM step (eta = 0) from s to s_next, either direction; one eps_hat call, none
        when `eps` (eps_hat(z, s, cond), already computed) is given."""
        e = self.eps_hat(z, s, cond) if eps is None else eps
        ab_s, ab_n = self.alpha_bar(s), self.alpha_bar(s_next)
        x0_hat = (z - (1 - ab_s).sqrt() * e) / ab_s.sqrt()
        return (ab_n.sqrt() * x0_hat + (1 - ab_n).sqrt() * e).to(z.dtype)


def model_files(root: Path) -> list[Path]:
    """Weight and config files of a pipeline directory, in a stable order."""
    suffixes = {".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".txt", ".model"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
