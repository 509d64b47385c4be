"""Statistical power per image on a weak-signal testbed: how many images does each calibration need?

For each configuration (plain audit, difficulty-calibrated, reference-calibrated, both) the script
simulates audits of the fine-tuned testbed target (`mlflow_projects/weak_testbed`) and reports:

- **n80**: the smallest n per side at which at least 80 % of `--resamples` audits (n members of the
  fine-tune vs n never-seen images, drawn without replacement) reject at alpha = 0.01;
- the **false-positive rate** of the same configuration over `--null-audits` audits whose two sets are
  both drawn from the never-seen images (disjoint), with its exact binomial 95 % interval.

Each simulated audit is the audit's own test: the calibration of `cdi.stats.difficulty` applied to the
audited images only (the covariate regression is refitted on each resample's pooled P and U), then the
exact permutation test of the whole cross-fitted pipeline (`cdi.stats.permutation`, B = `--permutations`).
Features are extracted once per image and model by `cdi.features.extract` (cached), the reference model is
the testbed's base model, queried with the same seeded noise as the target.

    python benchmarks/power.py --json benchmarks/results/power-weak-testbed.json

Not a test: nothing is asserted. Results and conclusions: benchmarks/README.md, "Statistical power".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TESTBED_SCRIPT = ROOT / "mlflow_projects" / "weak_testbed" / "train.py"
ALPHA = 0.01
TARGET_POWER = 0.8
DEFAULT_SIZES = (10, 20, 30, 50, 70, 100, 150, 200, 300, 400, 500)
CONFIGURATIONS = {
    # name: (use the reference model, difficulty calibration, representation)
    "plain": (False, "off", "raw"),
    "difficulty": (False, "image", "raw"),
    "reference": (True, "off", "calibrated"),
    "reference+difficulty": (True, "image", "calibrated"),
    "reference-both": (True, "off", "both"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", type=Path, default=ROOT / "benchmarks" / ".testbed",
                   help="testbed folder (built by mlflow_projects/weak_testbed/train.py when missing)")
    p.add_argument("--features", default="gray",
                   help="'gray' (the 14 gradient-free features), 'white' (26) or a comma-separated list (e.g. DL)")
    p.add_argument("--configurations", default=",".join(CONFIGURATIONS), help="comma-separated subset")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="n per side to try, ascending")
    p.add_argument("--resamples", type=int, default=100, help="audits per n (default 100)")
    p.add_argument("--null-audits", type=int, default=200, help="null audits per configuration (default 200)")
    p.add_argument("--null-n", type=int, default=100, help="n per side of the null audits (default 100)")
    p.add_argument("--permutations", type=int, default=199, help="B of each permutation test (default 199)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mlflow.db); 'none' skips logging")
    return p.parse_args(argv)


def build_testbed(folder: Path) -> None:
    if (folder / "target" / "model_index.json").is_file() and (folder / "base" / "model_index.json").is_file():
        return
    print(f"building the weak-signal testbed in {folder} (once) ...", flush=True)
    subprocess.run([sys.executable, str(TESTBED_SCRIPT), "--output", str(folder)], check=True)


def extract_all(testbed: Path, names, batch_size: int) -> dict:
    """Features of members and non-members on the target and the base (reference), and image covariates."""
    from cdi.audit import difficulty_covariates_of
    from cdi.data import discover_images
    from cdi.features import extract
    from cdi.models import load_model

    target, base = load_model(testbed / "target"), load_model(testbed / "base")
    info = target.info
    out = {}
    for role in ("members", "nonmembers"):
        records = discover_images(testbed / role, role)
        started = time.perf_counter()
        out[role] = {
            "target": extract(target, records, names, batch_size=batch_size, device="cpu", progress=False).values,
            "reference": extract(base, records, names, batch_size=batch_size, device="cpu", progress=False).values,
            "covariates": difficulty_covariates_of(records, info.image_size, info.image_channels),
        }
        print(f"features of {len(records)} {role}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def _audit_p(data: dict, suspect_rows: np.ndarray, control_rows: np.ndarray, suspect_pool: str,
             configuration: tuple, names, permutations: int, seed: int) -> float:
    """p-value of one simulated audit: rows `suspect_rows` of the `suspect_pool` images ("members", or
    "nonmembers" for a null audit) against rows `control_rows` of the non-members."""
    from cdi.stats.difficulty import calibrate
    from cdi.stats.permutation import cross_fitted_permutation_test

    use_reference, difficulty, representation = configuration
    suspect, control = data[suspect_pool], data["nonmembers"]
    pick = {key: np.vstack([suspect[key][suspect_rows], control[key][control_rows]])
            for key in ("target", "reference", "covariates")}
    found = calibrate(pick["target"], [pick["reference"]] if use_reference else [], names,
                      pick["covariates"] if difficulty != "off" else None,
                      representation=representation, difficulty=difficulty)
    labels = np.r_[np.ones(len(suspect_rows), dtype=int), np.zeros(len(control_rows), dtype=int)]
    return cross_fitted_permutation_test(found.values, labels, n_permutations=permutations, random_state=seed)[2]


def simulate(data: dict, configuration: tuple, names, sizes, resamples: int, null_audits: int, null_n: int,
             permutations: int, seed: int) -> dict:
    from cdi.stats.error_rates import binomial_ci

    rng = np.random.default_rng(seed)
    n_members, n_nonmembers = len(data["members"]["target"]), len(data["nonmembers"]["target"])
    curve, n80 = [], None
    for n in sizes:
        if n > n_members or n > n_nonmembers:
            break
        p_values = [
            _audit_p(data, rng.choice(n_members, n, replace=False), rng.choice(n_nonmembers, n, replace=False),
                     "members", configuration, names, permutations, int(rng.integers(2**31)))
            for _ in range(resamples)
        ]
        power = float(np.mean(np.array(p_values) < ALPHA))
        curve.append({"n": int(n), "power": power, "median_p": float(np.median(p_values))})
        print(f"  n = {n:4d}: power {power:.2f}, median p {np.median(p_values):.3g}", flush=True)
        if power >= TARGET_POWER and n80 is None:
            n80 = int(n)
        if n80 is not None and len(curve) >= 2 and curve[-2]["power"] >= TARGET_POWER:
            break  # two sizes at the target: enough of the curve
    null_n = min(null_n, n_nonmembers // 2)
    rejected = 0
    for _ in range(null_audits):
        order = rng.permutation(n_nonmembers)
        p = _audit_p(data, order[:null_n], order[null_n:2 * null_n], "nonmembers", configuration, names,
                     permutations, int(rng.integers(2**31)))
        rejected += p < ALPHA
    low, high = binomial_ci(rejected, null_audits)
    return {"n80": n80, "n80_lower_bound": None if n80 is not None else int(curve[-1]["n"]) if curve else None,
            "power_curve": curve,
            "false_positive": {"rate": rejected / null_audits, "rejected": int(rejected), "audits": null_audits,
                               "n_per_side": int(null_n), "ci_low": low, "ci_high": high}}


def log_to_mlflow(uri: str | None, params: dict, results: dict, json_path: Path | None) -> None:
    if uri == "none":
        return
    from cdi import tracking

    import mlflow

    uri = tracking.resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cdi-benchmarks")
    with mlflow.start_run(run_name="power-weak-testbed"):
        mlflow.log_params(params)
        for name, result in results["configurations"].items():
            if result["n80"] is not None:
                mlflow.log_metric(f"{name.replace('+', '_')}.n80", result["n80"])
            mlflow.log_metric(f"{name.replace('+', '_')}.false_positive_rate", result["false_positive"]["rate"])
        if json_path is not None:
            mlflow.log_artifact(str(json_path))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from cdi.features import resolve_features

    names = (resolve_features(None, args.features) if args.features in ("gray", "white")
             else resolve_features(args.features.split(","), "white"))
    build_testbed(args.testbed)
    data = extract_all(args.testbed, names, args.batch_size)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {"configurations": {}}
    for name in args.configurations.split(","):
        print(f"{name}:", flush=True)
        started = time.perf_counter()
        results["configurations"][name] = simulate(
            data, CONFIGURATIONS[name], names, sizes, args.resamples, args.null_audits, args.null_n,
            args.permutations, args.seed)
        results["configurations"][name]["seconds"] = time.perf_counter() - started
    plain = results["configurations"].get("plain", {}).get("n80")
    for name, result in results["configurations"].items():
        bound = result["n80"] or result["n80_lower_bound"]
        result["n80_ratio_to_plain"] = None if plain is None or result["n80"] is None else plain / result["n80"]
        fp = result["false_positive"]
        print(f"{name:22s} n80 = {result['n80'] if result['n80'] else '> %s' % bound}"
              f"  false positives {fp['rejected']}/{fp['audits']} = {fp['rate']:.3f} "
              f"[{fp['ci_low']:.3f}, {fp['ci_high']:.3f}]")
    params = {"testbed": str(args.testbed), "features": ",".join(names), "sizes": args.sizes,
              "resamples": args.resamples, "null_audits": args.null_audits, "null_n": args.null_n,
              "permutations": args.permutations, "seed": args.seed, "alpha": ALPHA, "target_power": TARGET_POWER,
              "threads": args.threads}
    results.update({"params": params, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                    "n_members": int(len(data["members"]["target"])),
                    "n_nonmembers": int(len(data["nonmembers"]["target"]))})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    log_to_mlflow(args.tracking_uri, params, results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
