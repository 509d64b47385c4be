"""LoRA on the audited model: a LoRA trained here offline (peft, a few optimiser steps of the denoising
loss) and saved the way users get LoRA files is merged by `load_model(..., lora=FILE)`; the merged
model's eps_hat equals the trained (base + LoRA) network's, computed directly here; bad files are
one-line ModelErrors naming the file."""

from __future__ import annotations

import sys

import pytest
import torch
from builders import save_pipeline, tiny_unet
from latent_builders import (
    PIXELS,
    save_dit_pipeline,
    save_sd_pipeline,
    save_sdxl_pipeline,
)

from cdi.errors import ModelError
from cdi.hashing import sha256_file
from cdi.models import is_lora_file, load_model

pytest.importorskip("peft")
pytest.importorskip("transformers")

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 4
CAPTIONS = ["a cat", "a red dog"]
TOLERANCE = 1e-4


def _images(n: int = 2, seed: int = 0, size: int = PIXELS, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator) * 2 - 1


def _noised(z0: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = sqrt(ab) z0 + sqrt(1 - ab) eps on the linear DDPM schedule (beta 1e-4 .. 0.02, 1000 steps)."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps, eps


def _train(modules: list[torch.nn.Module], loss_fn, steps: int = 4, lr: float = 1e-2) -> None:
    """A few Adam steps on the LoRA factors only (peft leaves the base weights frozen)."""
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    assert params and all("lora" in n for m in modules for n, p in m.named_parameters() if p.requires_grad)
    optimiser = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        optimiser.zero_grad()
        loss_fn(step).backward()
        optimiser.step()


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# -- Stable Diffusion: UNet + text encoder LoRA, diffusers naming, as train_dreambooth_lora saves it -------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    pipe = save_sd_pipeline(root / "pipe")
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=UNET_ATTENTION))
    # transformers' own add_adapter wants a newer peft; peft injects into any module the same way.
    text_config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights="gaussian", target_modules=CLIP_ATTENTION)
    inject_adapter_in_model(text_config, text_encoder)
    with torch.no_grad():
        z0 = vae.encode(_images()).latent_dist.mean * vae.config.scaling_factor
    ids = _token_ids(tokenizer, CAPTIONS)

    def loss(step: int) -> torch.Tensor:
        z_t, eps = _noised(z0, 100 + 200 * step, seed=step)
        hidden = text_encoder(ids).last_hidden_state
        out = unet(z_t, torch.full((2,), 100 + 200 * step), encoder_hidden_states=hidden).sample
        return torch.nn.functional.mse_loss(out, eps)

    _train([unet, text_encoder], loss)
    StableDiffusionPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return {"pipe": pipe, "lora": root / "lora" / "pytorch_lora_weights.safetensors", "unet": unet.eval(),
            "text_encoder": text_encoder.eval(), "tokenizer": tokenizer}


def _sd_expected(sd, z_t: torch.Tensor, t: int) -> torch.Tensor:
    """eps_hat of the trained networks (LoRA layers unmerged), conditioned as the SD pipeline does."""
    with torch.no_grad():
        hidden = sd["text_encoder"](_token_ids(sd["tokenizer"], CAPTIONS)).last_hidden_state
        return sd["unet"](z_t, torch.full((2,), t), encoder_hidden_states=hidden).sample


def test_sd_lora_is_merged_into_unet_and_text_encoder(sd):
    base = load_model(sd["pipe"])
    tuned = load_model(sd["pipe"], lora=sd["lora"])
    with torch.no_grad():
        z_t, _ = _noised(tuned.encode(_images(seed=1)), 400, seed=9)
        got = tuned.eps_hat(z_t, 400, tuned.condition([None, None], CAPTIONS))
        before = base.eps_hat(z_t, 400, base.condition([None, None], CAPTIONS))
    expected = _sd_expected(sd, z_t, 400)
    assert (got - before).abs().max() > 100 * TOLERANCE  # the LoRA changes the model ...
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)  # ... into the trained one
    assert not any(p.requires_grad for p in tuned.parameters())
    assert not any("lora" in name for name, _ in tuned.named_parameters())


def test_sd_lora_fingerprint_and_files(sd):
    base = load_model(sd["pipe"]).info
    first, second = load_model(sd["pipe"], lora=sd["lora"]).info, load_model(sd["pipe"], lora=sd["lora"]).info
    assert first.fingerprint != base.fingerprint and first.fingerprint == second.fingerprint
    assert first.files == {**base.files, "lora/pytorch_lora_weights.safetensors": sha256_file(sd["lora"])}
    assert first.lora == str(sd["lora"].resolve()) and base.lora is None
    # a base adapter's fingerprint is unchanged by the new field
    assert base.fingerprint == load_model(sd["pipe"]).info.fingerprint


def test_kohya_file_with_alphas_is_converted(sd, tmp_path):
    """kohya / A1111 naming (`lora_unet_...`, `lora_te_...`, per-layer `.alpha`), as most shared SD LoRAs."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    layers = {f"unet.{k}": v for k, v in get_peft_model_state_dict(sd["unet"]).items()}
    layers.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(sd["text_encoder"]).items()})
    kohya = convert_state_dict_to_kohya(layers)
    for key in [key for key in kohya if key.endswith(".alpha")]:  # the alphas the fixture trained with
        kohya[key] = torch.tensor(float(2 * RANK if key.startswith("lora_te") else RANK))
    save_file(kohya, tmp_path / "kohya.safetensors")
    tuned = load_model(sd["pipe"], lora=tmp_path / "kohya.safetensors")
    with torch.no_grad():
        z_t, _ = _noised(tuned.encode(_images(seed=2)), 700, seed=3)
        got = tuned.eps_hat(z_t, 700, tuned.condition([None, None], CAPTIONS))
    torch.testing.assert_close(got, _sd_expected(sd, z_t, 700), atol=TOLERANCE, rtol=0)


def test_pickle_lora_refused_unless_allowed(sd, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(load_file(sd["lora"]), pickled)
    with pytest.raises(ModelError, match=r"pytorch_lora_weights\.bin.*(safetensors|allow-pickle)") as error:
        load_model(sd["pipe"], lora=pickled)
    assert "\n" not in str(error.value)
    allowed = load_model(sd["pipe"], lora=pickled, allow_pickle=True)
    assert allowed.info.files["lora/pytorch_lora_weights.bin"] == sha256_file(pickled)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_garbage_lora_is_a_model_error_naming_the_file(sd, tmp_path, content):
    garbage = tmp_path / "broken_lora.safetensors"
    garbage.write_bytes(content)
    with pytest.raises(ModelError, match="broken_lora.safetensors") as error:
        load_model(sd["pipe"], lora=garbage)
    assert "\n" not in str(error.value)
    assert not is_lora_file(garbage)


def test_missing_lora_file_and_directory(sd, tmp_path):
    with pytest.raises(ModelError, match="nothere.safetensors.*no such file"):
        load_model(sd["pipe"], lora=tmp_path / "nothere.safetensors")
    with pytest.raises(ModelError, match="directory.*pytorch_lora_weights.safetensors"):
        load_model(sd["pipe"], lora=sd["lora"].parent)


def test_full_weights_are_not_a_lora(sd):
    weights = sd["pipe"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelError, match="diffusion_pytorch_model.safetensors.*not a LoRA factor"):
        load_model(sd["pipe"], lora=weights)
    assert not is_lora_file(weights) and is_lora_file(sd["lora"])


def test_missing_peft_is_a_model_error(sd, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ModelError, match=r'pip install "cdi\[lora\]"'):
        load_model(sd["pipe"], lora=sd["lora"])


# -- SDXL: UNet-only LoRA, PEFT naming, alpha = 2 r in the file's metadata ------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sdxl")
    pipe = save_sdxl_pipeline(root / "pipe")
    base = load_model(pipe)
    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights="gaussian", target_modules=UNET_ATTENTION)
    unet.add_adapter(config)
    with torch.no_grad():
        z0, cond = base.encode(_images()), base.condition([None, None], CAPTIONS)

    def loss(step: int) -> torch.Tensor:
        z_t, eps = _noised(z0, 100 + 200 * step, seed=step)
        return torch.nn.functional.mse_loss(_sdxl_unet(unet, z_t, 100 + 200 * step, cond), eps)

    _train([unet], loss)
    StableDiffusionXLPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                                unet_lora_adapter_metadata=config.to_dict())
    return {"pipe": pipe, "lora": root / "lora" / "pytorch_lora_weights.safetensors", "unet": unet.eval(),
            "base": base}


def _sdxl_unet(unet, z_t, t, cond):
    added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
    return unet(z_t, torch.full((z_t.shape[0],), t), encoder_hidden_states=cond.prompt_embeds,
                added_cond_kwargs=added).sample


def test_sdxl_lora_is_merged_into_unet(sdxl):
    base, tuned = sdxl["base"], load_model(sdxl["pipe"], lora=sdxl["lora"])
    with torch.no_grad():
        z_t, _ = _noised(base.encode(_images(seed=1)), 300, seed=5)
        cond = base.condition([None, None], CAPTIONS)  # a UNet-only LoRA leaves both text encoders as they are
        got = tuned.eps_hat(z_t, 300, tuned.condition([None, None], CAPTIONS))
        before = base.eps_hat(z_t, 300, cond)
        expected = _sdxl_unet(sdxl["unet"], z_t, 300, cond)
    assert (got - before).abs().max() > 100 * TOLERANCE
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert tuned.info.fingerprint != base.info.fingerprint
    assert "lora/pytorch_lora_weights.safetensors" in tuned.info.files
    assert list(tuned.lora_targets()) == ["unet", "text_encoder", "text_encoder_2"]  # the file's prefixes


def test_lora_of_another_architecture_is_refused(sd, sdxl, tmp_path):
    from safetensors.torch import load_file, save_file

    # SD's UNet LoRA on the SDXL UNet: same layer names, cross-attention widths 16 != 24.
    with pytest.raises(ModelError, match=r"pytorch_lora_weights.safetensors.*attn2.*shape") as error:
        load_model(sdxl["pipe"], lora=sd["lora"])
    assert "\n" not in str(error.value)
    # Layers the UNet does not have.
    renamed = {key.replace("down_blocks.0.", "down_blocks.7."): value for key, value in load_file(sdxl["lora"]).items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ModelError, match=r"renamed.safetensors.*down_blocks\.7\..*matches no layer"):
        load_model(sdxl["pipe"], lora=tmp_path / "renamed.safetensors")
    # A transformer's LoRA (DiT, Flux, SD3 naming) on a UNet pipeline.
    foreign = {key.replace("unet.", "transformer.", 1): value for key, value in load_file(sdxl["lora"]).items()}
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(ModelError, match=r"foreign.safetensors.*`transformer`.*StableDiffusionXLPipeline"):
        load_model(sdxl["pipe"], lora=tmp_path / "foreign.safetensors")


# -- pixel UNet2DModel (DDPMPipeline): a PeftModel.save_pretrained adapter, alpha = 2 r in adapter_config.json -
@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pixel")
    pipe = save_pipeline(root / "pipe", tiny_unet())
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights="gaussian", target_modules=UNET_ATTENTION)
    model = get_peft_model(tiny_unet(), config)
    x0 = _images(size=8)

    def loss(step: int) -> torch.Tensor:
        z_t, eps = _noised(x0, 100 + 200 * step, seed=step)
        return torch.nn.functional.mse_loss(model(z_t, torch.full((2,), 100 + 200 * step)).sample, eps)

    _train([model], loss)
    model.save_pretrained(root / "adapter")
    return {"pipe": pipe, "lora": root / "adapter" / "adapter_model.safetensors", "model": model.eval()}


def test_pixel_unet_lora_is_merged(pixel):
    base, tuned = load_model(pixel["pipe"]), load_model(pixel["pipe"], lora=pixel["lora"])
    z_t, _ = _noised(_images(seed=3, size=8), 500, seed=4)
    with torch.no_grad():
        got, before = tuned.eps_hat(z_t, 500, None), base.eps_hat(z_t, 500, None)
        expected = pixel["model"](z_t, torch.full((2,), 500)).sample
    assert (got - before).abs().max() > 100 * TOLERANCE
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    config = pixel["lora"].with_name("adapter_config.json")
    assert tuned.info.files["lora/adapter_model.safetensors"] == sha256_file(pixel["lora"])
    assert tuned.info.files["lora/adapter_config.json"] == sha256_file(config)
    assert tuned.info.fingerprint != base.info.fingerprint


def test_text_encoder_lora_on_a_pixel_pipeline_is_refused(pixel, sd):
    with pytest.raises(ModelError, match=r"pytorch_lora_weights.safetensors.*`text_encoder`.*DDPMPipeline"):
        load_model(pixel["pipe"], lora=sd["lora"])


# -- DiT: a transformer LoRA under `transformer.`, PEFT naming ------------------------------------------------
def test_dit_lora_is_merged(tmp_path):
    from diffusers import DiTTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe = save_dit_pipeline(tmp_path / "pipe")
    base = load_model(pipe)
    transformer = DiTTransformer2DModel.from_pretrained(pipe, subfolder="transformer")
    config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=UNET_ATTENTION)
    inject_adapter_in_model(config, transformer)
    with torch.no_grad():
        z0 = base.encode(_images())
    labels = torch.tensor([1, 7])

    def run(z_t, t):
        return transformer(z_t, timestep=torch.full((2,), t), class_labels=labels).sample[:, :4]

    def loss(step: int) -> torch.Tensor:
        z_t, eps = _noised(z0, 100 + 200 * step, seed=step)
        return torch.nn.functional.mse_loss(run(z_t, 100 + 200 * step), eps)

    _train([transformer], loss)
    layers = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    save_file(layers, tmp_path / "dit_lora.safetensors")
    tuned = load_model(pipe, lora=tmp_path / "dit_lora.safetensors")
    z_t, _ = _noised(z0, 600, seed=8)
    with torch.no_grad():
        got, before = tuned.eps_hat(z_t, 600, tuned.condition([1, 7], [None, None])), base.eps_hat(
            z_t, 600, base.condition([1, 7], [None, None]))
        expected = run(z_t, 600)
    assert (got - before).abs().max() > 100 * TOLERANCE
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
