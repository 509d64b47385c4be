"""Model adapters, chosen from a pipeline directory's model_index.json."""

from __future__ import annotations

import os
from pathlib import Path

from cdi.errors import ModelError
from cdi.models.base import DiffusionAdapter, ModelInfo
from cdi.models.dit import PIPELINE_ADAPTERS as _DIT_PIPELINES
from cdi.models.loading import fingerprint, read_model_index
from cdi.models.lora import apply_lora, is_lora_file, read_lora_file
from cdi.models.pixel_unet import PIPELINE_CLASSES as _PIXEL_PIPELINES
from cdi.models.pixel_unet import PixelUNetAdapter
from cdi.models.stable_diffusion import PIPELINE_ADAPTERS as _STABLE_DIFFUSION_PIPELINES

ADAPTERS: dict[str, type[DiffusionAdapter]] = {name: PixelUNetAdapter for name in _PIXEL_PIPELINES}
ADAPTERS.update(_STABLE_DIFFUSION_PIPELINES)  # text-to-image: needs the `latent` extra (transformers)
ADAPTERS.update(_DIT_PIPELINES)


def load_model(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    latent_sample_seed: int | None = None,
    lora: str | os.PathLike | None = None,
) -> DiffusionAdapter:
    """Load the suspect model at `path` (a diffusers pipeline directory), weights frozen, on the CPU.

    `latent_sample_seed`: latent models encode with a seeded VAE posterior sample instead of its mean.
    `lora`: a LoRA weights file (.safetensors; see `cdi.models.lora`) merged into the denoiser (and the text
    encoders, where it has layers for them); the fingerprint then covers base + LoRA and `info.files`
    lists the file as `lora/<file name>`. Needs peft (`pip install "cdi[lora]"`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a suspect's model never triggers a download
    root = Path(path)
    index = read_model_index(root)
    pipeline_class = index.get("_class_name", "")
    adapter_cls = ADAPTERS.get(pipeline_class)
    if adapter_cls is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise ModelError(
            f"{root / 'model_index.json'}: pipeline class {pipeline_class!r} is not supported; supported: {supported}"
        )
    lora_file = read_lora_file(lora, allow_pickle) if lora is not None else None  # cheap refusals first
    digest, files = fingerprint(root)
    adapter = adapter_cls.load(root, index, digest, files, allow_pickle, latent_sample_seed=latent_sample_seed)
    return adapter if lora_file is None else apply_lora(adapter, lora_file)


__all__ = ["ADAPTERS", "DiffusionAdapter", "ModelInfo", "is_lora_file", "load_model"]
