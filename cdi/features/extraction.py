"""Feature extraction as a Lightning module: one encode per image, the planned families per batch."""

from __future__ import annotations

import logging
from typing import Sequence

import lightning as L
import numpy as np
import torch

from cdi.data.images import ImageDataset, ImageRecord
from cdi.errors import FeatureError, OptionError
from cdi.features.base import FeatureBatch, FeatureConfig
from cdi.features.registry import plan_families
from cdi.models.base import DiffusionAdapter

log = logging.getLogger(__name__)


class FeatureExtractor(L.LightningModule):
    """`predict_step` returns the requested features (float32) of every image in the batch."""

    def __init__(self, adapter: DiffusionAdapter, names: Sequence[str], config: FeatureConfig, seed: int) -> None:
        super().__init__()
        self.adapter = adapter
        self.names = tuple(names)
        self.config = config
        self.seed = int(seed)
        self.families = plan_families(self.names, config)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        labels = [None if int(label) < 0 else int(label) for label in batch["label"]]
        captions = [caption or None for caption in batch["caption"]]
        with torch.no_grad():
            z0 = self.adapter.encode(batch["image"])
        features = FeatureBatch(
            z0=z0.detach(),
            cond=self.adapter.condition(labels, captions),
            sha256=list(batch["sha256"]),
            seed=self.seed,
        )
        values: dict[str, torch.Tensor] = {}
        for family in self.families:
            values.update(family.compute(self.adapter, features).values)
        matrix = torch.stack([values[name].float() for name in self.names], dim=1)
        return {"index": batch["index"].cpu(), "features": matrix.detach().cpu()}


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise OptionError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def extract_features(
    adapter: DiffusionAdapter,
    records: Sequence[ImageRecord],
    names: Sequence[str],
    config: FeatureConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> np.ndarray:
    """Features of `records` in their order, shape (len(records), len(names)), float64."""
    if batch_size < 1:
        raise OptionError(f"--batch-size {batch_size}: must be a positive integer")
    config = config or FeatureConfig()
    info = adapter.info
    dataset = ImageDataset(records, info.image_size, info.image_channels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    module = FeatureExtractor(adapter, names, config, seed)
    trainer = L.Trainer(
        accelerator="gpu" if resolve_device(device) == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        inference_mode=False,  # GM and NO need input gradients; gradient-free work runs under no_grad
    )
    outputs = trainer.predict(module, dataloaders=loader, return_predictions=True)
    result = np.full((len(records), len(names)), np.nan)
    for out in outputs:
        result[out["index"].numpy()] = out["features"].numpy().astype(np.float64)
    bad_rows = np.where(~np.isfinite(result).all(axis=1))[0]
    if len(bad_rows):
        bad_cols = [names[j] for j in np.where(~np.isfinite(result[bad_rows[0]]))[0]]
        raise FeatureError(
            f"{records[bad_rows[0]].path}: non-finite feature(s) {', '.join(bad_cols)} "
            f"({len(bad_rows)} image(s) affected); check the image and the model's weights"
        )
    return result
