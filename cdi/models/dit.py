"""DiT: a class-conditional `DiTTransformer2DModel` over `AutoencoderKL` latents (Peebles & Xie 2023).

Conventions:
- an image is conditioned on its class id (`label` in metadata.jsonl, 0 <= label < num_embeds_ada_norm);
- an image without a label gets the null class, id `num_embeds_ada_norm` (the extra row DiT learns by
  dropping labels in training, the one classifier-free guidance uses), with a warning: the model's
  unconditional prediction gives a weaker membership signal than the image's true class;
- DiT learns the variance: it predicts 2C channels, the first C are the noise prediction.
The published checkpoints name the denoiser class `Transformer2DModel` in transformer/config.json;
it loads as `DiTTransformer2DModel` all the same. Class names (`id2label` in model_index.json) are
kept for reports only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from cdi.errors import ImageSetError, ModelError
from cdi.models.base import ModelInfo
from cdi.models.latent import LatentAdapter, max_latent_size, sample_size, sampled_fingerprint, vae_scale_factor
from cdi.models.loading import load_component
from cdi.models.prediction import read_scheduler

log = logging.getLogger(__name__)


def _label_table_size(transformer: torch.nn.Module) -> int:
    """Rows of the class-label embedding: num_classes, plus one null class if trained with label dropout."""
    for module in transformer.modules():
        table = getattr(module, "embedding_table", None)
        if isinstance(table, torch.nn.Embedding) and hasattr(module, "num_classes"):
            return int(table.num_embeddings)
    return 0


class DiTAdapter(LatentAdapter):
    family = "dit"

    def __init__(
        self,
        info: ModelInfo,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        latent_sample_seed: int | None = None,
        class_names: dict[int, str] | None = None,
    ) -> None:
        super().__init__(info, vae, alphas_cumprod, prediction_type, latent_sample_seed)
        self.transformer = transformer.eval().requires_grad_(False)
        self.num_classes = int(transformer.config.num_embeds_ada_norm)
        self.null_class = self.num_classes
        self.has_null_class = _label_table_size(transformer) > self.num_classes
        self.class_names = dict(class_names or {})
        self._warned_unlabelled = False

    @classmethod
    def load(
        cls,
        root: Path,
        index: dict,
        fingerprint: str,
        files: dict[str, str],
        allow_pickle: bool,
        latent_sample_seed: int | None = None,
    ) -> "DiTAdapter":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        alphas, prediction_type = read_scheduler(root)
        transformer = load_component(root, "transformer", DiTTransformer2DModel, allow_pickle, *max_latent_size(root))
        config = transformer.config
        if config.norm_type != "ada_norm_zero" or not config.num_embeds_ada_norm:
            raise ModelError(
                f"{root / 'transformer' / 'config.json'}: not a class-conditional DiT (norm_type {config.norm_type!r}, "
                f"num_embeds_ada_norm {config.num_embeds_ada_norm!r})"
            )
        vae = load_component(root, "vae", AutoencoderKL, allow_pickle)
        cls.check_latent_channels(root, "transformer", config.in_channels, vae)
        try:
            class_names = {int(key): str(value) for key, value in (index.get("id2label") or {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(
                f"{root / 'model_index.json'}: id2label is not a map of class ids to names ({exc})"
            ) from exc
        info = ModelInfo(
            path=str(root),
            family=cls.family,
            pipeline_class=index.get("_class_name", "?"),
            fingerprint=sampled_fingerprint(fingerprint, latent_sample_seed),
            conditioning="class",
            image_channels=3,
            image_size=sample_size(config) * vae_scale_factor(vae),
            num_train_timesteps=int(alphas.shape[0]),
            files=files,
        )
        return cls(info, transformer, vae, alphas, prediction_type, latent_sample_seed, class_names)

    def condition(self, labels: Sequence[int | None], captions: Sequence[str | None]) -> Any:
        missing = sum(label is None for label in labels)
        if missing and not self.has_null_class:
            raise ImageSetError(
                f"{self.info.path}: this DiT has no null class, so every image needs a label; give labels in "
                "metadata.jsonl (file_name, label) beside the images"
            )
        if missing and not self._warned_unlabelled:
            log.warning(
                "%d image(s) of a batch have no class label: they are conditioned on the null class %d "
                "(unconditional), which gives a weaker membership signal than their true class; give labels in "
                "metadata.jsonl (file_name, label)",
                missing,
                self.null_class,
            )
            self._warned_unlabelled = True
        bad = [label for label in labels if label is not None and not 0 <= int(label) < self.num_classes]
        if bad:
            raise ImageSetError(f"class label {bad[0]} outside 0..{self.num_classes - 1} of {self.info.path}")
        ids = [self.null_class if label is None else int(label) for label in labels]
        return torch.tensor(ids, dtype=torch.long, device=self.alphas_cumprod.device)

    def eps_hat(self, z_t: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
        out = self.transformer(z_t, timestep=self.timesteps(z_t, t), class_labels=cond).sample
        return self.as_epsilon(out, z_t, t)


PIPELINE_ADAPTERS = {"DiTPipeline": DiTAdapter}
