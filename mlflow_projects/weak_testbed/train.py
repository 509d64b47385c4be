"""Build cdi's weak-signal testbed: a public base model fine-tuned on an owner's images.

Takes scikit-learn's digits (1797 images, ships with scikit-learn, no download), upsamples them to
16x16 grayscale like mlflow_projects/demo_target, and deals them (seeded, class-balanced) into
disjoint parts:

  members/      the owner's published images, used by the fine-tune   (suspect set P)
  nonmembers/   the owner's unpublished images, never trained on      (control set U)
  other/        third-party images mixed into the fine-tune (never in P or U)
  base_train/   the public base model's training data

It trains a tiny unconditional pixel DDPM (diffusers UNet2DModel, epsilon prediction, 1000-step
DDPMScheduler) on base_train -> <output>/base, then fine-tunes a copy of it on
members + other + a replay of base_train, in which the owner's images are a minority
-> <output>/target. Optionally (--reference-same-recipe 1) a second copy of base gets the same
fine-tuning recipe without the members -> <output>/reference_same_recipe.

The fine-tune is short, so the single-image membership signal of the target is weak (denoising-loss
AUC ~0.55) while the loss calibrated by the base model (same seeded noise) is clearly stronger.

Fully seeded and single-threaded by default, so two runs on one machine give the same weights bit
for bit. MLflow logging only if MLFLOW_TRACKING_URI is set or --tracking-uri is given.

    python train.py --output /path/to/testbed
"""

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import digits as digits_data  # noqa: E402  (mlflow_projects/digits.py, shared with the other project)
from digits import build_model, save, tensor_of, train  # noqa: E402

SIZE = digits_data.SIZE


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--n-members", type=int, default=500, help="owner's published images (P), fine-tuned on")
    p.add_argument("--n-nonmembers", type=int, default=500, help="owner's unpublished images (U)")
    p.add_argument("--n-other", type=int, default=200, help="third-party images mixed into the fine-tune")
    p.add_argument("--n-replay", type=int, default=350,
                   help="base_train images replayed in the fine-tune (capped at base_train's size)")
    p.add_argument("--base-steps", type=int, default=2000, help="optimiser steps of the base model")
    p.add_argument("--base-lr", type=float, default=1e-3, help="peak learning rate of the base model")
    p.add_argument("--finetune-steps", type=int, default=1000, help="optimiser steps of the fine-tune")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="peak learning rate of the fine-tune")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--channels", default="16,32", help="UNet block_out_channels, comma-separated")
    p.add_argument("--reference-same-recipe", type=int, default=0,
                   help="1: also fine-tune base with the same recipe without the members")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = bit-for-bit reproducible)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else no logging)")
    return p.parse_args(argv)


def split_digits(n_members, n_nonmembers, n_other, seed):
    """members, nonmembers and other, class-balanced (see digits.split_digits); base_train gets everything left."""
    digits, splits, rest = digits_data.split_digits(
        {"members": n_members, "nonmembers": n_nonmembers, "other": n_other}, seed)
    splits["base_train"] = rest
    return digits, splits


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.output)
    channels = [int(c) for c in args.channels.split(",")]
    started = time.time()

    digits, splits = split_digits(args.n_members, args.n_nonmembers, args.n_other, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    n_replay = min(args.n_replay, len(splits["base_train"]))
    replay = sorted(int(i) for i in rng.choice(splits["base_train"], size=n_replay, replace=False))
    finetune = sorted(splits["members"] + splits["other"] + replay)

    digits_data.write_folders(digits, splits, out)

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        run = mlflow.start_run()
        log = lambda metrics, step: mlflow.log_metrics(metrics, step=step)  # noqa: E731
    else:
        run, log = contextlib.nullcontext(), (lambda metrics, step: None)

    with run:
        # Base: the public model, trained on base_train only.
        torch.manual_seed(args.seed)
        base, scheduler = build_model(channels)
        n_params = sum(p.numel() for p in base.parameters())
        base_s, base_curve = train(base, scheduler, tensor_of(digits, splits["base_train"]), args.base_steps,
                                   args.base_lr, args.batch_size, args.seed, log, "base_")
        save(base, scheduler, os.path.join(out, "base"))

        # Target: a copy of base fine-tuned on members + other + replayed base_train images.
        target = copy.deepcopy(base)
        ft_s, ft_curve = train(target, scheduler, tensor_of(digits, finetune), args.finetune_steps,
                               args.finetune_lr, args.batch_size, args.seed + 2, log, "finetune_")
        save(target, scheduler, os.path.join(out, "target"))

        ref_s = 0.0
        reference_data = sorted(splits["other"] + replay)
        if args.reference_same_recipe:
            reference = copy.deepcopy(base)
            ref_s, _ = train(reference, scheduler, tensor_of(digits, reference_data), args.finetune_steps,
                             args.finetune_lr, args.batch_size, args.seed + 3, log, "reference_")
            save(reference, scheduler, os.path.join(out, "reference_same_recipe"))

        meta = {
            "source": "sklearn.datasets.load_digits (8x8, 0..16), scaled to 0..255, bicubic to 16x16",
            "args": {k: v for k, v in vars(args).items() if k not in ("tracking_uri", "output")},
            "n_params": n_params,
            "sizes": {**{name: len(idx) for name, idx in splits.items()}, "replay": n_replay,
                      "finetune": len(finetune)},
            "member_fraction_of_finetune": len(splits["members"]) / len(finetune),
            "models": {
                "base": "trained on base_train",
                "target": "base fine-tuned on members + other + replay",
                **({"reference_same_recipe": "base fine-tuned on other + replay (same recipe, no members)"}
                   if args.reference_same_recipe else {}),
            },
            "train_seconds": {"base": base_s, "finetune": ft_s, "reference_same_recipe": ref_s},
            "final_loss": {"base": base_curve[-1][1], "finetune": ft_curve[-1][1]},
            **splits,
            "replay": replay,
        }
        with open(os.path.join(out, "split.json"), "w") as f:
            json.dump(meta, f, indent=1)
        total = time.time() - started
        if tracking_uri:
            import mlflow

            mlflow.set_tag("cdi.role", "weak_testbed")
            mlflow.log_params({**meta["args"], "output": out, "n_params": n_params, "n_replay_used": n_replay,
                               "n_base_train": len(splits["base_train"]), "n_finetune": len(finetune)})
            mlflow.log_metrics({"base_train_seconds": base_s, "finetune_seconds": ft_s,
                                "reference_train_seconds": ref_s, "total_seconds": total})
            mlflow.log_artifact(os.path.join(out, "split.json"))
        print("built %s in %.0fs (base %.0fs, fine-tune %.0fs, reference %.0fs)"
              % (out, total, base_s, ft_s, ref_s), flush=True)


if __name__ == "__main__":
    main()
