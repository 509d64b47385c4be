"""`cdi search`: which features and scorer settings to audit with, searched on calibration data (Optuna)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdi.cli.common import (add_access_option, add_compute_options, add_progress_option, add_reference_option,
                            add_tracking_options, set_threads)
from cdi.options import comma_list, count
NAME, HELP = "search", "search features and scorer settings on calibration data (Optuna), export best_config.yaml"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from cdi.tracking import search as search_layout

    search = commands.add_parser(
        NAME, help=HELP,
        description="Calibration data: --members/--nonmembers of a reference model (default: the demo), or "
                    "--suspect/--control with --calibration-fraction held out of an owner's P and U.")
    search.set_defaults(run=run)
    search.add_argument("--model", default="demo/model", help="diffusers pipeline directory (default demo/model)")
    search.add_argument("--members", default=None, help="images the model was trained on (default demo/members)")
    search.add_argument("--nonmembers", type=comma_list, default=[],
                        help="comma-separated folders of images it was not trained on (default the demo's)")
    search.add_argument("--suspect", default=None, help="split mode: the owner's P; a fraction is held out")
    search.add_argument("--control", default=None, help="split mode: the owner's U; a fraction is held out")
    search.add_argument("--calibration-fraction", type=float, default=0.3,
                        help="split mode: fraction of P and of U held out for the search (default 0.3)")
    add_reference_option(search, "a model not trained on the calibration images, queried with the same seeded "
                                 "noise, so that the space's calibration section can search reference-calibrated "
                                 "features (as `cdi audit --reference-model`); may be given more than once")
    search.add_argument("--space", type=Path, default=None, help="search space YAML (default: built in, see --access)")
    add_access_option(search, help="built-in space: gray (DL, SecMI, PIA, PIAN, ML) or white (+ GM, NO; default)")
    search.add_argument("--n-trials", type=count, default=40, help="trials of this call (default 40)")
    search.add_argument("--n", type=count, default=50, help="images per side in each resample (default 50)")
    search.add_argument("--member-fraction", type=float, default=None,
                        help="share of members on the suspect side of each resample, the rest non-members, as when "
                             "only part of a published set was scraped; lower = harder calibration (default 1, "
                             "0.25 for the demo, whose model memorises strongly)")
    search.add_argument("--resamples", type=count, default=10, help="resamples per trial (default 10)")
    search.add_argument("--alpha", type=float, default=0.01, help="level for the reported power (default 0.01)")
    search.add_argument("--seed", type=count, default=0, help="seed of features, resamples and sampler (default 0)")
    search.add_argument("--multi-objective", action="store_true",
                        help="also minimise model passes per image (NSGA-II); reports the Pareto front")
    search.add_argument("--pruner", choices=("none", "median"), default="none",
                        help="stop a trial early when its running power after half its resamples lies below the "
                             "median of earlier trials' (Optuna's MedianPruner; single objective; default none)")
    search.add_argument("--study-name", default="cdi-search", help="Optuna study name (default cdi-search)")
    search.add_argument("--storage", default=None, type=lambda text: text or None,
                        help="study storage URL (sqlite:///search.db, postgresql://...); default (or empty) in memory; "
                             "watch it live with `optuna-dashboard URL`")
    search.add_argument("--n-workers", type=count, default=1,
                        help="worker processes on the study (default 1; more need --storage)")
    add_compute_options(search, batch_size=50)
    search.add_argument("--cache-dir", default=None, help="feature cache folder (default as for audit)")
    add_tracking_options(search, experiment=search_layout.EXPERIMENT)
    search.add_argument("--output", type=Path, default=None, help="also write best_config.yaml here")
    add_progress_option(search)
    return search


def run(args: argparse.Namespace) -> int:
    from cdi.errors import OptionError
    from cdi.search.run import run_search

    if args.n_workers > 1 and args.storage is None:
        raise OptionError(f"--n-workers {args.n_workers}: worker processes share the study through a database; "
                          "add --storage sqlite:///search.db (or a postgresql:// URL)")
    if args.output is not None and args.output.is_dir():
        raise OptionError(f"--output {args.output}: is a directory; give a file name such as best_config.yaml")
    set_threads(args.threads)
    outcome = run_search(
        model=args.model, members=args.members, nonmembers=args.nonmembers, suspect=args.suspect,
        control=args.control, calibration_fraction=args.calibration_fraction, space=args.space, access=args.access,
        reference_models=args.reference_models,
        batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir, progress=not args.no_progress,
        n_trials=args.n_trials, n=args.n, member_fraction=args.member_fraction, n_resamples=args.resamples,
        alpha=args.alpha, seed=args.seed,
        multi_objective=args.multi_objective, pruner=args.pruner, study_name=args.study_name, storage=args.storage,
        n_workers=args.n_workers, experiment=args.experiment, tracking_uri=args.tracking_uri,
    )
    config = outcome.config
    objective = config.objective
    print(f"best (trial {objective['trial']}): {len(config.features)} features {','.join(config.features)}")
    print(f"  C = {config.C:.3g}, penalty {config.penalty}, folds {config.folds}, access {config.access}; "
          f"mean -log10 p = {objective['value']:.3g}, power {objective['power']:.2f} at alpha {objective['alpha']}, "
          f"{objective['passes_per_image']} model passes per image")
    chosen = config.feature_calibration
    if chosen.get("representation", "raw") != "raw" or chosen.get("difficulty_calibration", "off") != "off":
        print(f"  calibration: representation {chosen['representation']}"
              + (f" ({chosen['reference_formula']})" if chosen["representation"] != "raw" else "")
              + f", difficulty {chosen['difficulty_calibration']}")
    scored = outcome.study.trials[objective["trial"]].user_attrs.get("feature_calibration") or {}
    if "difficulty_calibration" not in chosen and scored.get("difficulty_calibration", "off") != "off":
        print(f"  trials scored with difficulty calibration {scored['difficulty_calibration']}, the audit's default "
              "for this model (the audit applies its own --difficulty-calibration)")
    for reference in config.calibration.get("reference_models", []):
        print(f"reference model: {reference['path']} (fingerprint {reference['fingerprint'][:12]})")
    for point in outcome.pareto_front:
        print(f"pareto: trial {point['trial']}: {point['passes_per_image']} passes/image, "
              f"mean -log10 p {point['strength']:.3g}, power {point['power']:.2f}: {','.join(point['features'])}")
    print(f"features {outcome.seconds_features:.1f} s, trials {outcome.seconds_trials:.1f} s")
    print(f"run: {outcome.run_id} (artifact best_config.yaml; audit with: cdi audit --from-search {outcome.run_id})")
    if args.output is not None:
        config.write(args.output)
        print(f"config: {args.output}")
    return 0
