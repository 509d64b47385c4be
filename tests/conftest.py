"""Fixtures that build tiny diffusers pipelines and image folders offline."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from builders import save_pipeline, tiny_unet, write_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _children() -> list[int]:
    """This process's child processes (Linux /proc; empty elsewhere)."""
    me, found = str(os.getpid()), []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.append(int(entry.parent.name))
    return found


def _forward_to_workers(signum, frame):
    """The xdist controller hands an interrupt to its workers and waits (up to 3 minutes) until they have
    stopped through their fixtures; only then does it stop, as xdist would otherwise end workers before
    their finalizers ran and leak the servers they started."""
    workers = _children()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid)
                                              for pid in workers):
        time.sleep(0.2)
    raise KeyboardInterrupt(f"signal {signum}")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pytest_configure(config):
    """SIGINT and SIGTERM end a test run through KeyboardInterrupt in the process that runs the tests (plain
    pytest, or each xdist worker), so fixtures stop the servers and clusters they started. A background job of
    a non-interactive shell (as in .ci/run) starts with SIGINT ignored; SIGTERM would otherwise end the process
    without finalizers."""
    controller = not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))
    handler = _forward_to_workers if controller else _interrupt
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


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


@pytest.fixture
def engine_passes(monkeypatch) -> list[tuple[int, int]]:
    """(models, images) of each engine pass, i.e. each Trainer run (`cdi.features.extraction._predict`)."""
    from cdi.features import extraction

    passes: list[tuple[int, int]] = []
    predict = extraction._predict

    def counting(members, todo, *args, **kwargs):
        passes.append((len(members), len(todo)))
        return predict(members, todo, *args, **kwargs)

    monkeypatch.setattr(extraction, "_predict", counting)
    return passes
