"""Pixel-space diffusers models: a `UNet2DModel` denoiser with a DDPM/DDIM-family scheduler.

Unconditional, or class-conditional when the UNet has a class embedding (`num_class_embeds`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from cdi.errors import ImageSetError, ModelError
from cdi.models.base import DiffusionAdapter, ModelInfo
from cdi.models.loading import weight_format

PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")


def _scheduler_alphas(root: Path) -> tuple[torch.Tensor, str]:
    import diffusers

    config_path = root / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; the pipeline needs a DDPM/DDIM-family scheduler")
    config = json.loads(config_path.read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ModelError(f"{config_path}: unknown scheduler class {config.get('_class_name')!r}")
    scheduler = cls.from_config(config)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelError(
            f"{config_path}: scheduler {cls.__name__} has no alphas_cumprod; "
            "cdi needs a DDPM/DDIM-family (variance-preserving) scheduler"
        )
    return torch.as_tensor(alphas), config.get("prediction_type", "epsilon")


class PixelUNetAdapter(DiffusionAdapter):
    family = "pixel_unet"

    def __init__(self, info: ModelInfo, unet: torch.nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(info, alphas_cumprod)
        self.unet = unet.eval().requires_grad_(False)
        self.num_classes = unet.config.num_class_embeds

    @classmethod
    def load(cls, root: Path, index: dict, fingerprint: str, files: dict[str, str], allow_pickle: bool) -> "PixelUNetAdapter":
        from diffusers import UNet2DModel

        unet_dir = root / "unet"
        if not (unet_dir / "config.json").is_file():
            raise ModelError(f"{unet_dir}: missing unet/config.json; the pipeline needs a UNet2DModel component")
        alphas, prediction_type = _scheduler_alphas(root)
        if prediction_type != "epsilon":
            raise ModelError(
                f"{root / 'scheduler' / 'scheduler_config.json'}: prediction_type {prediction_type!r} is not supported "
                "for pixel models yet; cdi needs an epsilon-prediction model"
            )
        use_safetensors = weight_format(unet_dir, allow_pickle)
        unet = UNet2DModel.from_pretrained(root, subfolder="unet", use_safetensors=use_safetensors)
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
        return cls(info, unet, alphas)

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

    def eps_hat(self, z_t: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
        timesteps = torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
        out = self.unet(z_t, timesteps, class_labels=cond).sample
        # Learned-variance models predict 2C channels: the first C are epsilon.
        return out[:, : z_t.shape[1]]
