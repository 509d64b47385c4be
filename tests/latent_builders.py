"""Builders of tiny random-weight latent pipelines (Stable Diffusion, SDXL, DiT), offline.

Every model is built from a config (a few thousand to a few tens of thousands of parameters) at
16x16 pixels: a VAE with two blocks (one 2x downsampling) gives 4 x 8 x 8 latents.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PIXELS = 16  # image size the tiny VAEs expect
LATENT = PIXELS // 2
TEXT_LENGTH = 8  # tokenizer model_max_length = text encoder max_position_embeddings
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = ("cat", "dog", "red", "blue")  # whole-word merges, so captions made of them are short


def tiny_tokenizer():
    """A CLIP BPE tokenizer over lowercase letters plus a few whole words.

    transformers 5 builds it from in-memory `vocab` (dict) and `merges` (list of pairs); its
    file-path arguments of transformers 4 are gone.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = word[0]
        for position, letter in enumerate(word[1:], start=1):
            right = letter + ("</w>" if position == len(word) - 1 else "")
            merges.append((piece, right))
            piece = piece + right
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


def tiny_text_encoder(vocab_size: int, hidden: int = 16, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=PIXELS,
    )


def tiny_condition_unet(cross_attention_dim: int, seed: int = 0, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        **extra,
    )


def _scheduler(scheduler_cls: str, **kwargs):
    import diffusers

    return getattr(diffusers, scheduler_cls)(num_train_timesteps=1000, **kwargs)


def save_sd_pipeline(path: Path, seed: int = 0, scheduler_cls: str = "DDIMScheduler", **scheduler_kwargs) -> Path:
    """A tiny StableDiffusionPipeline (no safety checker) saved with safetensors."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_tokenizer()
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        unet=tiny_condition_unet(cross_attention_dim=16, seed=seed),
        scheduler=_scheduler(scheduler_cls, **scheduler_kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def save_sdxl_pipeline(path: Path, seed: int = 0, scheduler_cls: str = "EulerDiscreteScheduler",
                       **scheduler_kwargs) -> Path:
    """A tiny StableDiffusionXLPipeline: two text encoders (16 + 8 features), text_time added embeddings."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), hidden=16, seed=seed)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), hidden=8, projection=True, seed=seed + 1)
    time_embed_dim = 4
    unet = tiny_condition_unet(
        cross_attention_dim=16 + 8,
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 time ids (original size, crop corner, target size) + the pooled projection of text_encoder_2
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(scheduler_cls, **scheduler_kwargs),
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def save_dit_pipeline(path: Path, num_classes: int = 10, seed: int = 0, scheduler_cls: str = "DDIMScheduler",
                      **scheduler_kwargs) -> Path:
    """A tiny DiTPipeline with learned sigma (2C output channels) and an `id2label` in model_index.json."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=LATENT,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    scheduler = _scheduler(scheduler_cls, **scheduler_kwargs)
    pipeline = DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=scheduler)
    pipeline.save_pretrained(path, safe_serialization=True)
    # As on the Hub: DiTPipeline takes id2label but does not write it; the published repos carry it.
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(num_classes)}
    index_path.write_text(json.dumps(index, indent=2))
    return path


def pickle_component(path: Path, component: str) -> Path:
    """Replace a component's safetensors weights with a pickled state dict (torch.save)."""
    from safetensors.torch import load_file

    folder = path / component
    for weights in folder.glob("*.safetensors"):
        # The file names each library looks for: diffusion_pytorch_model.bin, pytorch_model.bin.
        pickled = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.with_suffix(".bin").name
        torch.save(load_file(weights), folder / pickled)
        weights.unlink()
    return path


def write_metadata(folder: Path, entries: dict[str, dict]) -> Path:
    """metadata.jsonl beside the images: one JSON object per image, keyed by file_name."""
    lines = [json.dumps({"file_name": name, **fields}) for name, fields in sorted(entries.items())]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def tiny_dit_transformer(num_classes: int = 10, seed: int = 0, num_attention_heads: int = 2,
                         attention_head_dim: int = 8, num_layers: int = 1):
    """A class-conditional DiTTransformer2DModel over 4 x 8 x 8 latents, learned sigma (8 output channels)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=LATENT,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def save_dit_components(path: Path, transformer, vae, scheduler_cls: str = "DDIMScheduler",
                        **scheduler_kwargs) -> Path:
    """A DiTPipeline from given (e.g. trained) components, safetensors, with `id2label` as on the Hub."""
    from diffusers import DiTPipeline

    scheduler = _scheduler(scheduler_cls, **scheduler_kwargs)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    num_classes = int(transformer.config.num_embeds_ada_norm)
    index["id2label"] = {str(i): f"class {i}" for i in range(num_classes)}
    index_path.write_text(json.dumps(index, indent=2))
    return path
