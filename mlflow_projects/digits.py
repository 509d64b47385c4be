"""What the projects here (demo_target, weak_testbed) share: scikit-learn's digits in class-balanced seeded
splits, the 16x16 images the models see, the tiny pixel DDPM and its training loop. Each project's train.py
puts this folder on sys.path."""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from sklearn.datasets import load_digits

SIZE = 16


def split_digits(sizes, seed):
    """`sizes`: {split name: number of images}, dealt in that order. Each class is shuffled with a fixed seed
    and images are dealt round-robin over the ten classes, so every split is as class-balanced as its size
    allows. Returns the dataset, {name: sorted indices} and the indices left over (sorted)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)).tolist() for c in range(10)]

    def take(n):
        out = []
        while len(out) < n:
            c = len(out) % 10
            if not per_class[c]:
                raise ValueError("not enough digits of class %d for the requested split" % c)
            out.append(int(per_class[c].pop()))
        return sorted(out)

    splits = {name: take(n) for name, n in sizes.items()}
    return digits, splits, sorted(int(i) for rest in per_class for i in rest)


def to_image(pixels8x8):
    """8x8 array of 0..16 -> 16x16 grayscale PIL image (bicubic)."""
    arr = np.clip(np.round(pixels8x8 * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize((SIZE, SIZE), Image.BICUBIC)


def write_folders(digits, splits, out):
    """Each split as a folder of PNGs, `<out>/<split>/digit_<index>.png`."""
    for name, idx in splits.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i in idx:
            to_image(digits.images[i]).save(os.path.join(out, name, "digit_%04d.png" % i))


def tensor_of(digits, idx):
    """The images exactly as written to disk (the PNGs' pixels), in [-1, 1], shape (N, 1, 16, 16)."""
    x = np.stack([np.asarray(to_image(digits.images[i]), dtype=np.float32) for i in idx])
    return torch.from_numpy(x / 127.5 - 1.0).unsqueeze(1)


def build_model(channels=(32, 64)):
    """An unconditional one-channel 16x16 UNet2DModel (attention in the lower block) and its 1000-step
    linear-beta epsilon DDPMScheduler."""
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return unet, scheduler


def train(unet, scheduler, x, steps, lr, batch_size, seed, log, prefix="", log_every=100):
    """Epsilon-prediction DDPM training of `unet` on `x`: uniform t, AdamW, linear warm-up then cosine decay.
    All randomness comes from one generator seeded with `seed`. Every `log_every` steps `log(metrics, step)`
    gets the mean loss and the learning rate (names prefixed with `prefix`). Returns (seconds, [(step, loss)])."""
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    t0, running, order, pos, curve = time.time(), [], torch.empty(0, dtype=torch.long), 0, []
    for step in range(steps):
        if pos + batch_size > len(order):  # new epoch
            order, pos = torch.randperm(len(x), generator=gen), 0
        batch = x[order[pos:pos + batch_size]]
        pos += batch_size
        noise = torch.randn(batch.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            avg = float(np.mean(running))
            running = []
            curve.append((step + 1, avg))
            log({prefix + "loss": avg, prefix + "lr": sched.get_last_lr()[0]}, step + 1)
            if (step + 1) % 500 == 0 or step + 1 == steps:
                print("%sstep %5d  loss %.4f  %.0fs" % (prefix, step + 1, avg, time.time() - t0), flush=True)
    unet.eval()
    return time.time() - t0, curve


def save(unet, scheduler, path):
    """`unet` and `scheduler` as a DDPMPipeline folder, weights in safetensors."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
