"""Train the small bundled demo target for cdi.

Takes scikit-learn's digits (ships with scikit-learn, no download), upsamples
them to 16x16 grayscale and writes three disjoint folders:

  members/   the training set of the model (the "suspect" set P in a cdi audit)
  heldout/   never trained on (a control set U)
  heldout2/  never trained on either (a second, independent non-member set)

It then trains a tiny unconditional pixel-space DDPM (diffusers UNet2DModel,
epsilon prediction) on the members only, long enough to memorise them, so that
membership inference has a strong signal, and saves it as a DDPMPipeline in
<output>/model. Params and the loss curve go to MLflow.

    python train.py --output ../../demo
"""

import argparse
import json
import os
import sys

import mlflow
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import digits as digits_data  # noqa: E402  (mlflow_projects/digits.py, shared with the other project)

SIZE = digits_data.SIZE


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default="../../demo", help="output folder")
    p.add_argument("--n-members", type=int, default=100, help="training images")
    p.add_argument("--n-heldout", type=int, default=100, help="images per held-out folder")
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def split_digits(n_members, n_heldout, seed):
    """members, heldout and heldout2, class-balanced (see digits.split_digits)."""
    digits, splits, _ = digits_data.split_digits({"members": n_members, "heldout": n_heldout, "heldout2": n_heldout}, seed)
    return digits, splits


def write_splits(digits, splits, out, seed):
    digits_data.write_folders(digits, splits, out)
    meta = {
        "source": "sklearn.datasets.load_digits (8x8, 0..16), scaled to 0..255, bicubic to 16x16",
        "seed": seed,
        **{name: idx for name, idx in splits.items()},
    }
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main():
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.output)

    digits, splits = split_digits(args.n_members, args.n_heldout, args.seed)
    write_splits(digits, splits, out, args.seed)
    # Train on exactly what was written to disk: the members' PNGs, in [-1, 1].
    x = digits_data.tensor_of(digits, splits["members"])
    unet, scheduler = digits_data.build_model()
    n_params = sum(p.numel() for p in unet.parameters())

    with mlflow.start_run():
        mlflow.log_params({**vars(args), "output": out, "n_params": n_params, "image_size": SIZE})
        mlflow.set_tag("cdi.role", "demo_target")
        train_s, _ = digits_data.train(unet, scheduler, x, args.steps, args.lr, args.batch_size, args.seed,
                                       lambda metrics, step: mlflow.log_metrics(metrics, step=step), log_every=50)
        mlflow.log_metric("train_seconds", train_s)
        digits_data.save(unet, scheduler, os.path.join(out, "model"))
        mlflow.log_artifact(os.path.join(out, "split.json"))
        print("trained %d steps in %.0fs; wrote %s" % (args.steps, train_s, out))


if __name__ == "__main__":
    main()
