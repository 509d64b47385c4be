"""The pixel UNet adapter: the contract's operations, safe loading and clear refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdi.errors import ModelError
from cdi.models import load_model

from builders import save_pipeline, tiny_unet


def test_contract_operations_match_the_scheduler(tiny_model):
    from diffusers import DDPMScheduler

    adapter = load_model(tiny_model)
    reference = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler").alphas_cumprod
    assert adapter.num_train_timesteps == 1000
    assert float(adapter.alpha_bar(100)) == pytest.approx(float(reference[100]), rel=1e-6)
    assert all(not p.requires_grad for p in adapter.parameters()), "weights must be frozen"
    z0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ab = float(reference[300])
    assert torch.allclose(adapter.q(z0, 300, eps), math.sqrt(ab) * z0 + math.sqrt(1 - ab) * eps, atol=1e-6)
    z = z0.clone().requires_grad_(True)
    adapter.eps_hat(z, 10, None).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # differentiable w.r.t. the input
    assert adapter.encode(z0) is z0  # pixel models: identity
    assert adapter.info.image_size == 8 and adapter.info.image_channels == 3
    assert len(adapter.info.fingerprint) == 64


def test_fingerprint_changes_with_the_weights(tmp_path, tiny_model):
    other = save_pipeline(tmp_path / "other", tiny_unet(seed=1))
    assert load_model(other).info.fingerprint != load_model(tiny_model).info.fingerprint


def test_class_conditional_unet_uses_its_labels(tmp_path):
    adapter = load_model(save_pipeline(tmp_path / "cond", tiny_unet(num_class_embeds=4)))
    assert adapter.info.conditioning == "class"
    z = torch.randn(2, 3, 8, 8)
    a = adapter.eps_hat(z, 50, adapter.condition([0, 0], [None, None]))
    b = adapter.eps_hat(z, 50, adapter.condition([3, 3], [None, None]))
    assert not torch.allclose(a, b)


def test_pickle_weights_need_allow_pickle(tmp_path):
    path = save_pipeline(tmp_path / "pickled", tiny_unet(), safe=False)
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.bin.*--allow-pickle"):
        load_model(path)
    assert load_model(path, allow_pickle=True).info.image_size == 8


def test_v_prediction_is_read_as_epsilon_and_sample_prediction_is_refused(tmp_path):
    unet = tiny_unet()
    adapter = load_model(save_pipeline(tmp_path / "v", unet, prediction_type="v_prediction"))
    z, t = torch.randn(2, 3, 8, 8), 400
    ab = float(adapter.alpha_bar(t))
    with torch.no_grad():
        v = unet(z, torch.tensor([t, t])).sample
        expected = math.sqrt(ab) * v + math.sqrt(1 - ab) * z  # eps from v (Salimans & Ho 2022)
        torch.testing.assert_close(adapter.eps_hat(z, t, None), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="'sample'"):
        load_model(save_pipeline(tmp_path / "x0", tiny_unet(), prediction_type="sample"))


def test_missing_index_and_unsupported_pipeline(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_model(tmp_path)
    index = json.loads((tiny_model / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="KandinskyPipeline.*supported: DDIMPipeline, DDPMPipeline, DiTPipeline"):
        load_model(fake)


def test_ddim_scheduler_pipeline_loads(tmp_path):
    path = save_pipeline(tmp_path / "ddim", tiny_unet(), scheduler_cls="DDIMScheduler")
    assert load_model(path).num_train_timesteps == 1000
