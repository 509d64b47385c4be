"""GPU check of a real checkpoint: peak memory and speed per feature family, and one full 2 x N audit.

    python benchmarks/gpu_check.py --model /path/to/stable-diffusion-v1-5 \\
        --suspect my/published --control my/unpublished --batch-size 16 --json gpu-check.json

What it does, on one CUDA device:

1. loads `--model` (any pipeline cdi supports) as the audit does, moves it to the GPU (channels_last, as the
   engine does on CUDA) and records the memory its weights take;
2. per batch size of `--memory-batch-sizes` (default: `--batch-size`): encodes one batch of images and runs
   every family of `plan_families(FEATURE_NAMES, FeatureConfig())` on it once, under the engine's autocast
   (`--precision`, default bf16 where supported) and, for gray-box families, inference mode, exactly as
   `FeatureExtractor.compute` does. Around each family `torch.cuda.max_memory_allocated` is reset and read:
   the peak (weights included) and the peak above what was allocated before the family ran are reported,
   with the family's seconds and images/s. A family that runs out of memory is reported as such and the
   check goes on;
3. frees that model and runs `cdi.audit.audit` on 2 x `--n` images (`--access`, default white: all 26
   features), reporting its wall-clock time, images/s and peak GPU memory.

Images: the first `--n` of `--suspect` and `--control` (with their metadata.jsonl captions/labels), or, when
neither is given, synthetic smooth random images at the model's resolution. With synthetic images the
timings and memory are valid but **the p-value is meaningless** (both sets are the same random
distribution, and neither was trained on); the script says so.

Measured, never asserted. Without a visible CUDA device it exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

GIB = 1024**3
EXPERIMENT = "cdi-gpu-check"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Peak GPU memory and images/s per CDI feature family, plus a full 2 x N audit, on a real "
        "checkpoint. Needs a CUDA device.",
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline directory (save_pretrained output)")
    parser.add_argument("--suspect", help="folder of suspect images (default: synthetic images, p-value meaningless)")
    parser.add_argument("--control", help="folder of control images (give both or neither)")
    parser.add_argument("--n", type=int, default=64, help="images per side of the audit (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="audit batch size (default 16)")
    parser.add_argument("--memory-batch-sizes", default=None,
                        help="comma-separated batch sizes for the per-family measurement (default: --batch-size), "
                        "e.g. 1,8,32")
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16", "16"),
                        help="autocast precision as the engine's --precision (auto: bf16 where supported)")
    parser.add_argument("--access", default="white", choices=("gray", "white"),
                        help="features of the full audit (default white: all 26)")
    parser.add_argument("--prompt", default=None, help="caption for images without one (text-to-image models)")
    parser.add_argument("--class-label", default=None, help="class for images without one (class-conditional models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-audit", action="store_true", help="only the per-family measurement")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the contiguous memory format")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (trusted models only)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store for the audit run (default: a temporary SQLite file, discarded)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if (args.suspect is None) != (args.control is None):
        parser.error("give both --suspect and --control, or neither (synthetic images)")
    if args.n < 10 or args.batch_size < 1:
        parser.error("--n must be >= 10 (the audit's minimum set size) and --batch-size >= 1")
    try:
        sizes = [int(s) for s in (args.memory_batch_sizes or str(args.batch_size)).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--memory-batch-sizes {args.memory_batch_sizes!r}: a comma-separated list of integers")
    if not sizes or min(sizes) < 1 or max(sizes) > 2 * args.n:
        parser.error(f"--memory-batch-sizes: each between 1 and 2 x --n = {2 * args.n}")
    args.memory_batch_sizes = sizes
    return args


# -- images --------------------------------------------------------------------------------------------------------

def synthetic_images(folder: Path, n: int, size: int, seed: int, prefix: str, conditioning: str) -> Path:
    """n smooth random RGB images (bicubic upsampling of 8 x 8 noise) with a caption or label each."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        name = f"{prefix}_{i:04d}.png"
        Image.fromarray(small, mode="RGB").resize((size, size), Image.Resampling.BICUBIC).save(folder / name)
        entry: dict[str, Any] = {"file_name": name}
        if conditioning == "text":
            entry["text"] = "a photo"
        elif conditioning == "class":
            entry["label"] = 0
        lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def first_images(source: str, folder: Path, n: int, role: str) -> Path:
    """The first n images of `source` (sorted, recursive) copied flat into `folder`, with their metadata."""
    from cdi.data import discover_images
    from cdi.data.images import MIN_SET_SIZE
    from cdi.errors import ImageSetError

    records = discover_images(source, role)[:n]
    if len(records) < MIN_SET_SIZE:
        raise ImageSetError(f"--{role} {source}: {len(records)} image(s), the audit needs at least {MIN_SET_SIZE}")
    if len(records) < n:
        logging.getLogger("gpu_check").warning("--%s %s: only %d images, fewer than --n %d", role, source,
                                               len(records), n)
    folder.mkdir(parents=True)
    lines = []
    for i, record in enumerate(records):
        name = f"{i:04d}_{record.name}"
        shutil.copyfile(record.path, folder / name)
        entry: dict[str, Any] = {"file_name": name}
        if record.label is not None:
            entry["label"] = record.label
        if record.caption is not None:
            entry["text"] = record.caption
        lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# -- measurements --------------------------------------------------------------------------------------------------

def _autocast(precision: str):
    import torch

    if precision in ("bf16", "16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def measure_families(adapter, records, batch_size: int, precision: str, channels_last: bool, seed: int) -> dict:
    """Encode one batch and run every planned family on it once; time and peak memory of each."""
    import torch

    from cdi.data import load_image
    from cdi.features import FEATURE_NAMES, FeatureBatch, FeatureConfig, plan_families

    info = adapter.info
    batch = [records[i % len(records)] for i in range(batch_size)]
    images = torch.stack([load_image(r.path, info.image_size, info.image_channels) for r in batch]).cuda()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = [r.label for r in batch]
    captions = [r.caption for r in batch]
    rows: dict[str, Any] = {}

    def run(name: str, fn) -> Any:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        try:
            out = fn()
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as exc:
            rows[name] = {"out_of_memory": True, "error": str(exc).splitlines()[0]}
            torch.cuda.empty_cache()
            return None
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated()
        rows[name] = {
            "seconds": seconds,
            "images_per_s": batch_size / seconds if seconds > 0 else None,
            "peak_allocated_bytes": peak,
            "peak_over_start_bytes": peak - before,
            "out_of_memory": False,
        }
        return out

    with _autocast(precision):
        def encode():
            with torch.no_grad():
                return adapter.encode(images).float(), adapter.condition(labels, captions)

        encoded = run("encode", encode)
        if encoded is None:
            return rows
        z0, cond = encoded
        features = FeatureBatch(z0=z0.detach(), cond=cond, sha256=[r.sha256 for r in batch], seed=seed)
        for family in plan_families(FEATURE_NAMES, FeatureConfig()):
            mode = torch.inference_mode() if family.access == "gray" else contextlib.nullcontext()

            def compute(family=family, mode=mode):
                with mode:
                    return family.compute(adapter, features)

            run(type(family).__name__, compute)
            rows[type(family).__name__].update({"access": family.access, "features": list(family.names)})
    del features, z0, cond, images
    torch.cuda.empty_cache()
    return rows


def warm_up(adapter, records, precision: str, channels_last: bool) -> None:
    """One encode, one forward and one input-gradient pass: CUDA context, kernels and cuBLAS handles."""
    import torch

    from cdi.data import load_image

    info = adapter.info
    image = load_image(records[0].path, info.image_size, info.image_channels)[None].cuda()
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with _autocast(precision):
        with torch.no_grad():
            z0 = adapter.encode(image).float()
            cond = adapter.condition([records[0].label], [records[0].caption])
        z = z0.detach().requires_grad_(True)
        t = adapter.timestep(100)
        loss = adapter.eps_hat(z, t, cond).float().square().sum()
        torch.autograd.grad(loss, z)
    torch.cuda.synchronize()


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, {result['pipeline_class']} at {result['image_size']}px, precision "
          f"{result['precision']}; weights on GPU {_gib(result['weights_bytes'])} GiB")
    for batch_size, rows in result["families"].items():
        print(f"\nbatch {batch_size}:")
        print(f"  {'family':<20}{'access':<8}{'s':>8}{'img/s':>9}{'peak GiB':>10}{'+start GiB':>12}")
        for name, row in rows.items():
            if row.get("out_of_memory"):
                print(f"  {name:<20}{row.get('access', ''):<8}  out of memory")
                continue
            print(f"  {name:<20}{row.get('access', ''):<8}{row['seconds']:>8.2f}{row['images_per_s']:>9.1f}"
                  f"{_gib(row['peak_allocated_bytes']):>10}{_gib(row['peak_over_start_bytes']):>12}")
    audit = result.get("audit")
    if audit:
        print(f"\naudit 2 x {result['n']} images, access {audit['access']}, batch {audit['batch_size']}: "
              f"{audit['seconds']:.1f} s, {audit['images_per_s']:.2f} images/s, "
              f"peak {_gib(audit['peak_allocated_bytes'])} GiB, "
              f"p = {audit['p_value']:.3g} ({audit['verdict']})"
              + ("" if audit["p_value_meaningful"] else " -- synthetic images: this p-value is meaningless"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with "
              "a GPU", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("gpu_check")

    from cdi.errors import CDIError

    scratch = Path(tempfile.mkdtemp(prefix="cdi-gpu-check-"))
    try:
        return _check(args, scratch, log)
    except CDIError as exc:  # a bad model, image folder or option: one line, as the CLI does
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check(args: argparse.Namespace, scratch: Path, log: logging.Logger) -> int:
    import torch

    import cdi
    import diffusers
    from cdi.audit import apply_conditioning, audit
    from cdi.features.extraction import ExtractionOptions
    from cdi.data import discover_images
    from cdi.features.extraction import half_precision_weights, resolve_precision
    from cdi.models import load_model

    diffusers.utils.logging.set_verbosity_error()  # the half-precision cast below is deliberate
    precision = resolve_precision(args.precision, "cuda")
    channels_last = not args.no_channels_last
    adapter = load_model(args.model, allow_pickle=args.allow_pickle)
    info = adapter.info
    synthetic = args.suspect is None
    if synthetic:
        log.warning("no --suspect/--control: using synthetic random images at %dpx; timings and memory are "
                    "valid, the audit's p-value is meaningless", info.image_size)
        suspect = synthetic_images(scratch / "suspect", args.n, info.image_size, args.seed, "p", info.conditioning)
        control = synthetic_images(scratch / "control", args.n, info.image_size, args.seed + 1, "u", info.conditioning)
    else:
        suspect = first_images(args.suspect, scratch / "suspect", args.n, "suspect")
        control = first_images(args.control, scratch / "control", args.n, "control")
    records = [*discover_images(suspect, "suspect"), *discover_images(control, "control")]
    records = apply_conditioning(records, adapter, args.prompt, args.class_label)

    torch.cuda.reset_peak_memory_stats()
    # As the engine: the denoiser's weights in bf16/fp16 while a half-precision extraction runs.
    with half_precision_weights(adapter, precision):
        adapter = adapter.cuda()
        if channels_last:
            adapter.to(memory_format=torch.channels_last)
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        result: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "device_total_bytes": torch.cuda.get_device_properties(0).total_memory,
            "host": platform.node(),
            "versions": {"cdi": cdi.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "cuda": torch.version.cuda},
            "model": str(Path(args.model).resolve()),
            "pipeline_class": info.pipeline_class,
            "family": info.family,
            "image_size": info.image_size,
            "precision": precision,
            "channels_last": channels_last,
            "n": args.n,
            "synthetic_images": synthetic,
            "weights_bytes": weights,
            "families": {},
        }
        warm_up(adapter, records, precision, channels_last)
        for batch_size in args.memory_batch_sizes:
            result["families"][str(batch_size)] = measure_families(adapter, records, batch_size, precision,
                                                                   channels_last, args.seed)
    del adapter
    torch.cuda.empty_cache()

    if not args.no_audit:
        uri = args.tracking_uri or f"sqlite:///{scratch / 'mlflow.db'}"
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        options = ExtractionOptions(batch_size=args.batch_size, device="cuda", precision=args.precision,
                                    progress=False, use_cache=False)
        found = audit(args.model, suspect, control, access=args.access, seed=args.seed, extraction=options,
                      allow_pickle=args.allow_pickle, power_resamples=0, prompt=args.prompt,
                      class_label=args.class_label, tracking_uri=uri, experiment=EXPERIMENT)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result["audit"] = {
            "access": args.access,
            "batch_size": args.batch_size,
            "seconds": seconds,
            "images_per_s": (found.n_suspect + found.n_control) / seconds,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "p_value": found.p_value,
            "verdict": found.verdict,
            "p_value_meaningful": not synthetic,
            "run_id": found.run_id if args.tracking_uri else None,
        }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
