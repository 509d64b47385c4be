"""Random-weight pipelines with the architectures of real suspects, built offline for speed and memory checks.

    python benchmarks/random_pipelines.py sd15 /tmp/sd15          # Stable Diffusion 1.5 shapes, 512 px
    python benchmarks/random_pipelines.py dit-xl-2-256 /tmp/dit   # DiT-XL/2, 256 px, 1000 classes

Random weights cost exactly what trained ones cost, so timings and memory are those of the real model;
features and p-values are meaningless. Nothing is downloaded: every component is built from a config,
the text tokenizer from a small in-memory vocabulary (letters only: prompts cost as many tokens as
letters, padded to 77 as in SD). Saved with safetensors, loadable by `cdi.models.load_model` and
`benchmarks/gpu_check.py --model`.

Shapes: SD 1.5 = UNet2DConditionModel (320, 640, 1280, 1280) channels, cross-attention 768, 64 x 64 x 4
latents (860 M parameters); AutoencoderKL (128, 256, 512, 512) (84 M); CLIP ViT-L/14 text encoder,
12 layers of 768 (123 M). DiT-XL/2 = 28 blocks of 1152 (16 heads), patch 2 over 32 x 32 x 4 latents, learned
sigma (750 M in diffusers' layout, where every block carries its own timestep and class embedder), the same
VAE.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Sequence

import torch

TEXT_LENGTH = 77
ARCHITECTURES = ("sd15", "dit-xl-2-256")


def sd_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def letter_tokenizer():
    """CLIP BPE over single letters: no merges, so every letter is a token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)


def save_sd15(path: Path) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=sd_vae(512), text_encoder=text_encoder, tokenizer=letter_tokenizer(),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def save_dit_xl_2_256(path: Path) -> Path:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                        num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    pipeline = DiTPipeline(transformer=transformer, vae=sd_vae(256), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipeline.save_pretrained(path, safe_serialization=True)
    index_path = path / "model_index.json"  # the published DiT repositories carry the class names here
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(1000)}
    index_path.write_text(json.dumps(index, indent=2))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("architecture", choices=ARCHITECTURES)
    parser.add_argument("output", type=Path, help="pipeline directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists; give a new directory")
    torch.manual_seed(args.seed)
    build = save_sd15 if args.architecture == "sd15" else save_dit_xl_2_256
    build(args.output)
    print(f"wrote {args.architecture} with random weights to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
