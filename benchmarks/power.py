"""Statistical power per image on a weak-signal testbed: how many images does each calibration need?

For each configuration (plain audit, difficulty-calibrated, reference-calibrated, both) the script
simulates audits of the fine-tuned testbed target (`mlflow_projects/weak_testbed`) and reports:

- **n80**: the smallest n per side at which at least 80 % of `--resamples` audits (n members of the
  fine-tune vs n never-seen images, drawn without replacement) reject at alpha = 0.01;
- the **false-positive rate** of the same configuration over `--null-audits` audits whose two sets are
  both drawn from the never-seen images (disjoint), with its exact binomial 95 % interval.

- the **predicted n80** from the effect size of the per-image score on all members vs all non-members
  (`predict`, normal approximation, with the permutation test's own critical shift), its bootstrap CI, and
  the predicted n80(plain) / n80(configuration) with a paired bootstrap CI (`predicted_ratio`): the testbed
  caps n at its 500 members, so beyond 500 only the prediction speaks.

Each simulated audit is the audit's own test: the calibration of `cdi.stats.difficulty` applied to the
audited images only (the covariate regression is refitted on each resample's pooled P and U), then the
exact permutation test of the whole cross-fitted pipeline (`cdi.stats.permutation`, B = `--permutations`).
Features are extracted once per image and model by `cdi.features.extract` (cached), the reference model is
the testbed's base model, queried with the same seeded noise as the target.

    python benchmarks/power.py --json benchmarks/results/power-weak-testbed.json
    python benchmarks/power.py --features DL --configurations plain,difficulty,difficulty-pca --json out.json

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
    "difficulty-pca": (False, "image+pca", "raw"),
    "reference+difficulty-pca": (True, "image+pca", "calibrated"),
    "difficulty-wiener": (False, "image+pca+wiener", "raw"),
    "reference+difficulty-wiener": (True, "image+pca+wiener", "calibrated"),
}
DEFAULT_CONFIGURATIONS = ("plain", "difficulty", "reference", "reference+difficulty", "reference-both")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", type=Path, default=ROOT / "benchmarks" / ".testbed",
                   help="testbed folder (built by mlflow_projects/weak_testbed/train.py when missing)")
    p.add_argument("--features", default="gray",
                   help="'gray' (the 14 gradient-free features), 'white' (26) or a comma-separated list (e.g. DL)")
    p.add_argument("--configurations", default=",".join(DEFAULT_CONFIGURATIONS),
                   help=f"comma-separated subset of {', '.join(CONFIGURATIONS)}")
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
    from cdi.audit import difficulty_covariates_of, wiener_noise_of
    from cdi.features import FeatureConfig
    from cdi.data import discover_images, load_image
    from cdi.stats.difficulty import difficulty_covariates
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
            # mode "image+pca": the same five statistics followed by the pixels (PCA fitted per audit)
            "covariates+pixels": np.stack([
                difficulty_covariates(load_image(r.path, info.image_size, info.image_channels).numpy(), pixels=True)
                for r in records]),
            # mode "image+pca+wiener": DL's seeded noise of each image (the extraction's seed, 0)
            "wiener": wiener_noise_of(records, target, FeatureConfig(), 0),
        }
        print(f"features of {len(records)} {role}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def _calibrated(data: dict, suspect_rows: np.ndarray, control_rows: np.ndarray, suspect_pool: str,
                configuration: tuple, names) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's input of one simulated audit and its labels: rows `suspect_rows` of the `suspect_pool`
    images ("members", or "nonmembers" for a null audit) against rows `control_rows` of the non-members.
    The calibration sees the pooled audited images only, without their labels."""
    from cdi.stats.difficulty import PIXEL_MODES, WienerNoise, calibrate

    use_reference, difficulty, representation = configuration
    suspect, control = data[suspect_pool], data["nonmembers"]
    covariates = "covariates+pixels" if difficulty in PIXEL_MODES else "covariates"
    pick = {key: np.vstack([suspect[key][suspect_rows], control[key][control_rows]])
            for key in ("target", "reference", covariates)}
    wiener = None
    if difficulty == "image+pca+wiener":
        draws = np.vstack([suspect["wiener"].draws[suspect_rows], control["wiener"].draws[control_rows]])
        wiener = WienerNoise(draws, suspect["wiener"].alpha_bar)
    found = calibrate(pick["target"], [pick["reference"]] if use_reference else [], names,
                      pick[covariates] if difficulty != "off" else None,
                      representation=representation, difficulty=difficulty, wiener=wiener)
    labels = np.r_[np.ones(len(suspect_rows), dtype=int), np.zeros(len(control_rows), dtype=int)]
    return found.values, labels


def _audit_p(data: dict, suspect_rows: np.ndarray, control_rows: np.ndarray, suspect_pool: str,
             configuration: tuple, names, permutations: int, seed: int) -> float:
    """p-value of one simulated audit (see `_calibrated`): the exact permutation test of the whole
    cross-fitted scorer."""
    from cdi.stats.permutation import cross_fitted_permutation_test

    values, labels = _calibrated(data, suspect_rows, control_rows, suspect_pool, configuration, names)
    return cross_fitted_permutation_test(values, labels, n_permutations=permutations, random_state=seed)[2]


def reject_probability(delta, permutations: int | None = None) -> np.ndarray:
    """P(reject) of a one-sided test at ALPHA whose statistic is N(delta, 1) (N(0, 1) under H0).

    permutations None: the ideal test, reject when T > z_{1-alpha}. Else the Monte Carlo permutation test with
    B = permutations: p = (1 + c) / (1 + B) < alpha, c ~ Binomial(B, q(T)) the null statistics reaching T,
    q(T) = 1 - Phi(T) (normal null); it rejects when c <= k = ceil(alpha (B + 1) - 1) - 1 (B = 199, alpha
    0.01: k = 0, no null statistic may reach T). Integrated over T by Gauss-Hermite quadrature.
    """
    from scipy import stats

    delta = np.asarray(delta, dtype=float)
    if permutations is None:
        return stats.norm.sf(stats.norm.isf(ALPHA) - delta)
    k = int(np.ceil(ALPHA * (permutations + 1) - 1 - 1e-9)) - 1
    if k < 0:
        return np.zeros_like(delta)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    t = delta[..., None] + nodes
    return (stats.binom.cdf(k, permutations, stats.norm.sf(t)) * weights).sum(-1) / weights.sum()


def required_shift(permutations: int | None = None) -> float:
    """delta* with reject_probability(delta*) = TARGET_POWER: z_{1-alpha} + z_{0.8} = 3.17 for the ideal test."""
    from scipy import optimize, stats

    if permutations is None:
        return float(stats.norm.isf(ALPHA) + stats.norm.ppf(TARGET_POWER))
    return float(optimize.brentq(lambda x: reject_probability(x, permutations) - TARGET_POWER, 0.0, 20.0))


def predicted_n80_of(d: float, permutations: int | None = None) -> float:
    """n per side at which the normal approximation of the one-sided two-sample test reaches power 0.8:
    the statistic is about N(d sqrt(n / 2), 1), so n80 = 2 delta*^2 / d^2 (infinite for d <= 0)."""
    return float(2.0 * required_shift(permutations) ** 2 / d**2) if d > 0 else float("inf")


def _scores(data: dict, configuration: tuple, names, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-image score on ALL members vs ALL non-members (calibration fitted on those images pooled), labels,
    and what the score is (see `predict`)."""
    from cdi.stats.scoring import CrossFittedScorer

    n_members, n_nonmembers = len(data["members"]["target"]), len(data["nonmembers"]["target"])
    values, labels = _calibrated(data, np.arange(n_members), np.arange(n_nonmembers), "members", configuration,
                                 names)
    if values.shape[1] == 1:
        score, basis = values[:, 0], "calibrated feature"
        if score[labels == 1].mean() < score[labels == 0].mean():
            score = -score
    else:
        score = CrossFittedScorer(random_state=seed).fit(values, labels).oof_scores_
        basis = "out-of-fold scores of the cross-fitted scorer"
    return score, labels, basis


def _n80_or_none(d: float, permutations: int | None) -> float | None:
    found = predicted_n80_of(d, permutations)
    return None if not np.isfinite(found) else found  # JSON has no infinity: None = not reachable


def predict(data: dict, configuration: tuple, names, permutations: int, seed: int, bootstrap: int = 2000,
            sizes=()) -> tuple[dict, np.ndarray]:
    """Predicted n80 from the standardised effect size d of the per-image score on ALL members vs ALL
    non-members (the calibration fitted on those 1000 images pooled); returns the prediction and the score.

    Score: the calibrated feature itself for a single feature (oriented once, on the full data, so that
    members score higher), else the out-of-fold scores of the cross-fitted scorer (5 folds, each trained on
    800 images: better trained than the scorer of a small audit, so the prediction is optimistic there).
    d is Hedges' g with a stratified percentile bootstrap CI (`cdi.stats.effect.effect_size`, scores
    resampled, calibration not refitted). Two predictions: the formula 2 (z_{1-alpha} + z_{0.8})^2 / d^2 of
    the ideal test, and the same for the benchmark's test with B = `permutations` (`reject_probability`),
    which is the one to compare with the measured n80. `predicted_power` gives the second test's power at
    each n of `sizes` (statistic N(d sqrt(n / 2), 1)).
    """
    from sklearn.metrics import roc_auc_score

    from cdi.stats.effect import effect_size

    score, labels, basis = _scores(data, configuration, names, seed)
    effect = effect_size(score[labels == 1], score[labels == 0], n_resamples=bootstrap, random_state=seed)
    d = effect.hedges_g
    found = {"basis": basis, "d": d, "d_ci": [effect.ci_low, effect.ci_high],
             "auc": float(roc_auc_score(labels, score)),
             "n80_formula": _n80_or_none(d, None),
             "n80_formula_ci": [_n80_or_none(effect.ci_high, None), _n80_or_none(effect.ci_low, None)],
             "n80_permutation_test": _n80_or_none(d, permutations),
             "n80_permutation_test_ci": [_n80_or_none(effect.ci_high, permutations),
                                         _n80_or_none(effect.ci_low, permutations)],
             "predicted_power": {str(int(n)): float(reject_probability(max(d, 0.0) * np.sqrt(n / 2.0), permutations))
                                 for n in sizes},
             "note": "extrapolation from the effect size on all images, normal approximation; "
                     "a CI bound of null means d's bound is <= 0 (not reachable)"}
    return found, score


def _cohen_d(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """d of each row pair (bootstrap replicates along axis 0)."""
    pooled = np.sqrt((members.var(axis=-1, ddof=1) + nonmembers.var(axis=-1, ddof=1)) / 2.0)
    return (members.mean(axis=-1) - nonmembers.mean(axis=-1)) / pooled


def predicted_ratio(plain: np.ndarray, other: np.ndarray, labels: np.ndarray, bootstrap: int = 2000,
                    seed: int = 0) -> dict:
    """Predicted n80(plain) / n80(other) = (d_other / d_plain)^2, with a paired stratified bootstrap CI
    (the same images resampled for both scores, so their shared per-image noise cancels), and the bootstrap
    share of replicates with a ratio >= 3 (a plain d <= 0 counts as an infinite ratio)."""
    rng = np.random.default_rng(seed)
    members, nonmembers = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rows_m = members[rng.integers(0, len(members), (bootstrap, len(members)))]
    rows_n = nonmembers[rng.integers(0, len(nonmembers), (bootstrap, len(nonmembers)))]
    d_plain = _cohen_d(plain[rows_m], plain[rows_n])
    d_other = _cohen_d(other[rows_m], other[rows_n])
    point_plain, point_other = _cohen_d(plain[members], plain[nonmembers]), _cohen_d(other[members], other[nonmembers])
    r = d_plain / d_other  # n80 ratio = 1 / r^2 where r > 0; r <= 0: plain unreachable
    low, high = np.percentile(r, [2.5, 97.5])
    as_ratio = lambda x: None if x <= 0 else float(1.0 / x**2)  # None: unbounded
    return {"ratio": as_ratio(point_plain / point_other) if point_other > 0 else None,
            "ratio_ci": [as_ratio(high), as_ratio(low)],
            "share_at_least_3": float(np.mean((r <= 1.0 / np.sqrt(3.0)) & (d_other > 0))),
            "bootstrap": bootstrap,
            "note": "n80(plain) / n80(this) from the effect sizes, paired bootstrap of images; "
                    "a CI bound of null is unbounded (plain's d <= 0 in that replicate)"}


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
            if result.get("predicted", {}).get("n80_permutation_test") is not None:
                mlflow.log_metric(f"{name.replace('+', '_')}.predicted_n80", result["predicted"]["n80_permutation_test"])
            if result.get("predicted", {}).get("d") is not None:
                mlflow.log_metric(f"{name.replace('+', '_')}.effect_size_d", result["predicted"]["d"])
            if (result.get("predicted_ratio_to_plain") or {}).get("ratio") is not None:
                mlflow.log_metric(f"{name.replace('+', '_')}.predicted_n80_ratio_to_plain",
                                  result["predicted_ratio_to_plain"]["ratio"])
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
    scores = {}
    for name in args.configurations.split(","):
        print(f"{name}:", flush=True)
        started = time.perf_counter()
        results["configurations"][name] = simulate(
            data, CONFIGURATIONS[name], names, sizes, args.resamples, args.null_audits, args.null_n,
            args.permutations, args.seed)
        results["configurations"][name]["predicted"], scores[name] = predict(
            data, CONFIGURATIONS[name], names, args.permutations, args.seed, sizes=sizes)
        results["configurations"][name]["seconds"] = time.perf_counter() - started
    plain = results["configurations"].get("plain", {}).get("n80")
    for name, result in results["configurations"].items():
        bound = result["n80"] or result["n80_lower_bound"]
        result["n80_ratio_to_plain"] = None if plain is None or result["n80"] is None else plain / result["n80"]
        plain_predicted = results["configurations"].get("plain", {}).get("predicted", {}).get("n80_permutation_test")
        mine = result["predicted"]["n80_permutation_test"]
        result["predicted_n80_ratio_to_plain"] = None if plain_predicted is None or mine is None else plain_predicted / mine
        if "plain" in scores and name != "plain":
            labels = np.r_[np.ones(len(data["members"]["target"]), dtype=int),
                           np.zeros(len(data["nonmembers"]["target"]), dtype=int)]
            result["predicted_ratio_to_plain"] = predicted_ratio(scores["plain"], scores[name], labels,
                                                                 seed=args.seed)
        fp = result["false_positive"]
        print(f"{name:22s} n80 = {result['n80'] if result['n80'] else '> %s' % bound}"
              f"  false positives {fp['rejected']}/{fp['audits']} = {fp['rate']:.3f} "
              f"[{fp['ci_low']:.3f}, {fp['ci_high']:.3f}]")
        pred = result["predicted"]
        show = lambda v: "unreachable" if v is None else f"{v:.0f}"
        print(f"{'':22s} predicted n80 {show(pred['n80_formula'])} (ideal test, CI "
              f"{show(pred['n80_formula_ci'][0])}-{show(pred['n80_formula_ci'][1])}), "
              f"{show(pred['n80_permutation_test'])} (B = {args.permutations}, CI "
              f"{show(pred['n80_permutation_test_ci'][0])}-{show(pred['n80_permutation_test_ci'][1])}); "
              f"d = {pred['d']:.3f} [{pred['d_ci'][0]:.3f}, {pred['d_ci'][1]:.3f}], AUC {pred['auc']:.3f}")
        if "predicted_ratio_to_plain" in result:
            ratio = result["predicted_ratio_to_plain"]
            shown = lambda v: "unbounded" if v is None else f"{v:.2f}"
            print(f"{'':22s} predicted n80 plain / this {shown(ratio['ratio'])} (CI {shown(ratio['ratio_ci'][0])}-"
                  f"{shown(ratio['ratio_ci'][1])}; P(>= 3) {ratio['share_at_least_3']:.2f})")
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
