"""The naive per-family baseline of the extraction benchmark, written plainly the way the CDI research code
works: seven independent passes over the image set (DL, SecMI, PIA, PIAN, ML, GM, NO), each re-reading and
re-encoding the images, weights trainable (every backward also computes weight gradients), PIA and PIAN each
with their own eps0, ML by its own forwards, NO with torch's L-BFGS. Same formulas, timesteps and seeded noise
as cdi's families, so the work is comparable and the features agree (`extraction.agreement`): an independent
implementation on purpose, the baseline the engine is measured against, not a copy the product uses."""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Callable, Sequence

import numpy as np
import torch

from cdi.data import ImageRecord, load_image
from cdi.features import FEATURE_NAMES, FeatureConfig
from cdi.features.gradient_masking import SHARED_NOISE
from cdi.features.seeded_noise import image_noise
from cdi.models import DiffusionAdapter
from pass_counting import PassCounter, timed


def l2(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=2, dim=1)


def naive_dl(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    t = adapter.timestep(config.dl_t)
    total = 0.0
    for draw in range(config.dl_draws):
        eps = image_noise(z0, sha256, seed, "DL", config.dl_t, draw)
        total = total + l2(adapter.eps_hat(adapter.q(z0, t, eps), t, cond) - eps)
    return {"DL": total / config.dl_draws}


def naive_secmi(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    def ddim(z, s, s_next):  # eta = 0: x0_hat = (z - sqrt(1-ab_s) e) / sqrt(ab_s); sqrt(ab_s') x0_hat + sqrt(1-ab_s') e
        e = adapter.eps_hat(z, s, cond)
        ab_s, ab_n = adapter.alpha_bar(s), adapter.alpha_bar(s_next)
        return ((ab_n.sqrt() * (z - (1 - ab_s).sqrt() * e) / ab_s.sqrt()) + (1 - ab_n).sqrt() * e).to(z.dtype)

    k, t_end = config.secmi_k, config.secmi_t
    z = z0
    for s in range(0, t_end, k):
        z = ddim(z, adapter.timestep(s), adapter.timestep(s + k))
    t, t_up = adapter.timestep(t_end), adapter.timestep(t_end + k)
    return {"SecMI": l2(z - ddim(ddim(z, t, t_up), t_up, t))}


def naive_pia(adapter, z0, cond, sha256, config: FeatureConfig, seed: int, normalised: bool = False) -> dict:
    t = adapter.timestep(config.pia_t)
    eps0 = adapter.eps_hat(z0, adapter.timestep(0), cond)  # PIA and PIAN each pay for their own eps0
    if normalised:
        eps0 = eps0 * math.sqrt(2 / math.pi) / eps0.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    value = (eps0 - adapter.eps_hat(adapter.q(z0, t, eps0), t, cond)).flatten(1).norm(p=config.pia_p, dim=1)
    return {"PIAN" if normalised else "PIA": value}


def naive_pian(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    return naive_pia(adapter, z0, cond, sha256, config, seed, normalised=True)


def naive_ml(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    eps = image_noise(z0, sha256, seed, SHARED_NOISE)
    out = {}
    for t_ref in config.multi_timesteps:
        t = adapter.timestep(t_ref)
        out[f"ML_{t_ref}"] = l2(adapter.eps_hat(adapter.q(z0, t, eps), t, cond) - eps)
    return out


def naive_gm(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    eps = image_noise(z0, sha256, seed, SHARED_NOISE)
    k = int(config.gm_mask_ratio * z0[0].numel())
    out = {}
    for t_ref in config.multi_timesteps:
        t = adapter.timestep(t_ref)
        z_t = adapter.q(z0, t, eps).detach().requires_grad_(True)
        l2(adapter.eps_hat(z_t, t, cond) - eps).sum().backward()  # weights trainable: fills their .grad too
        adapter.unet.zero_grad(set_to_none=True)
        mask = torch.zeros_like(z_t).flatten(1)
        mask.scatter_(1, z_t.grad.abs().flatten(1).topk(k, dim=1).indices, 1.0)
        mask = mask.view_as(z0)
        with torch.no_grad():
            z_m = mask * eps + (1 - mask) * z0
            out[f"GM_{t_ref}"] = l2(mask * (eps - z0) - mask * adapter.eps_hat(z_m, t, cond))
    return out


def naive_no(adapter, z0, cond, sha256, config: FeatureConfig, seed: int) -> dict:
    t = adapter.timestep(config.no_t)
    eps = image_noise(z0, sha256, seed, "NO", config.no_t)
    z_t = adapter.q(z0, t, eps).detach()
    delta = torch.zeros_like(z_t, requires_grad=True)  # one tensor for the whole batch, as the reference
    # The reference runs scipy's L-BFGS-B (maxiter 5, with a line search); torch's L-BFGS without a line search
    # diverges here (loss x8 on the demo), so use its strong-Wolfe search. It stops at max_eval = 6 evaluations.
    optimiser = torch.optim.LBFGS([delta], max_iter=5, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        adapter.unet.zero_grad(set_to_none=True)
        loss = l2(adapter.eps_hat(z_t + delta, t, cond) - eps).mean()  # a batch mean, as the reference
        loss.backward()
        return loss

    optimiser.step(closure)
    adapter.unet.zero_grad(set_to_none=True)
    with torch.no_grad():  # the objective itself at the optimum (cdi's definition, not the reference's re-noising)
        loss = l2(adapter.eps_hat(z_t + delta, t, cond) - eps)
    return {"NO_loss": loss, "NO_delta": l2(delta.detach())}


#: (family, function, needs input gradients): seven independent passes over the image set.
NAIVE_FAMILIES: tuple[tuple[str, Callable, bool], ...] = (
    ("DL", naive_dl, False),
    ("SecMI", naive_secmi, False),
    ("PIA", naive_pia, False),
    ("PIAN", naive_pian, False),
    ("ML", naive_ml, False),
    ("GM", naive_gm, True),
    ("NO", naive_no, True),
)


@contextlib.contextmanager
def trainable_weights(adapter: DiffusionAdapter):
    """Weights trainable as in the research code (every backward also computes weight gradients)."""
    adapter.unet.requires_grad_(True)
    try:
        yield
    finally:
        adapter.unet.zero_grad(set_to_none=True)
        adapter.unet.requires_grad_(False)


def naive(adapter: DiffusionAdapter, records: Sequence[ImageRecord], args: argparse.Namespace, device: str) -> dict:
    config = FeatureConfig()
    info = adapter.info
    counter = PassCounter(adapter.unet)
    values: dict[str, list[torch.Tensor]] = {}
    family_seconds: dict[str, dict[str, float]] = {}
    adapter.to(device)  # contiguous: the engine hands the model back in the layout it came in
    try:
        with trainable_weights(adapter):
            for family, compute, needs_grad in NAIVE_FAMILIES:
                counter.family = family
                with timed(family_seconds, family, device):
                    for first in range(0, len(records), args.batch_size):
                        batch = records[first : first + args.batch_size]
                        # Every family re-reads and re-encodes its images, as each reference script does.
                        x = torch.stack([load_image(r.path, info.image_size, info.image_channels) for r in batch])
                        with torch.no_grad():
                            z0 = adapter.encode(x.to(device)).float()
                        cond = adapter.condition([r.label for r in batch], [r.caption for r in batch])
                        sha256 = [r.sha256 for r in batch]
                        with contextlib.nullcontext() if needs_grad else torch.no_grad():
                            for name, value in compute(adapter, z0, cond, sha256, config, args.seed).items():
                                values.setdefault(name, []).append(value.detach().float().cpu())
    finally:
        counter.remove()
    matrix = np.stack([torch.cat(values[name]).numpy() for name in FEATURE_NAMES], axis=1).astype(np.float64)
    total = {clock: sum(s[clock] for s in family_seconds.values()) for clock in ("wall", "cpu")}
    return {"values": matrix, "seconds": total, "family_seconds": family_seconds, "counter": counter}
