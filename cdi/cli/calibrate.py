"""`cdi calibrate`: false-positive rate and power of the audit on a model with known members and non-members."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdi.cli.common import (add_access_option, add_compute_options, add_progress_option, add_tracking_options,
                            check_output_path, set_threads, write_output)
from cdi.options import comma_list, count, positive_int

NAME, HELP = "calibrate", "false-positive rate and power on known members/non-members"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    calibrate = commands.add_parser(NAME, help=HELP)
    calibrate.set_defaults(run=run)
    calibrate.add_argument("--model", required=True, help="diffusers pipeline directory")
    calibrate.add_argument("--members", required=True, help="folder of images the model was trained on")
    calibrate.add_argument("--nonmembers", required=True, type=comma_list,
                           help="comma-separated folders of images it was not trained on")
    add_access_option(calibrate)
    calibrate.add_argument("--null-audits", type=positive_int, default=500, help="null audits (default 500)")
    calibrate.add_argument("--resamples", type=positive_int, default=100, help="resamples per power point")
    calibrate.add_argument("--permutations", type=positive_int, default=199,
                           help="permutations per simulated permutation test (default 199)")
    calibrate.add_argument("--seed", type=count, default=0, help="seed of noise draws and resamples (default 0)")
    add_compute_options(calibrate, batch_size=50)
    add_tracking_options(calibrate)
    calibrate.add_argument("--output", type=Path, default=None, help="write the calibration JSON here")
    add_progress_option(calibrate)
    return calibrate


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cdi.calibrate import run_calibration

    check_output_path(args.output)
    set_threads(args.threads)
    run_id, result = run_calibration(
        args.model, args.members, args.nonmembers, access=args.access, seed=args.seed, batch_size=args.batch_size,
        device=args.device, n_null=args.null_audits, n_resamples=args.resamples, n_permutations=args.permutations,
        tracking_uri=args.tracking_uri, progress=not args.no_progress,
    )
    for row in result.false_positive:
        print(f"false-positive rate ({row['test']}, alpha {row['alpha']}): {row['rate']:.3f} "
              f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] over {row['n_audits']} null audits")
    for row in result.power_vs_n:
        print(f"power at n = {row['n']}: {row['power']:.2f} (median p {row['median_p']:.2g})")
    for row in result.power_vs_contamination:
        print(f"power at contamination {row['contamination']}: {row['power']:.2f} (n = {row['n']})")
    print(f"run: {run_id}")
    if args.output:
        write_output(args.output, json.dumps(asdict(result), indent=2) + "\n", run_id)
    return 0
