"""Feature-extraction benchmark: the fused engine against a naive per-family baseline and the bare-pass floor.

For each model, in one process, with the same images, batch size and thread count:

1. passes per image per family of the fused engine (denoiser calls counted by a forward hook on the UNet;
   a call whose input requires grad, with grad enabled, counts as one forward+backward);
2. the fused engine: `cdi.features.extract` over all 26 features (no cache), after a short warm-up;
3. a naive baseline written plainly here, the way the CDI research code works: seven independent passes over
   the image set (DL, SecMI, PIA, PIAN, ML, GM, NO), each re-reading and re-encoding the images, weights
   trainable, PIA and PIAN each with their own eps0, ML by its own forwards, NO with torch's L-BFGS (max_iter 5,
   strong-Wolfe line search) on one perturbation tensor per batch; same formulas, timesteps and seeded noise
   as cdi, so the work is comparable;
4. the floor: the fused engine's model passes replayed bare (same counts, batch sizes and inputs), no features.

Forward-equivalents: a forward+backward with frozen weights (gradient w.r.t. the input only) counts 2,
with trainable weights (input and weight gradients) 3. See benchmarks/README.md.

    python benchmarks/extraction.py --models demo,cifar --json benchmarks/results/cpu-$(date +%F).json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np
import torch

import cdi
from cdi import tracking
from cdi.data import ImageRecord, discover_images, load_image
from cdi.features import FAMILIES, FEATURE_NAMES, FeatureConfig, extract
from cdi.features.extraction import half_precision_weights, resolve_device
from cdi.features.gradient_masking import SHARED_NOISE
from cdi.features.seeded_noise import image_noise
from cdi.models import DiffusionAdapter, load_model

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "cdi-benchmarks"
MODELS = ("demo", "cifar")
FORWARD, FORWARD_BACKWARD = "forward", "forward_backward"
#: Cost of one forward+backward in forwards: backward w.r.t. the input ~ 1 forward, w.r.t. the weights ~ 1 more.
FB_COST_FROZEN, FB_COST_TRAINABLE = 2, 3
#: The DDPM CIFAR-10 UNet of Ho et al. (2020) as diffusers publishes it (google/ddpm-cifar10-32): 35.7 M
#: parameters, one attention head of 256 channels at 16x16. diffusers' own default, 8 channels per head,
#: would give 32 heads of 8 channels: the same parameters, but an attention whose softmax dominates the time.
DDPM_CIFAR10_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)


# -- models and images ------------------------------------------------------------------------------------------


def demo_model(args: argparse.Namespace) -> tuple[DiffusionAdapter, list[ImageRecord]] | None:
    """The bundled 16x16 grayscale DDPM and half members, half held-out images (None if not built yet)."""
    root = Path(args.demo_model)
    if not (root / "model_index.json").is_file():
        print(f"demo: skipped, {root} has no model yet (build it: mlflow run mlflow_projects/demo_target "
              "--env-manager local)", file=sys.stderr)
        return None
    members = discover_images(REPO / "demo" / "members", "suspect")
    heldout = discover_images(REPO / "demo" / "heldout", "control")
    half = args.demo_images // 2
    return load_model(root), members[: args.demo_images - half] + heldout[:half]


def cifar_model(args: argparse.Namespace, workdir: Path) -> tuple[DiffusionAdapter, list[ImageRecord]]:
    """The 35.7 M-parameter DDPM-CIFAR10 UNet with random weights, saved and loaded like a real suspect."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    torch.manual_seed(args.seed)
    unet = UNet2DModel(**DDPM_CIFAR10_UNET)
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.save_pretrained(workdir / "cifar-model", safe_serialization=True)
    images = workdir / "cifar-images"
    images.mkdir()
    rng = np.random.default_rng(args.seed)
    for i in range(args.n_images):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"random_{i:03d}.png")
    return load_model(workdir / "cifar-model"), discover_images(images, "suspect")


# -- counting denoiser passes -----------------------------------------------------------------------------------


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


@contextlib.contextmanager
def attribute_passes(counter: PassCounter, device: str):
    """Tag the counter with the engine's family, and time it, while its `compute` runs (patched in this process)."""

    def tagged(cls, compute):
        def compute_tagged(self, adapter, batch):
            counter.family = cls.__name__
            try:
                with timed(counter.family_seconds, cls.__name__, device):
                    return compute(self, adapter, batch)
            finally:
                counter.family = "outside"

        return compute_tagged

    with contextlib.ExitStack() as stack:
        for cls in FAMILIES:
            stack.enter_context(mock.patch.object(cls, "compute", tagged(cls, cls.compute)))
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(into: dict[str, dict[str, float]], key: str, device: str):
    """Add the block's wall-clock and process CPU seconds to `into[key]` ({"wall": s, "cpu": s}).

    On a shared CPU the process CPU time (with one thread) hardly depends on what else runs; wall-clock does.
    """
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        _sync(device)
        entry = into.setdefault(key, {"wall": 0.0, "cpu": 0.0})
        entry["wall"] += time.perf_counter() - wall
        entry["cpu"] += time.process_time() - cpu


# -- 2. the fused engine ----------------------------------------------------------------------------------------


def fused(adapter: DiffusionAdapter, records: Sequence[ImageRecord], args: argparse.Namespace, device: str) -> dict:
    options = dict(seed=args.seed, batch_size=args.batch_size, device=device, progress=False, use_cache=False,
                   precision=args.precision, threads=args.threads, timestep_batching=args.timestep_batching)
    # Warm-up: one batch through the whole engine path (Lightning, data loading, model at the timed batch shape).
    extract(adapter, list(records[: args.batch_size]), ("DL",), **options)

    counter = PassCounter(adapter.unet)  # the hook costs one Python call per model call: negligible
    seconds: dict[str, dict[str, float]] = {}
    try:
        with attribute_passes(counter, device), timed(seconds, "total", device):
            report = extract(adapter, list(records), FEATURE_NAMES, **options)
    finally:
        counter.remove()
    return {"report": report, "seconds": seconds["total"], "counter": counter}


# -- 3. the naive baseline --------------------------------------------------------------------------------------


def l2(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=2, dim=1)


def naive_dl(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    t = adapter.timestep(config.dl_t)
    total = 0.0
    for draw in range(config.dl_draws):
        eps = image_noise(z0, sha256, seed, "DL", config.dl_t, draw)
        total = total + l2(adapter.eps_hat(adapter.q(z0, t, eps), t, cond) - eps)
    return {"DL": total / config.dl_draws}


def naive_secmi(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    def ddim(z, s, s_next):  # eta = 0: x0_hat = (z - sqrt(1-ab_s) e) / sqrt(ab_s); sqrt(ab_s') x0_hat + sqrt(1-ab_s') e
        e = adapter.eps_hat(z, s, cond)
        ab_s, ab_n = adapter.alpha_bar(s), adapter.alpha_bar(s_next)
        return ((ab_n.sqrt() * (z - (1 - ab_s).sqrt() * e) / ab_s.sqrt()) + (1 - ab_n).sqrt() * e).to(z.dtype)

    k, t_end = config.secmi_k, config.secmi_t
    z = z0
    for s in range(0, t_end, k):
        z = ddim(z, adapter.timestep(s), adapter.timestep(s + k))
    t, t_up = adapter.timestep(t_end), adapter.timestep(t_end + k)
    return {"SecMI": l2(z - ddim(ddim(z, t, t_up), t_up, t))}


def naive_pia(adapter, z0, cond, sha256, config: FeatureConfig, seed: int, normalised: bool = False) -> dict:
    t = adapter.timestep(config.pia_t)
    eps0 = adapter.eps_hat(z0, adapter.timestep(0), cond)  # PIA and PIAN each pay for their own eps0
    if normalised:
        eps0 = eps0 * math.sqrt(2 / math.pi) / eps0.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    value = (eps0 - adapter.eps_hat(adapter.q(z0, t, eps0), t, cond)).flatten(1).norm(p=config.pia_p, dim=1)
    return {"PIAN" if normalised else "PIA": value}


def naive_pian(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    return naive_pia(adapter, z0, cond, sha256, config, seed, normalised=True)


def naive_ml(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    eps = image_noise(z0, sha256, seed, SHARED_NOISE)
    out = {}
    for t_ref in config.multi_timesteps:
        t = adapter.timestep(t_ref)
        out[f"ML_{t_ref}"] = l2(adapter.eps_hat(adapter.q(z0, t, eps), t, cond) - eps)
    return out


def naive_gm(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    eps = image_noise(z0, sha256, seed, SHARED_NOISE)
    k = int(config.gm_mask_ratio * z0[0].numel())
    out = {}
    for t_ref in config.multi_timesteps:
        t = adapter.timestep(t_ref)
        z_t = adapter.q(z0, t, eps).detach().requires_grad_(True)
        l2(adapter.eps_hat(z_t, t, cond) - eps).sum().backward()  # weights trainable: fills their .grad too
        adapter.unet.zero_grad(set_to_none=True)
        mask = torch.zeros_like(z_t).flatten(1)
        mask.scatter_(1, z_t.grad.abs().flatten(1).topk(k, dim=1).indices, 1.0)
        mask = mask.view_as(z0)
        with torch.no_grad():
            z_m = mask * eps + (1 - mask) * z0
            out[f"GM_{t_ref}"] = l2(mask * (eps - z0) - mask * adapter.eps_hat(z_m, t, cond))
    return out


def naive_no(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    t = adapter.timestep(config.no_t)
    eps = image_noise(z0, sha256, seed, "NO", config.no_t)
    z_t = adapter.q(z0, t, eps).detach()
    delta = torch.zeros_like(z_t, requires_grad=True)  # one tensor for the whole batch, as the reference
    # The reference runs scipy's L-BFGS-B (maxiter 5, with a line search); torch's L-BFGS without a line search
    # diverges here (loss x8 on the demo), so use its strong-Wolfe search. It stops at max_eval = 6 evaluations.
    optimiser = torch.optim.LBFGS([delta], max_iter=5, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        adapter.unet.zero_grad(set_to_none=True)
        loss = l2(adapter.eps_hat(z_t + delta, t, cond) - eps).mean()  # a batch mean, as the reference
        loss.backward()
        return loss

    optimiser.step(closure)
    adapter.unet.zero_grad(set_to_none=True)
    with torch.no_grad():  # the objective itself at the optimum (cdi's definition, not the reference's re-noising)
        loss = l2(adapter.eps_hat(z_t + delta, t, cond) - eps)
    return {"NO_loss": loss, "NO_delta": l2(delta.detach())}


#: (family, function, needs input gradients): seven independent passes over the image set.
NAIVE_FAMILIES: tuple[tuple[str, Callable, bool], ...] = (
    ("DL", naive_dl, False),
    ("SecMI", naive_secmi, False),
    ("PIA", naive_pia, False),
    ("PIAN", naive_pian, False),
    ("ML", naive_ml, False),
    ("GM", naive_gm, True),
    ("NO", naive_no, True),
)


@contextlib.contextmanager
def trainable_weights(adapter: DiffusionAdapter):
    """Weights trainable as in the research code (every backward also computes weight gradients)."""
    adapter.unet.requires_grad_(True)
    try:
        yield
    finally:
        adapter.unet.zero_grad(set_to_none=True)
        adapter.unet.requires_grad_(False)


def naive(adapter: DiffusionAdapter, records: Sequence[ImageRecord], args: argparse.Namespace, device: str) -> dict:
    config = FeatureConfig()
    info = adapter.info
    counter = PassCounter(adapter.unet)
    values: dict[str, list[torch.Tensor]] = {}
    family_seconds: dict[str, dict[str, float]] = {}
    adapter.to(device)  # contiguous: the engine hands the model back in the layout it came in
    try:
        with trainable_weights(adapter):
            for family, compute, needs_grad in NAIVE_FAMILIES:
                counter.family = family
                with timed(family_seconds, family, device):
                    for first in range(0, len(records), args.batch_size):
                        batch = records[first : first + args.batch_size]
                        # Every family re-reads and re-encodes its images, as each reference script does.
                        x = torch.stack([load_image(r.path, info.image_size, info.image_channels) for r in batch])
                        with torch.no_grad():
                            z0 = adapter.encode(x.to(device)).float()
                        cond = adapter.condition([r.label for r in batch], [r.caption for r in batch])
                        sha256 = [r.sha256 for r in batch]
                        with contextlib.nullcontext() if needs_grad else torch.no_grad():
                            for name, value in compute(adapter, z0, cond, sha256, config, args.seed).items():
                                values.setdefault(name, []).append(value.detach().float().cpu())
    finally:
        counter.remove()
    matrix = np.stack([torch.cat(values[name]).numpy() for name in FEATURE_NAMES], axis=1).astype(np.float64)
    total = {clock: sum(s[clock] for s in family_seconds.values()) for clock in ("wall", "cpu")}
    return {"values": matrix, "seconds": total, "family_seconds": family_seconds, "counter": counter}


# -- 4. the floor -----------------------------------------------------------------------------------------------


def floor(adapter: DiffusionAdapter, records: Sequence[ImageRecord], calls: Counter[tuple[str, int, bool]],
          args: argparse.Namespace, device: str) -> dict:
    """Replay the engine's model calls bare: no_grad forwards, and forwards + input-only autograd.grad."""
    info = adapter.info
    channels_last = device == "cuda"  # as the engine by default
    adapter.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    biggest = max(batch for _, batch, _ in calls)
    records = [records[i % len(records)] for i in range(biggest)]  # batched timesteps: calls of more rows than images
    x = torch.stack([load_image(r.path, info.image_size, info.image_channels) for r in records]).to(device)
    with torch.no_grad():
        z0 = adapter.encode(x).float()
    if channels_last:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    labels, captions = [r.label for r in records[:biggest]], [r.caption for r in records[:biggest]]
    t = adapter.timestep(100)  # the cost of a call does not depend on t
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    seconds: dict[str, dict[str, float]] = {}
    # The engine's precision: half weights and autocast, float32 (weights widened) where it runs float32 calls.
    with half_precision_weights(adapter, args.precision):
        for (kind, batch, half), count in sorted(calls.items()):
            z, cond = z0[:batch], adapter.condition(labels[:batch], captions[:batch])
            mode = torch.autocast(device, dtype=dtype) if half else adapter.full_precision(device)
            with mode, timed(seconds, kind, device):
                for _ in range(count):
                    if kind == FORWARD:
                        with torch.no_grad():
                            adapter.eps_hat(z, t, cond)
                    else:
                        z_in = z.detach().requires_grad_(True)
                        torch.autograd.grad(adapter.eps_hat(z_in, t, cond).sum(), z_in)
    total = {clock: sum(s[clock] for s in seconds.values()) for clock in ("wall", "cpu")}
    return {"seconds": total, "kind_seconds": seconds}


# -- one model --------------------------------------------------------------------------------------------------


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def agreement(fused_values: np.ndarray, naive_values: np.ndarray) -> dict[str, float]:
    """Max relative difference naive vs fused where the definitions coincide; NO: median ratio (magnitude only)."""
    column = {name: i for i, name in enumerate(FEATURE_NAMES)}
    out = {}
    for family in ("DL", "SecMI", "PIA", "PIAN", "ML", "GM"):
        cols = [i for name, i in column.items() if name == family or name.startswith(f"{family}_")]
        out[family] = max_relative_difference(naive_values[:, cols], fused_values[:, cols])
    for name in ("NO_loss", "NO_delta"):
        ratio = naive_values[:, column[name]] / np.maximum(fused_values[:, column[name]], 1e-12)
        out[f"{name}_median_ratio"] = float(np.median(ratio))
    return out


def family_ratio_to_floor(family_seconds: dict[str, float], passes: dict, floor_seconds: dict[str, float]) -> dict:
    """Each engine family's seconds over the floor time of its own passes (floor seconds per pass of each kind)."""
    per_pass = {kind: floor_seconds[kind] / sum(c[kind] for c in passes["families"].values()) for kind in floor_seconds}
    out = {}
    for family, counts in passes["families"].items():
        bare = sum(counts[kind] * per_pass.get(kind, 0.0) for kind in (FORWARD, FORWARD_BACKWARD))
        if family in family_seconds and bare > 0:
            out[family] = family_seconds[family] / bare
    return out


def throughput(n: int, fused_s: float, naive_s: float, floor_s: float) -> dict[str, float]:
    return {
        "images_per_s": n / fused_s,
        "naive_images_per_s": n / naive_s,
        "floor_images_per_s": n / floor_s,
        "speedup_vs_naive": naive_s / fused_s,
        "ratio_to_floor": fused_s / floor_s,
    }


def bench_model(name: str, adapter: DiffusionAdapter, records: list[ImageRecord], args: argparse.Namespace,
                device: str) -> dict:
    n = len(records)
    load_before = os.getloadavg()[0]
    print(f"{name}: {n} images, batch {args.batch_size}, {device}, {args.threads} thread(s)", file=sys.stderr)
    runs = []
    for repeat in range(args.repeats):  # interleaved, so that a change in machine load hits all three alike
        tag = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
        engine = fused(adapter, records, args, device)
        print(f"{name}: fused {engine['seconds']['wall']:.1f} s{tag}", file=sys.stderr)
        baseline = naive(adapter, records, args, device)
        print(f"{name}: naive {baseline['seconds']['wall']:.1f} s{tag}", file=sys.stderr)
        bare = floor(adapter, records, engine["counter"].batched_calls(), args, device)
        print(f"{name}: floor {bare['seconds']['wall']:.1f} s{tag}", file=sys.stderr)
        if not np.isfinite(baseline["values"]).all():
            raise RuntimeError(f"{name}: the naive baseline produced non-finite features")
        runs.append((engine, baseline, bare))
    clocks = ("wall", "cpu") if device == "cpu" else ("wall",)  # process CPU time means little next to a GPU
    # Totals: the median over repeats of each phase's time; per-family detail: the first repeat.
    median = {clock: [statistics.median(run[i]["seconds"][clock] for run in runs) for i in range(3)]
              for clock in clocks}
    engine, baseline, bare = runs[0]
    report, passes = engine["report"], engine["counter"].per_image(n)

    def per_clock(seconds_by_key: dict[str, dict[str, float]], clock: str) -> dict[str, float]:
        return {key: seconds[clock] for key, seconds in seconds_by_key.items()}

    entry = {
        "n_images": n,
        "image_shape": [adapter.info.image_channels, adapter.info.image_size, adapter.info.image_size],
        "parameters": sum(p.numel() for p in adapter.unet.parameters()),
        "passes_per_image": passes,
        "naive_passes_per_image": baseline["counter"].per_image(n),
        **throughput(n, *median["wall"]),
        "repeats": {
            "n": len(runs),
            **{clock: {"speedup_vs_naive": [run[1]["seconds"][clock] / run[0]["seconds"][clock] for run in runs],
                       "ratio_to_floor": [run[0]["seconds"][clock] / run[2]["seconds"][clock] for run in runs]}
               for clock in clocks},
        },
        "family_seconds": report.family_seconds,  # the engine's own per-family timing (wall-clock)
        "naive_vs_fused": agreement(report.values, baseline["values"]),
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "engine_reported_seconds": report.seconds,
    }
    for clock in clocks:
        floor_kinds = per_clock(bare["kind_seconds"], clock)
        entry[f"{clock}_seconds"] = {
            "fused": median[clock][0],
            "naive": median[clock][1],
            "floor": median[clock][2],
            "fused_families": per_clock(engine["counter"].family_seconds, clock),
            "naive_families": per_clock(baseline["family_seconds"], clock),
            "floor_kinds": floor_kinds,
            "fused_family_ratio_to_floor": family_ratio_to_floor(
                per_clock(engine["counter"].family_seconds, clock), passes, floor_kinds),
        }
    if "cpu" in clocks:
        entry["cpu_time"] = throughput(n, *median["cpu"])
    return entry


# -- reporting --------------------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    settings = results["settings"]
    print(f"\ndevice {settings['device']} ({settings['device_name']}), torch {settings['torch']}, "
          f"{settings['threads']} thread(s), batch {settings['batch_size']}")
    for name, entry in results["models"].items():
        if "skipped" in entry:
            print(f"\n{name}: skipped ({entry['skipped']})")
            continue
        clocks = [clock for clock in ("wall", "cpu") if f"{clock}_seconds" in entry]
        by_clock = {"wall": entry, "cpu": entry.get("cpu_time")}
        print(f"\n{name}: {entry['n_images']} images {entry['image_shape']}, {entry['parameters'] / 1e6:.2f} M params, "
              f"load average {entry['loadavg_1min']['before']:.1f} -> {entry['loadavg_1min']['after']:.1f}")
        print(f"  {'s/image':<22}" + "".join(f"{clock + ' clock':>12}" for clock in clocks))
        for label, key in (("fused engine", "images_per_s"), ("naive baseline", "naive_images_per_s"),
                           ("floor (bare passes)", "floor_images_per_s")):
            print(f"  {label:<22}" + "".join(f"{1 / by_clock[clock][key]:>12.3f}" for clock in clocks))
        for key in ("speedup_vs_naive", "ratio_to_floor"):
            print(f"  {key:<22}" + "".join(f"{by_clock[clock][key]:>12.3f}" for clock in clocks))
            if entry["repeats"]["n"] > 1:  # the line above is from the median times
                print(f"  {'  repeats min-max':<22}" + "".join(
                    f"{min(entry['repeats'][clock][key]):>7.2f}-{max(entry['repeats'][clock][key]):.2f}"
                    for clock in clocks))

        clock = clocks[-1]  # CPU time on a CPU, wall-clock on a GPU
        seconds = entry[f"{clock}_seconds"]
        print(f"  passes per image        {'fwd':>6}{'fwd+bwd':>9}{clock + ' s':>10}  x its bare passes")
        for family, counts in entry["passes_per_image"]["families"].items():
            ratio = seconds["fused_family_ratio_to_floor"].get(family, math.nan)
            print(f"    {family:<22}{counts[FORWARD]:>6.1f}{counts[FORWARD_BACKWARD]:>9.1f}"
                  f"{seconds['fused_families'].get(family, math.nan):>10.2f}{ratio:>8.2f}")
        passes = entry["passes_per_image"]
        print(f"    {'fused total':<22}{passes['forward']:>6.1f}{passes['forward_backward']:>9.1f}"
              f"   = {passes['forward_equivalents_frozen']:.0f} forward-equivalents (fwd+bwd = 2, frozen weights)")
        for family, counts in entry["naive_passes_per_image"]["families"].items():
            print(f"    naive {family:<16}{counts[FORWARD]:>6.1f}{counts[FORWARD_BACKWARD]:>9.1f}"
                  f"{seconds['naive_families'][family]:>10.2f}")
        passes = entry["naive_passes_per_image"]
        print(f"    {'naive total':<22}{passes['forward']:>6.1f}{passes['forward_backward']:>9.1f}"
              f"   = {passes['forward_equivalents_trainable']:.0f} forward-equivalents (fwd+bwd = 3, trainable)")
        agree = ", ".join(f"{k} {v:.1e}" for k, v in entry["naive_vs_fused"].items() if "ratio" not in k)
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in entry["naive_vs_fused"].items() if "ratio" in k)
        print(f"  naive vs fused, max rel. diff: {agree}; NO naive/fused: {ratios}")


def flatten(prefix: str, value: Any) -> dict[str, float]:
    """Numbers of a nested dict as {"a.b.c": x}, for MLflow metrics."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}", inner))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: float(value)}
    return {}


def log_to_mlflow(results: dict, json_path: Path, tracking_uri: str) -> None:
    """One run in `cdi-benchmarks`: settings as params, every number as a `<model>.<key>` metric, JSON artifact."""
    import mlflow

    params = {key: value for key, value in results["settings"].items() if not isinstance(value, dict)}
    metrics: dict[str, float] = {}
    for name, entry in results["models"].items():
        if "skipped" in entry:
            params[f"{name}.skipped"] = entry["skipped"]
            continue
        params[f"{name}.n_images"] = entry["n_images"]
        metrics.update(flatten(name, {key: value for key, value in entry.items() if key != "image_shape"}))
    with tracking.audit_run(tracking_uri, EXPERIMENT, run_name=f"extraction-{results['settings']['device']}"):
        tracking.log_params(params)
        tracking.log_metrics(metrics)
        mlflow.log_artifact(str(json_path))


# -- main -------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="demo,cifar", help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch, the same for all three runs")
    parser.add_argument("--n-images", type=int, default=8, help="random 32x32 RGB images for the CIFAR-size model")
    parser.add_argument("--demo-images", type=int, default=32, help="demo images (half members, half held-out)")
    parser.add_argument("--demo-model", default=str(REPO / "demo" / "model"), help="the demo pipeline directory")
    parser.add_argument("--precision", default="32", choices=("32", "bf16", "16"),
                        help="engine precision (bf16: autocast on CUDA and on CPU, 16: CUDA only); the naive "
                             "baseline is float32 as the research code")
    parser.add_argument("--timestep-batching", default="off", choices=("auto", "on", "off"),
                        help="the engine's timestep batching (cdi.features.batching); benchmarks/batching.py "
                             "compares on and off")
    parser.add_argument("--seed", type=int, default=0, help="feature noise seed and random weights/images seed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run fused, naive and floor this many times, interleaved; totals are the medians and "
                             "the per-repeat ratios are reported")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="write the JSON only, log nothing (and need no mlflow installed: GPU machines "
                             "that carry only torch, lightning and diffusers)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if min(args.threads, args.batch_size, args.n_images, args.demo_images, args.repeats) < 1:
        parser.error("--threads, --batch-size, --n-images, --demo-images and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = resolve_device(args.device)
    tracking_uri = None if args.no_mlflow else tracking.resolve_tracking_uri(args.tracking_uri)
    if tracking_uri:
        tracking.connect(tracking_uri, EXPERIMENT)  # fail fast, before any model pass
    torch.set_num_threads(args.threads)

    import diffusers
    import lightning

    # The engine casts the denoiser to bf16/fp16 on purpose (and back): diffusers' advice against it is noise here.
    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own deprecation, once per trainer
    results: dict[str, Any] = {
        "settings": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "timestep_batching": args.timestep_batching,
            "seed": args.seed,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "lightning": lightning.__version__,
            "cdi": cdi.__version__,
            "feature_config": FeatureConfig().to_dict(),
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp:
        for name in args.models:
            if name == "demo":
                loaded = demo_model(args)
            else:
                loaded = cifar_model(args, Path(tmp))
            if loaded is None:
                results["models"][name] = {"skipped": f"{args.demo_model} does not exist"}
                continue
            adapter, records = loaded
            results["models"][name] = bench_model(name, adapter, records, args, device)

        print_table(results)
        json_path = args.json or Path(tmp) / "extraction.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        if tracking_uri:
            log_to_mlflow(results, json_path, tracking_uri)
    done = [f"logged to {tracking_uri} (experiment {EXPERIMENT})"] if tracking_uri else []
    print("\n" + "; ".join(done + ([f"wrote {args.json}"] if args.json else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
