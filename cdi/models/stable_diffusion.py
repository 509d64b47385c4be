"""Stable Diffusion family: `UNet2DConditionModel` over `AutoencoderKL` latents, conditioned on text.

Conventions (the ones the diffusers pipelines use for a single conditional pass, no guidance):
- every image is conditioned on its own caption (`text` in metadata.jsonl); an image without one on
  the empty prompt "" (encoded, not zeroed);
- Stable Diffusion 1.x/2.x: the text encoder's last hidden state (after its final layer norm);
- SDXL: the penultimate hidden states of both text encoders, concatenated along the feature axis,
  plus the projected pooled output of `text_encoder_2` and the six size/crop "time ids"
  (original size = target size = the image size, crop corner (0, 0)) as `added_cond_kwargs`.
Text embeddings are computed once per batch, without gradients; captions are cut at the tokenizer's
`model_max_length` (77 tokens for CLIP), as the pipelines do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cdi.errors import ModelError
from cdi.models.base import ModelInfo
from cdi.models.latent import LatentAdapter, max_latent_size, sample_size, sampled_fingerprint, vae_scale_factor
from cdi.models.loading import load_component
from cdi.models.prediction import read_scheduler

log = logging.getLogger(__name__)


@dataclass
class TextCondition:
    """What the UNet receives besides z_t and t, one row per image of the batch."""

    prompt_embeds: torch.Tensor  # (B, tokens, features)
    pooled_embeds: torch.Tensor | None = None  # (B, projection_dim), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only


def _require_transformers(root: Path, pipeline_class: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"{root / 'model_index.json'}: {pipeline_class} needs the transformers package for its text encoders; "
            'pip install "cdi[latent]"'
        ) from exc


def _load_tokenizer(root: Path, subfolder: str) -> Any:
    from transformers import CLIPTokenizer

    folder = root / subfolder
    if not folder.is_dir():
        raise ModelError(f"{folder}: missing; the pipeline needs a CLIPTokenizer component '{subfolder}'")
    try:
        return CLIPTokenizer.from_pretrained(root, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{folder}: cannot load it as a CLIPTokenizer ({reason}); re-save the pipeline") from exc


class StableDiffusionAdapter(LatentAdapter):
    """`StableDiffusionPipeline`: one CLIP text encoder, its last hidden state as the UNet's context."""

    family = "stable_diffusion"
    lora_converter = "StableDiffusionLoraLoaderMixin"
    text_components: tuple[tuple[str, str, str], ...] = (("text_encoder", "tokenizer", "CLIPTextModel"),)

    def __init__(
        self,
        info: ModelInfo,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoders: Sequence[torch.nn.Module],
        tokenizers: Sequence[Any],
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        latent_sample_seed: int | None = None,
    ) -> None:
        super().__init__(info, vae, alphas_cumprod, prediction_type, latent_sample_seed)
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoders = torch.nn.ModuleList(text_encoders).eval().requires_grad_(False)
        self.tokenizers = list(tokenizers)
        self._warned_uncaptioned = False
        self._warned_truncated = False

    @classmethod
    def load(
        cls,
        root: Path,
        index: dict,
        fingerprint: str,
        files: dict[str, str],
        allow_pickle: bool,
        latent_sample_seed: int | None = None,
    ) -> "StableDiffusionAdapter":
        pipeline_class = index.get("_class_name", "?")
        _require_transformers(root, pipeline_class)
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        alphas, prediction_type = read_scheduler(root)
        unet = load_component(root, "unet", UNet2DConditionModel, allow_pickle, *max_latent_size(root))
        vae = load_component(root, "vae", AutoencoderKL, allow_pickle)
        cls.check_latent_channels(root, "unet", unet.config.in_channels, vae)
        text_encoders, tokenizers = [], []
        for encoder_folder, tokenizer_folder, encoder_class in cls.text_components:
            if not (root / encoder_folder).is_dir() and cls.optional_text_component(encoder_folder):
                continue
            encoder_cls = getattr(transformers, encoder_class)
            text_encoders.append(load_component(root, encoder_folder, encoder_cls, allow_pickle))
            tokenizers.append(_load_tokenizer(root, tokenizer_folder))
        info = ModelInfo(
            path=str(root),
            family=cls.family,
            pipeline_class=pipeline_class,
            fingerprint=sampled_fingerprint(fingerprint, latent_sample_seed),
            conditioning="text",
            image_channels=3,
            image_size=sample_size(unet.config) * vae_scale_factor(vae),
            num_train_timesteps=int(alphas.shape[0]),
            files=files,
        )
        adapter = cls(info, unet, vae, text_encoders, tokenizers, alphas, prediction_type, latent_sample_seed)
        adapter.check_text_dimensions(root)
        return adapter

    @staticmethod
    def optional_text_component(folder: str) -> bool:
        return False

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        # Only the first text encoder of SDXL may be absent, so the loaded ones are the last of text_components.
        folders = [folder for folder, _, _ in self.text_components]
        folders = folders[len(folders) - len(self.text_encoders):]
        return {"unet": self.unet, **dict(zip(folders, self.text_encoders))}

    def check_text_dimensions(self, root: Path) -> None:
        context = sum(int(encoder.config.hidden_size) for encoder in self.text_encoders)
        cross_attention_dim = self.unet.config.cross_attention_dim  # a list in a few per-block configs: not checked
        if isinstance(cross_attention_dim, int) and context != cross_attention_dim:
            raise ModelError(
                f"{root / 'unet' / 'config.json'}: cross_attention_dim {self.unet.config.cross_attention_dim} differs "
                f"from the text encoder width {context}; the pipeline's components do not fit"
            )

    # -- conditioning -----------------------------------------------------------------------
    def condition(self, labels: Sequence[int | None], captions: Sequence[str | None]) -> TextCondition:
        missing = sum(caption is None for caption in captions)
        if missing and not self._warned_uncaptioned:
            log.warning(
                "%d image(s) of a batch have no caption: they are conditioned on the empty prompt, which gives a "
                "weaker membership signal than their training captions; give captions as `text` in metadata.jsonl",
                missing,
            )
            self._warned_uncaptioned = True
        prompts = ["" if caption is None else str(caption) for caption in captions]
        with torch.no_grad():
            return self.encode_prompts(prompts)

    def _token_ids(self, tokenizer: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        if not self._warned_truncated:
            lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
            if max(lengths, default=0) > tokenizer.model_max_length:
                log.warning(
                    "captions longer than %d tokens are cut to the text encoder's length, as the pipeline does",
                    tokenizer.model_max_length,
                )
                self._warned_truncated = True
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        tokens = self._token_ids(tokenizer, prompts, self.alphas_cumprod.device)
        # The SD pipeline passes an attention mask only to encoders configured to use one.
        mask = tokens["attention_mask"] if getattr(encoder.config, "use_attention_mask", False) else None
        return TextCondition(prompt_embeds=encoder(tokens["input_ids"], attention_mask=mask).last_hidden_state)

    # -- the contract -----------------------------------------------------------------------
    def eps_hat(self, z_t: torch.Tensor, t: int, cond: TextCondition) -> torch.Tensor:
        added = None
        if cond.pooled_embeds is not None:
            added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        out = self.unet(
            z_t, self.timesteps(z_t, t), encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added
        ).sample
        return self.as_epsilon(out, z_t, t)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """`StableDiffusionXLPipeline`: two CLIP text encoders and size/crop micro-conditioning."""

    family = "stable_diffusion_xl"
    lora_converter = "StableDiffusionXLLoraLoaderMixin"
    text_components = (
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    )

    @staticmethod
    def optional_text_component(folder: str) -> bool:
        return folder == "text_encoder"  # as in the SDXL pipeline, text_encoder_2 alone is allowed

    def check_text_dimensions(self, root: Path) -> None:
        super().check_text_dimensions(root)
        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ModelError(
                f"{root / 'unet' / 'config.json'}: addition_embed_type {config.addition_embed_type!r}, "
                "an SDXL UNet has 'text_time'"
            )
        # Six time ids of addition_time_embed_dim each, then the pooled text projection.
        expected = int(self.unet.add_embedding.linear_1.in_features)
        given = 6 * int(config.addition_time_embed_dim) + int(self.text_encoders[-1].config.projection_dim)
        if expected != given:
            raise ModelError(
                f"{root / 'unet' / 'config.json'}: the added embedding takes {expected} inputs but the time ids and "
                f"text_encoder_2's projection give {given}; the pipeline's components do not fit"
            )

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        device = self.alphas_cumprod.device
        hidden, pooled = [], None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            output = encoder(self._token_ids(tokenizer, prompts, device)["input_ids"], output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # SDXL reads the penultimate layer of each encoder
            pooled = getattr(output, "text_embeds", None)  # the projection of the last encoder (text_encoder_2)
        prompt_embeds = torch.cat(hidden, dim=-1)
        size = self.info.image_size
        # (original height, width, crop top, left, target height, width): an uncropped image at model size.
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=prompt_embeds.dtype, device=device)
        return TextCondition(
            prompt_embeds=prompt_embeds,
            pooled_embeds=pooled,
            time_ids=time_ids.expand(len(prompts), -1).contiguous(),
        )


PIPELINE_ADAPTERS = {
    "StableDiffusionPipeline": StableDiffusionAdapter,
    "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
}
