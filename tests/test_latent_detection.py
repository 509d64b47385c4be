"""End to end: an audit detects the training images of a tiny latent diffusion model overfit on them.

Design (every number below is fixed and seeded; the test is deterministic on one CPU thread):

- Data: 96 images of one distribution, 16 x 16 RGB smooth random colour fields (per channel a sum of
  four random cosines of spatial frequency 0-2 with random amplitude and phase), drawn in one seeded
  stream and dealt round-robin into three sets of 32: members (P), held-out A (U), held-out B. Members
  and held-out images are therefore i.i.d.; only training tells them apart.
- Model: a DiTPipeline (`tests/latent_builders.py`): the tiny random VAE (frozen, used as a fixed
  encoder) and a class-conditional DiT transformer (2 layers, 4 heads x 16, patch 2: 16 tokens,
  about 0.2 M parameters) with one class; every image carries label 0 in metadata.jsonl. The random
  VAE's latents have a standard deviation of about 0.1, so the VAE's `scaling_factor` is set to
  1 / (standard deviation of the members' posterior means), as Stable Diffusion's factor is chosen
  (unit-variance latents); with the default 0.18215 the latents are ~0.02 and the noise drowns them.
- Training: only the denoiser, on the members' latents (posterior mean x scaling factor, exactly what
  the adapter's `encode` returns; checked after saving, with the schedule), epsilon-MSE on the first 4
  of the 8 output channels, timesteps uniform on 0..999 of the pipeline's (DDIM, linear-beta)
  schedule, the full member batch per step, AdamW lr 3e-3, TRAIN_STEPS = 400 steps. DiT's own 10 %
  label dropout stays on, as in DiT training. The fixture also checks that the members' t = 100 loss
  fell by at least 25 % (a clear message if training ever stops working).
- Audit: `cdi.audit.audit`, gray-box (14 features), default permutation test with 1000 permutations
  (smallest possible p = 1/1001 ~ 0.000999), 5 folds, alpha 0.01, no cache, no power curve.

Tolerance: members vs held-out A must give p < 0.01, verdict "used" and out-of-fold AUC > 0.75;
held-out B vs held-out A must give "not_detected" (p >= 0.01). With SEED = 0: members p = 0.000999
(the permutation floor; Welch p 1.7e-16, AUC 0.96), null pair p = 0.90. Seeds 0-9 (same design,
400 steps) all gave members p = 0.000999 (AUC 0.92-1.00, Welch p 2e-12 to 4e-44) and null-pair p
0.047-0.90; at 200 steps members were still at the floor for 5 of 5 seeds (AUC 0.77-0.92). The
members' margin is wide; the null pair is an exchangeable draw, so for an arbitrary seed it would
reject with probability ~alpha = 1 %, and SEED = 0 sits far from that edge. A failure therefore
means the pipeline (encoding, conditioning, features, scorer or test) lost the signal or invented
one, not bad luck. Runtime: about 15-30 s for the file on two busy CPU cores (model build and
training ~5-8 s, each audit ~2-6 s, the rest imports and MLflow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latent_builders import save_dit_components, tiny_dit_transformer, tiny_vae, write_metadata

pytest.importorskip("transformers")

N_PER_SET = 32
SIZE = 16
SEED = 0
TRAIN_STEPS = 400
LEARNING_RATE = 3e-3
ALPHA = 0.01


def smooth_fields(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """n images (n, size, size, 3) uint8: per channel a sum of 4 random low-frequency cosines."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3))
    for i in range(n):
        for c in range(3):
            field = np.zeros((size, size))
            for _ in range(4):
                fx, fy = rng.integers(0, 3, 2)
                field += rng.normal() * np.cos(2 * np.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * np.pi))
            images[i, :, :, c] = 0.5 + 0.18 * field
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _write_set(folder, images: np.ndarray, prefix: str):
    folder.mkdir(parents=True)
    names = []
    for i, image in enumerate(images):
        name = f"{prefix}_{i:03d}.png"
        Image.fromarray(image, mode="RGB").save(folder / name)
        names.append(name)
    write_metadata(folder, {name: {"label": 0} for name in names})
    return folder, [folder / name for name in names]


def _train_denoiser(transformer, z0: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int, steps: int) -> None:
    """Epsilon-MSE on the latents z0, the full batch per step."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(transformer.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    labels = torch.zeros(len(z0), dtype=torch.long)
    channels = z0.shape[1]
    transformer.train()
    for _ in range(steps):
        t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        out = transformer(z_t, timestep=t, class_labels=labels).sample[:, :channels]
        loss = torch.nn.functional.mse_loss(out, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def _member_loss(transformer, z0: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int, t: int = 100) -> float:
    """Epsilon-MSE of the members at timestep t, fixed noise: did training fit them?"""
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 1))
    ab = alphas_cumprod[t]
    timesteps = torch.full((len(z0),), t, dtype=torch.long)
    transformer.eval()
    with torch.no_grad():
        out = transformer(ab.sqrt() * z0 + (1 - ab).sqrt() * eps, timestep=timesteps,
                          class_labels=torch.zeros(len(z0), dtype=torch.long)).sample[:, : z0.shape[1]]
    return torch.nn.functional.mse_loss(out, eps).item()


def build_overfit_dit(root, seed: int = SEED, steps: int = TRAIN_STEPS):
    """(model dir, members, held-out A, held-out B) under `root`, with a DiT overfit on the members."""
    from diffusers import DDIMScheduler

    from cdi.data import load_image
    from cdi.models import load_model

    images = smooth_fields(3 * N_PER_SET, seed)
    members, member_files = _write_set(root / "members", images[0::3], "m")
    heldout_a, _ = _write_set(root / "heldout_a", images[1::3], "a")
    heldout_b, _ = _write_set(root / "heldout_b", images[2::3], "b")

    torch.manual_seed(seed)  # DiT's label dropout draws from the global generator
    vae = tiny_vae(seed).eval().requires_grad_(False)
    x = torch.stack([load_image(path, SIZE, 3) for path in member_files])
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    z0 = mean * vae.config.scaling_factor

    scheduler_cls = "DDIMScheduler"
    alphas_cumprod = DDIMScheduler(num_train_timesteps=1000).alphas_cumprod
    transformer = tiny_dit_transformer(num_classes=1, seed=seed, num_attention_heads=4, attention_head_dim=16,
                                       num_layers=2)
    before = _member_loss(transformer, z0, alphas_cumprod, seed)
    _train_denoiser(transformer, z0, alphas_cumprod, seed, steps)
    after = _member_loss(transformer, z0, alphas_cumprod, seed)
    assert after < 0.75 * before, f"the denoiser did not fit its members (t = 100 MSE {before:.3f} -> {after:.3f})"
    model = save_dit_components(root / "dit", transformer.eval(), vae, scheduler_cls)

    # The audit must see the latents and schedule the denoiser was trained on.
    adapter = load_model(model)
    torch.testing.assert_close(adapter.alphas_cumprod.float(), alphas_cumprod.float())
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(x), z0, rtol=1e-4, atol=1e-4)
    return model, members, heldout_a, heldout_b


@pytest.fixture(scope="module")
def overfit_dit(tmp_path_factory):
    return build_overfit_dit(tmp_path_factory.mktemp("latent-detection"))


def _audit(model, suspect, control, experiment, seed: int = SEED):
    from cdi.audit import audit
    from cdi.features import ExtractionOptions

    return audit(model, suspect, control, access="gray", alpha=ALPHA, seed=seed, power_resamples=0,
                 experiment=experiment,
                 extraction=ExtractionOptions(batch_size=32, device="cpu", progress=False, use_cache=False))


def test_audit_detects_the_members_of_an_overfit_latent_model(overfit_dit, tracking_uri):
    model, members, heldout_a, _ = overfit_dit
    result = _audit(model, members, heldout_a, "latent-detection-members")
    print(f"members vs held-out A: p = {result.p_value:.4g}, Welch p = {result.extras['welch_p_value']:.3g}, "
          f"AUC = {result.auc:.3f}")
    assert result.n_suspect == result.n_control == N_PER_SET
    assert result.p_value < ALPHA
    assert result.verdict == "used"
    assert result.auc > 0.75


def test_audit_does_not_flag_two_held_out_sets(overfit_dit, tracking_uri):
    model, _, heldout_a, heldout_b = overfit_dit
    result = _audit(model, heldout_b, heldout_a, "latent-detection-null")
    print(f"held-out B vs held-out A: p = {result.p_value:.4g}, Welch p = {result.extras['welch_p_value']:.3g}, "
          f"AUC = {result.auc:.3f}")
    assert result.p_value >= ALPHA
    assert result.verdict == "not_detected"
