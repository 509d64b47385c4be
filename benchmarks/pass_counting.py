"""Counting and timing denoiser passes for the speed benchmarks: a forward hook on the UNet counts its calls
(a call on an input that requires grad, with grad enabled, is a forward+backward), `timed` adds wall-clock and
process CPU seconds of a block."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any

import torch

FORWARD, FORWARD_BACKWARD = "forward", "forward_backward"
#: Cost of one forward+backward in forwards: backward w.r.t. the input ~ 1 forward, w.r.t. the weights ~ 1 more.
FB_COST_FROZEN, FB_COST_TRAINABLE = 2, 3


class PassCounter:
    """Counts UNet calls by (family, kind, batch size, autocast on); a call on an input that requires grad is a
    forward+backward. Autocast is recorded so the floor replays each call at its precision (SecMI's round trip
    runs in float32 even in a bf16 extraction)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: Counter[tuple[str, str, int, bool]] = Counter()
        self.family = "outside"
        self.family_seconds: dict[str, dict[str, float]] = {}  # filled by `attribute_passes`
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        kind = FORWARD_BACKWARD if torch.is_grad_enabled() and sample.requires_grad else FORWARD
        half = torch.is_autocast_enabled(sample.device.type)
        self.calls[(self.family, kind, int(sample.shape[0]), half)] += 1

    def remove(self) -> None:
        self._handle.remove()

    def per_image(self, n_images: int) -> dict[str, Any]:
        """{family: {forward, forward_backward}} per image, plus totals and forward-equivalents."""
        families: dict[str, dict[str, float]] = {}
        for (family, kind, batch, _), count in sorted(self.calls.items()):
            counts = families.setdefault(family, {FORWARD: 0.0, FORWARD_BACKWARD: 0.0})
            counts[kind] += count * batch / n_images
        forward = sum(c[FORWARD] for c in families.values())
        forward_backward = sum(c[FORWARD_BACKWARD] for c in families.values())
        return {
            "families": families,
            "forward": forward,
            "forward_backward": forward_backward,
            "forward_equivalents_frozen": forward + FB_COST_FROZEN * forward_backward,
            "forward_equivalents_trainable": forward + FB_COST_TRAINABLE * forward_backward,
        }

    def batched_calls(self) -> Counter[tuple[str, int, bool]]:
        """(kind, batch size, autocast on) -> number of calls, all families together: what the floor replays."""
        out: Counter[tuple[str, int, bool]] = Counter()
        for (_, kind, batch, half), count in self.calls.items():
            out[(kind, batch, half)] += count
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(into: dict[str, dict[str, float]], key: str, device: str):
    """Add the block's wall-clock and process CPU seconds to `into[key]` ({"wall": s, "cpu": s}).

    On a shared CPU the process CPU time (with one thread) hardly depends on what else runs; wall-clock does.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        sync(device)
        entry = into.setdefault(key, {"wall": 0.0, "cpu": 0.0})
        entry["wall"] += time.perf_counter() - wall
        entry["cpu"] += time.process_time() - cpu
