"""Builders of tiny diffusers pipelines and image folders, offline (shared by tests and conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_unet(channels: int = 3, size: int = 8, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def save_pipeline(path: Path, unet, scheduler_cls: str = "DDPMScheduler", safe: bool = True, **scheduler_kwargs) -> Path:
    import diffusers

    scheduler = getattr(diffusers, scheduler_cls)(num_train_timesteps=1000, **scheduler_kwargs)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=safe)
    return path


def write_images(folder: Path, n: int, size: int = 8, seed: int = 0, prefix: str = "img", mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"{prefix}_{i:03d}.png")
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, timeout_s: float = 120.0):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied local artifacts) in its own process group."""
    import os
    import subprocess
    import sys
    import time

    import requests

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and huey workers to leak
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), env=env, cwd=root, start_new_session=True,
    )
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    return proc
            except requests.RequestException:  # refused, or a slow answer on a loaded machine
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    except BaseException:  # an interrupt while it starts: the server must not outlive the tests
        stop_mlflow_server(proc)
        raise
    stop_mlflow_server(proc)
    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop_mlflow_server(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height RGB pixels and holds none (a few dozen bytes): only a header check
    can name its size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def labelled_gaussians(n_suspect: int, n_control: int, d: int = 5, shift: float = 0.0, seed: int = 0):
    """Features (n, d) of standard normals with labels 1 (suspect) then 0 (control); the suspects' first
    feature is shifted by `shift` (0: a null audit)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_suspect + n_control, d))
    y = np.r_[np.ones(n_suspect, dtype=int), np.zeros(n_control, dtype=int)]
    X[y == 1, 0] += shift
    return X, y
