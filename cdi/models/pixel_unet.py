"""Pixel-space diffusers models: a `UNet2DModel` denoiser with a DDPM/DDIM-family scheduler.

Unconditional, or class-conditional when the UNet has a class embedding (`num_class_embeds`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Sequence

import torch

from cdi.errors import ImageSetError
from cdi.models.base import DiffusionAdapter, ModelInfo
from cdi.models.loading import MAX_IMAGE_SIZE, load_component
from cdi.models.prediction import read_scheduler, to_epsilon

PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")


class PixelUNetAdapter(DiffusionAdapter):
    family = "pixel_unet"

    def __init__(
        self, info: ModelInfo, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"
    ) -> None:
        super().__init__(info, alphas_cumprod)
        self.unet = unet.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.num_classes = unet.config.num_class_embeds

    @classmethod
    def load(
        cls, root: Path, index: dict, fingerprint: str, files: dict[str, str], allow_pickle: bool, **_: object
    ) -> "PixelUNetAdapter":
        from diffusers import UNet2DModel

        alphas, prediction_type = read_scheduler(root)
        unet = load_component(root, "unet", UNet2DModel, allow_pickle, MAX_IMAGE_SIZE)
        config = unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else int(config.sample_size[0])
        info = ModelInfo(
            path=str(root),
            family=cls.family,
            pipeline_class=index.get("_class_name", "?"),
            fingerprint=fingerprint,
            conditioning="class" if config.num_class_embeds else "none",
            image_channels=int(config.in_channels),
            image_size=int(size),
            num_train_timesteps=int(alphas.shape[0]),
            files=files,
        )
        return cls(info, unet, alphas, prediction_type)

    def condition(self, labels: Sequence[int | None], captions: Sequence[str | None]) -> Any:
        if not self.num_classes:
            return None
        if any(label is None for label in labels):
            raise ImageSetError(
                f"{self.info.path}: class-conditional model ({self.num_classes} classes) but some images have no "
                "label; give labels in metadata.jsonl (file_name, label) beside the images"
            )
        bad = [label for label in labels if not 0 <= int(label) < self.num_classes]
        if bad:
            raise ImageSetError(f"class label {bad[0]} outside 0..{self.num_classes - 1} of {self.info.path}")
        return torch.tensor([int(label) for label in labels], dtype=torch.long, device=self.alphas_cumprod.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encoder_identity(self) -> Hashable:
        return "pixels"  # every pixel model's "encoder" is the identity

    def eps_hat(self, z_t: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
        timesteps = torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
        out = self.unet(z_t, timesteps, class_labels=cond).sample
        # Learned-variance models predict 2C channels: the first C are the prediction.
        return to_epsilon(out[:, : z_t.shape[1]], z_t, self.alpha_bar(t), self.prediction_type)
