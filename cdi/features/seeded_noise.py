"""Seeded noise: every draw depends only on (global seed, image sha256, feature, timestep, draw).

So an image's features never depend on batch size, order, device count or the other images.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def _seed_for(seed: int, sha256: str, feature: str, t: int | str, draw: int) -> int:
    key = f"cdi/{seed}/{sha256}/{feature}/{t}/{draw}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def image_noise(
    like: torch.Tensor,
    sha256: Sequence[str],
    seed: int,
    feature: str,
    t: int | str = "-",
    draw: int = 0,
) -> torch.Tensor:
    """Standard normal noise shaped like `like` (B, ...), one independent stream per image."""
    shape = like.shape[1:]
    draws = []
    for digest in sha256:
        generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, digest, feature, t, draw))
        draws.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)
