"""The models the speed benchmarks run on: the bundled demo DDPM (0.70 M parameters, 16x16, one channel) with
half member, half held-out images, and the DDPM-CIFAR10 UNet shape with random weights and random images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdi.data import ImageRecord, discover_images
from cdi.models import DiffusionAdapter, load_model

REPO = Path(__file__).resolve().parents[1]

#: The DDPM CIFAR-10 UNet of Ho et al. (2020) as diffusers publishes it (google/ddpm-cifar10-32): 35.7 M
#: parameters, one attention head of 256 channels at 16x16. diffusers' own default, 8 channels per head,
#: would give 32 heads of 8 channels: the same parameters, but an attention whose softmax dominates the time.
DDPM_CIFAR10_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)


def demo_model(args: argparse.Namespace) -> tuple[DiffusionAdapter, list[ImageRecord]] | None:
    """The bundled 16x16 grayscale DDPM and half members, half held-out images (None if not built yet)."""
    root = Path(args.demo_model)
    if not (root / "model_index.json").is_file():
        print(f"demo: skipped, {root} has no model yet (build it: mlflow run mlflow_projects/demo_target "
              "--env-manager local)", file=sys.stderr)
        return None
    members = discover_images(REPO / "demo" / "members", "suspect")
    heldout = discover_images(REPO / "demo" / "heldout", "control")
    half = args.demo_images // 2
    return load_model(root), members[: args.demo_images - half] + heldout[:half]


def cifar_model(args: argparse.Namespace, workdir: Path) -> tuple[DiffusionAdapter, list[ImageRecord]]:
    """The 35.7 M-parameter DDPM-CIFAR10 UNet with random weights, saved and loaded like a real suspect."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    torch.manual_seed(args.seed)
    unet = UNet2DModel(**DDPM_CIFAR10_UNET)
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.save_pretrained(workdir / "cifar-model", safe_serialization=True)
    images = workdir / "cifar-images"
    images.mkdir()
    rng = np.random.default_rng(args.seed)
    for i in range(args.n_images):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"random_{i:03d}.png")
    return load_model(workdir / "cifar-model"), discover_images(images, "suspect")
