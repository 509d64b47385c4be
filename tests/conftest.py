"""Fixtures that build tiny diffusers pipelines and image folders offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from builders import save_pipeline, tiny_unet, write_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_tmp(tmp_path_factory):
    """Tests never write to the user's cache directory."""
    os.environ["CDI_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
# Tiny models gain nothing from threads, and on shared cores extra threads cost 100x per forward.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight 8x8 RGB pixel DDPM pipeline saved with safetensors."""
    return save_pipeline(tmp_path_factory.mktemp("model") / "tiny", tiny_unet())


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return write_images(root / "suspect", 12, seed=1, prefix="p"), write_images(root / "control", 12, seed=2, prefix="u")


@pytest.fixture(scope="session")
def _tracking_db(tmp_path_factory) -> str:
    """One SQLite store for the session: creating MLflow's schema costs seconds per database."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(_tracking_db, monkeypatch) -> str:
    uri = _tracking_db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri
