"""Each feature family against an independent plain per-image computation from the raw UNet.

The references below use the UNet and the scheduler's alphas_cumprod directly, one image at a time,
written from the formulas of the method doc (section 3), not from cdi's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdi.features import FEATURE_NAMES, FeatureBatch, FeatureConfig, plan_families
from cdi.features.denoising_loss import DenoisingLoss
from cdi.features.gradient_masking import GradientMasking, MultipleLoss
from cdi.features.seeded_noise import image_noise
from cdi.features.noise_optimisation import NoiseOptimisation
from cdi.features.pia import PIA
from cdi.features.secmi import SecMI
from cdi.models import load_model

CONFIG = FeatureConfig()
SEED = 3


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    return FeatureBatch(z0=z0, cond=None, sha256=[f"{i:064x}" for i in (11, 22, 33)], seed=SEED)


def _raw(adapter):
    unet = adapter.unet
    ab = adapter.alphas_cumprod.double()

    def eps_hat(z, t):
        return unet(z, torch.tensor([t]), return_dict=False)[0].double()

    def noise(i, batch, feature, t="-", draw=0):
        return image_noise(batch.z0[i : i + 1], [batch.sha256[i]], SEED, feature, t, draw).double()

    return eps_hat, ab, noise


def _norm(x, p=2.0):
    return float((x.abs() ** p).sum() ** (1.0 / p))


def test_denoising_loss_matches_plain_loop(adapter, batch):
    eps_hat, ab, noise = _raw(adapter)
    got = DenoisingLoss(CONFIG).compute(adapter, batch).values["DL"]
    for i in range(3):
        z0 = batch.z0[i : i + 1].double()
        losses = []
        for r in range(5):
            e = noise(i, batch, "DL", 100, r)
            z = math.sqrt(ab[100]) * z0 + math.sqrt(1 - ab[100]) * e
            losses.append(_norm(eps_hat(z.float(), 100) - e))
        assert got[i].item() == pytest.approx(np.mean(losses), rel=1e-4)


def test_secmi_matches_plain_ddim_round_trip(adapter, batch):
    eps_hat, ab, _ = _raw(adapter)

    def step(z, s, s2):
        e = eps_hat(z.float(), s)
        x0 = (z - math.sqrt(1 - ab[s]) * e) / math.sqrt(ab[s])
        return math.sqrt(ab[s2]) * x0 + math.sqrt(1 - ab[s2]) * e

    got = SecMI(CONFIG).compute(adapter, batch).values["SecMI"]
    for i in range(3):
        z = batch.z0[i : i + 1].double()
        for s in [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]:
            z = step(z, s, s + 10)
        back = step(step(z, 100, 110), 110, 100)
        assert got[i].item() == pytest.approx(_norm(z - back), rel=1e-3)


def test_pia_and_pian_match_plain_loop_with_correct_constant(adapter, batch):
    eps_hat, ab, _ = _raw(adapter)
    got = PIA(CONFIG).compute(adapter, batch).values
    for i in range(3):
        z0 = batch.z0[i : i + 1].double()
        e0 = eps_hat(z0.float(), 0)
        z = math.sqrt(ab[200]) * z0 + math.sqrt(1 - ab[200]) * e0
        assert got["PIA"][i].item() == pytest.approx(_norm(e0 - eps_hat(z.float(), 200), 5), rel=1e-4)
        e0n = e0 / e0.abs().mean() * math.sqrt(2 / math.pi)
        assert float(e0n.abs().mean()) == pytest.approx(0.7978845608, rel=1e-9)  # E|N(0,1)|
        z = math.sqrt(ab[200]) * z0 + math.sqrt(1 - ab[200]) * e0n
        assert got["PIAN"][i].item() == pytest.approx(_norm(e0n - eps_hat(z.float(), 200), 5), rel=1e-4)


def test_gradient_masking_and_multiple_loss_match_plain_loop(adapter, batch):
    eps_hat, ab, noise = _raw(adapter)
    got = GradientMasking(CONFIG).compute(adapter, batch).values
    ml_only = MultipleLoss(CONFIG).compute(adapter, batch).values
    for i in range(3):
        z0 = batch.z0[i : i + 1].double()
        e = noise(i, batch, "GM_ML")
        for t in range(0, 1000, 100):
            z = (math.sqrt(ab[t]) * z0 + math.sqrt(1 - ab[t]) * e).float().requires_grad_(True)
            loss = torch.linalg.vector_norm(eps_hat(z, t) - e)
            loss.backward()
            assert got[f"ML_{t}"][i].item() == pytest.approx(loss.item(), rel=1e-4)
            assert ml_only[f"ML_{t}"][i].item() == pytest.approx(loss.item(), rel=1e-4)
            # mask: indices of the 20 % largest |gradient| entries, by a full sort
            flat = z.grad.abs().flatten()
            k = int(0.2 * flat.numel())
            order = np.argsort(-flat.numpy(), kind="stable")[:k]
            mask = torch.zeros(flat.numel(), dtype=torch.float64)
            mask[order] = 1.0
            mask = mask.view_as(z0)
            z_m = mask * e + (1 - mask) * z0
            with torch.no_grad():
                expected = _norm(mask * (e - z0) - mask * eps_hat(z_m.float(), t))
            assert got[f"GM_{t}"][i].item() == pytest.approx(expected, rel=1e-4)


def test_noise_optimisation_reports_the_minimised_objective_per_image(adapter, batch):
    eps_hat, ab, noise = _raw(adapter)
    family = NoiseOptimisation(CONFIG)
    delta, loss = family.optimise(adapter, batch)
    values = family.compute(adapter, batch).values
    for i in range(3):
        z0 = batch.z0[i : i + 1].double()
        e = noise(i, batch, "NO", 100)
        z_t = math.sqrt(ab[100]) * z0 + math.sqrt(1 - ab[100]) * e
        with torch.no_grad():
            at_zero = _norm(eps_hat(z_t.float(), 100) - e)
            at_optimum = _norm(eps_hat((z_t + delta[i : i + 1].double()).float(), 100) - e)
        # NO_loss is the objective evaluated at delta* itself (no re-noising), and it improved.
        assert values["NO_loss"][i].item() == pytest.approx(at_optimum, rel=1e-4)
        assert values["NO_loss"][i].item() < at_zero
        assert values["NO_delta"][i].item() == pytest.approx(_norm(delta[i].double()), rel=1e-5)
        # One image optimised alone gives the same result as inside the batch: no coupling.
        alone = FeatureBatch(z0=batch.z0[i : i + 1], cond=None, sha256=[batch.sha256[i]], seed=SEED)
        single = family.compute(adapter, alone).values
        assert single["NO_loss"].item() == pytest.approx(values["NO_loss"][i].item(), rel=1e-4)
        assert single["NO_delta"].item() == pytest.approx(values["NO_delta"][i].item(), rel=1e-3)


def test_noise_optimisation_spends_exactly_its_evaluation_budget(adapter, batch):
    calls = []
    original = adapter.eps_hat

    def counting(z, t, cond):
        calls.append(z.shape[0])
        return original(z, t, cond)

    adapter.eps_hat = counting
    try:
        NoiseOptimisation(FeatureConfig(no_evals=6)).compute(adapter, batch)
    finally:
        del adapter.eps_hat
    assert len(calls) == 6


def test_gray_box_plan_needs_no_gradients_and_white_box_covers_all_26(adapter, batch):
    from cdi.features import GRAY_BOX_FEATURES

    assert len(FEATURE_NAMES) == 26 and len(GRAY_BOX_FEATURES) == 14
    gray = plan_families(GRAY_BOX_FEATURES, CONFIG)
    assert all(f.access == "gray" for f in gray)
    with torch.no_grad():  # would raise if a gray family needed autograd
        values = {}
        for family in gray:
            values.update(family.compute(adapter, batch).values)
    assert set(GRAY_BOX_FEATURES) <= set(values)
    white = plan_families(FEATURE_NAMES, CONFIG)
    produced = set().union(*(f.names for f in white))
    assert set(FEATURE_NAMES) <= produced
    assert not any(isinstance(f, MultipleLoss) for f in white), "ML must come from GM's forward passes"
