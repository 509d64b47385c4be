"""`cdi audit --lora`: a base pipeline plus a LoRA trained here for a few steps, audited end to end, with the base
model as the default reference (pixel DDPM, tiny Stable Diffusion and SDXL pipelines)."""

from __future__ import annotations

import json

import pytest
import torch

from builders import save_pipeline, tiny_unet, write_images
from cdi.cli import main

pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _train_lora(unet: torch.nn.Module, extra: dict, channels: int, size: int, steps: int = 3) -> dict:
    """A few Adam steps of the denoising loss on random latents through LoRA layers only; the LoRA state dict."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    # peft injects into any module (diffusers' UNet2DModel has no add_adapter)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=ATTENTION), unet)
    parameters = [p for name, p in unet.named_parameters() if "lora" in name]
    optimiser = torch.optim.Adam(parameters, lr=1e-2)
    for step in range(steps):
        z, eps = torch.randn(2, channels, size, size), torch.randn(2, channels, size, size)
        t = torch.full((2,), 100 + 300 * step)
        loss = torch.nn.functional.mse_loss(unet(z + eps, t, **extra).sample, eps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return get_peft_model_state_dict(unet)


def _pixel(root):
    from safetensors.torch import save_file

    pipe = save_pipeline(root / "pipe", tiny_unet())
    layers = _train_lora(tiny_unet(), {}, channels=3, size=8)
    save_file({f"unet.{key}": value.contiguous() for key, value in layers.items()}, root / "lora.safetensors")
    return pipe, root / "lora.safetensors"


def _latent(root, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers

    from latent_builders import save_sd_pipeline, save_sdxl_pipeline

    pipe = (save_sd_pipeline if family == "sd" else save_sdxl_pipeline)(root / "pipe")
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    config = unet.config
    extra = {"encoder_hidden_states": torch.randn(2, 5, config.cross_attention_dim)}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    layers = convert_state_dict_to_diffusers(_train_lora(unet, extra, config.in_channels, config.sample_size))
    saver = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    saver.save_lora_weights(root / "lora", unet_lora_layers=layers)
    return pipe, root / "lora" / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["pixel", "sd", "sdxl"])
def test_lora_audit_uses_the_base_as_reference_and_verifies(family, tmp_path, tracking_uri, capsys):
    from cdi.models import load_model

    pipe, lora = _pixel(tmp_path) if family == "pixel" else _latent(tmp_path, family)
    base, tuned = load_model(pipe).info, load_model(pipe, lora=lora).info
    p = write_images(tmp_path / "p", 10, size=base.image_size, seed=1, prefix="p")
    u = write_images(tmp_path / "u", 10, size=base.image_size, seed=2, prefix="u")
    out = tmp_path / "result.json"
    prompt = ["--prompt", "a photo"] if base.conditioning == "text" else []
    code = main(["audit", "--model", str(pipe), "--lora", str(lora), "--suspect", str(p), "--control", str(u),
                 "--access", "gray", "--folds", "2", "--permutations", "199", "--power-resamples", "0",
                 "--no-progress", "--output", str(out), *prompt])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"reference model (the base of --lora): {pipe.resolve()}" in captured.out
    result = json.loads(out.read_text())
    assert result["model_fingerprint"] == tuned.fingerprint != base.fingerprint
    assert [r["fingerprint"] for r in result["reference_models"]] == [base.fingerprint]
    assert result["reference_models"][0]["base_of_lora"] is True
    assert result["lora"]["path"] == str(lora.resolve())
    # the default difficulty calibration ("auto"): image+pca+wiener on a pixel model, off on a latent one
    assert result["calibration"]["difficulty_calibration"] == ("image+pca+wiener" if family == "pixel" else "off")
    assert result["calibration"]["scored_features"][0] == ("DL-ref.resid" if family == "pixel" else "DL-ref")
    verify = ["verify", result["run_id"], "--model", str(pipe), "--suspect", str(p), "--control", str(u)]
    assert main([*verify, "--lora", str(lora)]) == 0
    assert main(verify) == 1  # without the LoRA the audited model's files are not all there
    assert f"model file lora/{lora.name}: missing" in capsys.readouterr().out


def test_lora_with_an_explicit_reference_uses_that_reference(tmp_path, tracking_uri, capsys):
    pipe, lora = _pixel(tmp_path)
    other = save_pipeline(tmp_path / "other", tiny_unet(seed=3))
    p = write_images(tmp_path / "p", 10, seed=1, prefix="p")
    u = write_images(tmp_path / "u", 10, seed=2, prefix="u")
    out = tmp_path / "result.json"
    assert main(["audit", "--model", str(pipe), "--lora", str(lora), "--reference-model", str(other),
                 "--suspect", str(p), "--control", str(u), "--access", "gray", "--folds", "2",
                 "--permutations", "199", "--power-resamples", "0", "--no-progress", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["reference_models"]] == [str(other.resolve())]
    assert result["reference_models"][0]["base_of_lora"] is False
