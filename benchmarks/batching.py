"""Timestep batching and reference models: CPU seconds per image of all 26 features, in one process.

For each model (the 0.69 M-parameter 16x16 one-channel demo DDPM, the DDPM-CIFAR10 UNet shape) and each
precision (32, bf16), with the same images, batch size and one thread:

- `extract` of all 26 features, timestep batching off (today's calls) and on (`--timestep-batching on`);
- the same with a reference model (a second model of the same shape, weights perturbed), as `cdi audit
  --reference-model` extracts: both models in one engine pass (`extract_models`: each batch decoded and
  noised once, one Trainer), reported as the ratio to the plain extraction; and, as `separate`, the two
  models' own passes one after the other (the way before the shared pass), with the ratio shared/separate;
- the naive per-family baseline of `benchmarks/extraction.py` (the research code's passes, weights
  trainable, float32), once per model;
- model calls and rows per image counted by a forward hook on the denoiser;
- with `--compile`, the same under `--compile on`, and its features against the eager ones;
- the features of the batched run against the unbatched ones (max relative difference per feature).

Ratios are against the float32 unbatched plain extraction measured in the same process (`baseline`).
Runs are interleaved over `--repeats`; times are medians of process CPU time.

    OMP_NUM_THREADS=1 python benchmarks/batching.py --json benchmarks/results/batching-$(date +%F).json

`--compile` adds the plain extraction under `--compile on` (torch.compile's warm-up timed apart, one batch per
precision and batching mode); `--precisions 32` keeps to float32; `--device cuda` times by the wall clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import extraction as bench  # noqa: E402  (benchmarks/extraction.py: models, naive baseline, pass counter)

from cdi import tracking  # noqa: E402
from cdi.features import FEATURE_NAMES, extract, extract_models  # noqa: E402
from cdi.models import DiffusionAdapter, load_model  # noqa: E402

EXPERIMENT = bench.EXPERIMENT
PRECISIONS = ("32", "bf16")
MODES = ("off", "on")


def reference_of(path: Path, seed: int) -> DiffusionAdapter:
    """A second model of the same shape: the target's weights plus 1 % seeded noise (its cost is the target's),
    under a fingerprint of its own, as every real reference has (its rows must not be read from the target's)."""
    adapter = load_model(path)
    own = hashlib.sha256(f"{adapter.info.fingerprint}/perturbed/{seed + 1}".encode()).hexdigest()
    adapter.info = dataclasses.replace(adapter.info, fingerprint=own)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in adapter.denoiser.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.01 * parameter.abs().mean() * noise)
    return adapter


class CallCounter:
    """Denoiser calls and rows, by whether the call's input needed a gradient."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = {"forward": 0, "forward_backward": 0}
        self.rows = {"forward": 0, "forward_backward": 0}
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        kind = "forward_backward" if torch.is_grad_enabled() and sample.requires_grad else "forward"
        self.calls[kind] += 1
        self.rows[kind] += int(sample.shape[0])

    def remove(self) -> None:
        self.handle.remove()


def run_extract(adapters: Sequence[DiffusionAdapter], records, args, precision: str, mode: str,
                compile: str = "off", shared: bool = True) -> dict:
    """Every adapter's 26 features, timed by CPU and wall clock: in one engine pass (`shared`, as audits extract
    a target and its references) or one `extract` per adapter."""
    options = dict(seed=args.seed, batch_size=args.batch_size, device=args.device, progress=False, use_cache=False,
                   precision=precision, threads=args.threads, timestep_batching=mode, compile=compile)
    counter = CallCounter(adapters[0].denoiser)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        if shared:
            values = [report.values for report in extract_models(adapters, list(records), FEATURE_NAMES, **options)]
        else:
            values = [extract(adapter, list(records), FEATURE_NAMES, **options).values for adapter in adapters]
    finally:
        counter.remove()
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "values": values[0],
            "reference_values": values[1] if len(values) > 1 else None,
            "calls": counter.calls, "rows": counter.rows}


def relative_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    return {name: float(rel[:, j].max()) for j, name in enumerate(FEATURE_NAMES)}


def bench_model(name: str, target: DiffusionAdapter, reference: DiffusionAdapter, records, args) -> dict:
    n = len(records)
    print(f"{name}: {n} images, batch {args.batch_size}, {args.threads} thread(s)", file=sys.stderr)
    for precision in PRECISIONS:  # warm-up: one batch per precision through the engine
        extract(target, list(records[: args.batch_size]), ("DL",), seed=args.seed, batch_size=args.batch_size,
                device=args.device, progress=False, use_cache=False, precision=precision, threads=args.threads)
    warmup: dict[str, dict[str, float]] = {}
    if args.compile:  # torch.compile's warm-up, timed apart: one batch per precision and batching mode
        for precision in PRECISIONS:
            for mode in MODES:
                result = run_extract([target], records[: args.batch_size], args, precision, mode, "on")
                warmup[f"{precision}/{mode}"] = {"cpu_s": result["cpu"], "wall_s": result["wall"]}
                print(f"{name}: compile warm-up {precision}/{mode}: {result['cpu']:.1f} CPU-s, {result['wall']:.1f} s",
                      file=sys.stderr)
    kinds = ("plain", "reference", "separate", *(("compiled",) if args.compile else ()))
    runs: dict[str, list[dict]] = {}
    naive_runs = []
    for repeat in range(args.repeats):
        for precision in PRECISIONS:
            for mode in MODES:
                for kind in kinds:
                    key = f"{precision}/{mode}/{kind}"
                    adapters = [target, reference] if kind in ("reference", "separate") else [target]
                    result = run_extract(adapters, records, args, precision, mode,
                                         "on" if kind == "compiled" else "off", shared=kind != "separate")
                    runs.setdefault(key, []).append(result)
                    print(f"{name}: {key}: {result['cpu'] / n:.4f} CPU-s/image (repeat {repeat + 1})", file=sys.stderr)
        if not args.no_naive:
            started = time.process_time()
            naive = bench.naive(target, records, argparse.Namespace(batch_size=args.batch_size, seed=args.seed),
                                args.device)
            naive_runs.append({"cpu": time.process_time() - started, "wall": naive["seconds"]["wall"],
                               "counter": naive["counter"]})
            print(f"{name}: naive: {naive_runs[-1]['cpu'] / n:.4f} CPU-s/image", file=sys.stderr)

    def per_image(key: str, clock: str = "wall" if args.device == "cuda" else "cpu") -> float:
        return statistics.median(run[clock] for run in runs[key]) / n

    baseline = per_image(f"{PRECISIONS[0]}/off/plain")
    table: dict[str, Any] = {}
    for key, repeats in runs.items():
        precision, mode, kind = key.split("/")
        first = repeats[0]
        table[key] = {
            "cpu_s_per_image": per_image(key),
            "wall_s_per_image": per_image(key, "wall"),
            "cpu_s_per_image_repeats": [run["cpu"] / n for run in repeats],
            "ratio_to_baseline": per_image(key) / baseline,
            "speedup_of_batching": per_image(f"{precision}/off/{kind}") / per_image(key),
            "speedup_of_compile": per_image(f"{precision}/{mode}/plain") / per_image(key),
            "reference_over_plain": per_image(f"{precision}/{mode}/reference") / per_image(f"{precision}/{mode}/plain"),
            "separate_over_plain": per_image(f"{precision}/{mode}/separate") / per_image(f"{precision}/{mode}/plain"),
            "shared_over_separate": per_image(f"{precision}/{mode}/reference") / per_image(f"{precision}/{mode}/separate"),
            "model_calls_per_image": {k: v / n for k, v in first["calls"].items()},
            "rows_per_image": {k: v / n for k, v in first["rows"].items()},
        }
    entry: dict[str, Any] = {
        "n_images": n,
        "image_shape": [target.info.image_channels, target.info.image_size, target.info.image_size],
        "parameters": sum(p.numel() for p in target.denoiser.parameters()),
        "baseline": f"{PRECISIONS[0]}/off/plain",
        "baseline_cpu_s_per_image": baseline,
        "runs": table,
        "batched_vs_unbatched_max_rel_diff": {
            precision: relative_difference(runs[f"{precision}/on/plain"][0]["values"],
                                           runs[f"{precision}/off/plain"][0]["values"])
            for precision in PRECISIONS
        } if set(MODES) == {"off", "on"} else {},
        "shared_equals_separate": {  # both models' features, bit for bit
            f"{precision}/{mode}": bool(all(np.array_equal(runs[f"{precision}/{mode}/reference"][0][k],
                                                           runs[f"{precision}/{mode}/separate"][0][k])
                                            for k in ("values", "reference_values")))
            for precision in PRECISIONS for mode in MODES
        },
        "compile_warmup": warmup,
        "compiled_vs_eager_max_rel_diff": {
            f"{precision}/{mode}": relative_difference(runs[f"{precision}/{mode}/compiled"][0]["values"],
                                                       runs[f"{precision}/{mode}/plain"][0]["values"])
            for precision in PRECISIONS for mode in MODES
        } if args.compile else {},
        "bf16_vs_32_max_rel_diff": relative_difference(runs["bf16/off/plain"][0]["values"],
                                                       runs["32/off/plain"][0]["values"])
        if {"32", "bf16"} <= set(PRECISIONS) else {},
    }
    if naive_runs:
        naive_s = statistics.median(run["wall" if args.device == "cuda" else "cpu"] for run in naive_runs) / n
        passes = naive_runs[0]["counter"].per_image(n)
        entry["naive"] = {
            "cpu_s_per_image": naive_s,
            "cpu_s_per_image_repeats": [run["cpu"] / n for run in naive_runs],
            "passes_per_image": {"forward": passes["forward"], "forward_backward": passes["forward_backward"]},
            "speedup_vs_naive": {key: naive_s / row["cpu_s_per_image"] for key, row in table.items()},
        }
    return entry


def print_table(results: dict) -> None:
    s = results["settings"]
    print(f"\n{s['device']} {s['device_name']}, torch {s['torch']}, {s['threads']} thread(s), batch {s['batch_size']}, {s['clock']} time")
    for name, entry in results["models"].items():
        print(f"\n{name}: {entry['n_images']} images {entry['image_shape']}, {entry['parameters'] / 1e6:.2f} M params; "
              f"baseline (32, unbatched, plain) {entry['baseline_cpu_s_per_image']:.4f} s/image")
        print(f"  {'precision/batching/model':<26}{'s/image':>9}{'x base':>8}{'batch x':>9}{'ref/plain':>10}"
              f"{'shared/sep':>11}{'calls/img':>10}{'vs naive':>10}")
        for key, row in entry["runs"].items():
            calls = sum(row["model_calls_per_image"].values())
            naive = entry.get("naive", {}).get("speedup_vs_naive", {}).get(key, float("nan"))
            print(f"  {key:<26}{row['cpu_s_per_image']:>9.4f}{row['ratio_to_baseline']:>8.3f}"
                  f"{row['speedup_of_batching']:>9.3f}{row['reference_over_plain']:>10.3f}{row['shared_over_separate']:>11.3f}"
                  f"{calls:>10.2f}{naive:>10.3f}")
        same = entry["shared_equals_separate"]
        print(f"  one pass over target and reference vs their own passes: features bit-identical in "
              f"{sum(same.values())}/{len(same)} precision/batching settings")
        if "naive" in entry:
            print(f"  naive (research code's passes, float32): {entry['naive']['cpu_s_per_image']:.4f} s/image")
        for precision, diffs in entry["batched_vs_unbatched_max_rel_diff"].items():
            worst = max(diffs, key=diffs.get)
            identical = sum(value == 0 for value in diffs.values())
            print(f"  batched vs unbatched, {precision}: {identical}/26 features bit-identical, max rel. diff "
                  f"{diffs[worst]:.2e} ({worst})")
        for variant, diffs in entry.get("compiled_vs_eager_max_rel_diff", {}).items():
            worst = max(diffs, key=diffs.get)
            print(f"  compiled vs eager, {variant}: max rel. diff {diffs[worst]:.2e} ({worst}); warm-up "
                  f"{entry['compile_warmup'][variant]['cpu_s']:.1f} CPU-s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,cifar")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: times are wall-clock seconds (CPU time means nothing there)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--demo-images", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=4, help="random images for the CIFAR-shape model")
    parser.add_argument("--demo-model", default=str(bench.REPO / "demo" / "model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive per-family baseline")
    parser.add_argument("--compile", action="store_true",
                        help="also measure --compile on (plain extraction; warm-up timed apart)")
    parser.add_argument("--precisions", default="32,bf16")
    parser.add_argument("--modes", default="off,on", help="timestep batching modes to measure (off,on)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    global PRECISIONS, MODES
    PRECISIONS = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    MODES = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not MODES or "off" not in MODES or not set(MODES) <= {"off", "on"}:
        parser.error(f"--modes {args.modes!r}: off, or off,on (off is the baseline)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    tracking_uri = None if args.no_mlflow else tracking.resolve_tracking_uri(args.tracking_uri)
    if tracking_uri:
        tracking.connect(tracking_uri, EXPERIMENT)
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    results: dict[str, Any] = {
        "settings": {
            "benchmark": "batching",
            **bench.machine_settings(args.device, args),
            "clock": "wall" if args.device == "cuda" else "cpu",
            "repeats": args.repeats,
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp:
        for name in models:
            if name == "demo":
                loaded = bench.demo_model(args)
                if loaded is None:
                    continue
                target, records = loaded
                path = Path(args.demo_model)
            else:
                target, records = bench.cifar_model(args, Path(tmp))
                path = Path(tmp) / "cifar-model"
            results["models"][name] = bench_model(name, target, reference_of(path, args.seed), records, args)
        print_table(results)
        json_path = args.json or Path(tmp) / "batching.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        if tracking_uri:
            import mlflow

            params = {k: v for k, v in results["settings"].items() if not isinstance(v, dict)}
            metrics: dict[str, float] = {}
            for name, entry in results["models"].items():
                params[f"{name}.n_images"] = entry["n_images"]
                metrics.update(bench.flatten(name, {k: v for k, v in entry.items() if k not in ("image_shape",)}))
            metrics = {k.replace("/", "."): v for k, v in metrics.items()}
            with tracking.audit_run(tracking_uri, EXPERIMENT, run_name="batching-cpu"):
                tracking.log_params(params)
                tracking.log_metrics(metrics)
                mlflow.log_artifact(str(json_path))
    print(f"\nlogged to {tracking_uri} (experiment {EXPERIMENT})" if tracking_uri else "", args.json or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
