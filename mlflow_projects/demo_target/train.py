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
import time

import mlflow

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

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
    for name, idx in splits.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i in idx:
            digits_data.to_image(digits.images[i]).save(os.path.join(out, name, "digit_%04d.png" % i))
    meta = {
        "source": "sklearn.datasets.load_digits (8x8, 0..16), scaled to 0..255, bicubic to 16x16",
        "seed": seed,
        **{name: idx for name, idx in splits.items()},
    }
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(meta, f, indent=1)


def build_model():
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return unet, scheduler


def main():
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.output)

    digits, splits = split_digits(args.n_members, args.n_heldout, args.seed)
    write_splits(digits, splits, out, args.seed)
    # Train on exactly what was written to disk: the members' PNGs, in [-1, 1].
    x = np.stack([np.asarray(digits_data.to_image(digits.images[i]), dtype=np.float32) for i in splits["members"]])
    x = torch.from_numpy(x / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 16, 16)

    unet, scheduler = build_model()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(100, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(1, warmup))
        * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in unet.parameters())

    with mlflow.start_run():
        mlflow.log_params({**vars(args), "output": out, "n_params": n_params, "image_size": SIZE})
        mlflow.set_tag("cdi.role", "demo_target")
        unet.train()
        t0, running, order, pos = time.time(), [], torch.empty(0, dtype=torch.long), 0
        for step in range(args.steps):
            if pos + args.batch_size > len(order):  # new epoch
                order, pos = torch.randperm(len(x), generator=gen), 0
            batch = x[order[pos:pos + args.batch_size]]
            pos += args.batch_size
            noise = torch.randn(batch.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
            loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                avg = float(np.mean(running))
                running = []
                mlflow.log_metrics({"loss": avg, "lr": sched.get_last_lr()[0]}, step=step + 1)
                if (step + 1) % 500 == 0 or step + 1 == args.steps:
                    print("step %5d  loss %.4f  %.0fs" % (step + 1, avg, time.time() - t0), flush=True)
        train_s = time.time() - t0
        mlflow.log_metric("train_seconds", train_s)

        unet.eval()
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
            os.path.join(out, "model"), safe_serialization=True
        )
        mlflow.log_artifact(os.path.join(out, "split.json"))
        print("trained %d steps in %.0fs; wrote %s" % (args.steps, train_s, out))


if __name__ == "__main__":
    main()
