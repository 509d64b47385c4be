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

Parts: bench_models.py (the models), pass_counting.py (the call counter and timer), naive_baseline.py (3.), this
file (1., 2., 4., the report).
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
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np
import torch

import cdi
from cdi import tracking
from cdi.data import ImageRecord, load_image
from cdi.features import FAMILIES, FEATURE_NAMES, FeatureConfig, extract
from cdi.features.extraction import cpu_has_native_bf16, half_precision_weights, resolve_device
from cdi.models import DiffusionAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The parts other benchmarks share (batching.py imports them through this module too):
from bench_models import DDPM_CIFAR10_UNET, REPO, cifar_model, demo_model  # noqa: E402, F401
from naive_baseline import NAIVE_FAMILIES, naive  # noqa: E402, F401
from pass_counting import (  # noqa: E402, F401
    FB_COST_FROZEN, FB_COST_TRAINABLE, FORWARD, FORWARD_BACKWARD, PassCounter, timed,
)

EXPERIMENT = "cdi-benchmarks"
MODELS = ("demo", "cifar")


# -- counting denoiser passes per engine family ----------------------------------------------------------------


@contextlib.contextmanager
def attribute_passes(counter: PassCounter, device: str):
    """Tag the counter with the engine's family, and time it, while its `compute` runs (patched in this process).

    The engine itself times each family (`ExtractionReport.family_seconds`, wall-clock, reported as such), but it
    neither counts model calls per family nor measures process CPU time, the clock that hardly moves with the load
    of a shared CPU; this wrapper adds both without changing what `compute` does."""

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


def machine_settings(device: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every speed benchmark records of the machine, the versions and its common options."""
    import diffusers

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cdi": cdi.__version__,
        "feature_config": FeatureConfig().to_dict(),
    }


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
        "settings": {**machine_settings(device, args), "precision": args.precision,
                     "timestep_batching": args.timestep_batching, "lightning": lightning.__version__},
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
