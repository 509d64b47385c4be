"""Latent adapters (Stable Diffusion, SDXL, DiT): loading, the contract's operations, conditioning,
prediction types, safe loading, and all 26 features end to end on tiny random-weight pipelines."""

from __future__ import annotations

import json
import logging
import math
import sys

import numpy as np
import pytest
import torch

from cdi.errors import ImageSetError, ModelError
from cdi.models import load_model
from cdi.models.dit import DiTAdapter
from cdi.models.loading import fingerprint, read_model_index
from cdi.models.stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter

from builders import save_pipeline, tiny_unet, write_images
from latent_builders import (
    LATENT,
    PIXELS,
    pickle_component,
    save_dit_pipeline,
    save_sd_pipeline,
    save_sdxl_pipeline,
    tiny_tokenizer,
    write_metadata,
)

BUILDERS = {"sd": save_sd_pipeline, "sdxl": save_sdxl_pipeline, "dit": save_dit_pipeline}
ADAPTER_CLASSES = {"sd": StableDiffusionAdapter, "sdxl": StableDiffusionXLAdapter, "dit": DiTAdapter}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on busy shared cores 2 threads wait on each other (x100 slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("latent")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


def _conditions(adapter, first: bool, n: int = 2):
    """Two different conditionings: another caption (text models) or another class (DiT)."""
    if adapter.info.conditioning == "text":
        return adapter.condition([None] * n, ["a cat" if first else "a red dog"] * n)
    return adapter.condition([1 if first else 7] * n, [None] * n)


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, PIXELS, PIXELS, generator=generator) * 2 - 1


def test_tokenizer_is_built_in_memory_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = tiny_tokenizer()
    ids = tokenizer(["a cat", "a red dog"]).input_ids
    # The merges took effect (one token per word, between <|startoftext|> and <|endoftext|>).
    assert [len(row) for row in ids] == [4, 5]
    tokenizer.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(["a cat", "a red dog"]).input_ids == ids


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_round_trip_and_contract_operations(pipelines, kind):
    from diffusers import AutoencoderKL, DDIMScheduler

    path = pipelines[kind]
    adapter = load_model(path)
    assert type(adapter) is ADAPTER_CLASSES[kind]
    info = adapter.info
    assert (info.image_size, info.image_channels) == (PIXELS, 3)
    assert info.conditioning == ("class" if kind == "dit" else "text")
    assert len(info.fingerprint) == 64 and "vae/diffusion_pytorch_model.safetensors" in info.files
    assert all(not p.requires_grad for p in adapter.parameters()), "weights must be frozen"
    assert not any(module.training for module in adapter.modules() if module is not adapter), "components in eval mode"
    reference = DDIMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod
    assert float(adapter.alpha_bar(250)) == pytest.approx(float(reference[250]), rel=1e-6)

    x = _images()
    z0 = adapter.encode(x)
    assert z0.shape == (2, 4, LATENT, LATENT)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(z0, expected, atol=1e-6)  # posterior mean times the scaling factor

    z = torch.randn_like(z0).requires_grad_(True)
    eps = adapter.eps_hat(z, 300, _conditions(adapter, True))
    assert eps.shape == z.shape
    eps.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # differentiable w.r.t. the input


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_conditioning_reaches_the_denoiser(pipelines, kind):
    adapter = load_model(pipelines[kind])
    z = torch.randn(2, 4, LATENT, LATENT)
    with torch.no_grad():
        a = adapter.eps_hat(z, 300, _conditions(adapter, True))
        b = adapter.eps_hat(z, 300, _conditions(adapter, False))
    assert (a - b).abs().max() > 1e-6


def test_sd_text_embeddings_are_the_last_hidden_state(pipelines):
    from transformers import CLIPTextModel, CLIPTokenizer

    path = pipelines["sd"]
    adapter = load_model(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    ids = tokenizer(["a cat", ""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        expected = encoder(ids.input_ids).last_hidden_state
    cond = adapter.condition([None, None], ["a cat", None])  # no caption -> the empty prompt
    assert cond.prompt_embeds.shape == (2, tokenizer.model_max_length, 16)
    assert torch.allclose(cond.prompt_embeds, expected, atol=1e-6)
    assert cond.pooled_embeds is None and cond.time_ids is None


def test_sdxl_embeddings_pooled_projection_and_time_ids(pipelines):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = pipelines["sdxl"]
    adapter = load_model(path)
    prompts = ["a blue cat", "dog"]
    hidden, pooled = [], None
    for encoder_cls, encoder_dir, tokenizer_dir in (
        (CLIPTextModel, "text_encoder", "tokenizer"),
        (CLIPTextModelWithProjection, "text_encoder_2", "tokenizer_2"),
    ):
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_dir)
        encoder = encoder_cls.from_pretrained(path, subfolder=encoder_dir)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            output = encoder(ids.input_ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = getattr(output, "text_embeds", pooled)
    cond = adapter.condition([None, None], prompts)
    assert cond.prompt_embeds.shape == (2, 8, 16 + 8)
    assert torch.allclose(cond.prompt_embeds, torch.cat(hidden, dim=-1), atol=1e-6)
    assert torch.allclose(cond.pooled_embeds, pooled, atol=1e-6)
    # Original size = target size = the model's image size, crop corner (0, 0).
    assert cond.time_ids.tolist() == [[PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]] * 2


def test_dit_labels_null_class_and_range(pipelines, caplog):
    adapter = load_model(pipelines["dit"])
    assert adapter.num_classes == 10 and adapter.class_names[3] == "class 3"
    with caplog.at_level(logging.WARNING, logger="cdi.models.dit"):
        cond = adapter.condition([2, None], [None, None])
    assert cond.dtype == torch.long and cond.tolist() == [2, 10]  # the null class is num_embeds_ada_norm
    assert "null class" in caplog.text and "weaker" in caplog.text
    with pytest.raises(ImageSetError, match="class label 10 outside 0..9"):
        adapter.condition([10, 1], [None, None])


def test_dit_published_as_transformer2dmodel_loads(tmp_path):
    path = save_dit_pipeline(tmp_path / "dit")
    config_path = path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None)
    config_path.write_text(json.dumps(config))
    z = torch.randn(1, 4, LATENT, LATENT)
    assert load_model(path).eps_hat(z, 10, torch.tensor([0])).shape == z.shape


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_v_prediction_is_read_as_epsilon(tmp_path, kind):
    from diffusers import DDIMScheduler

    path = BUILDERS[kind](tmp_path / kind, prediction_type="v_prediction")
    adapter = load_model(path)
    ab = float(DDIMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod[400])
    z = torch.randn(2, 4, LATENT, LATENT)
    cond = _conditions(adapter, True)
    timesteps = torch.full((2,), 400, dtype=torch.long)
    with torch.no_grad():
        if kind == "dit":
            v = adapter.transformer(z, timestep=timesteps, class_labels=cond).sample[:, :4]
        else:
            v = adapter.unet(z, timesteps, encoder_hidden_states=cond.prompt_embeds).sample
        eps = adapter.eps_hat(z, 400, cond)
    # Salimans & Ho 2022: eps = sqrt(ab) v + sqrt(1 - ab) z_t.
    assert torch.allclose(eps, math.sqrt(ab) * v + math.sqrt(1 - ab) * z, atol=1e-5)


def test_sample_prediction_is_refused(tmp_path):
    path = save_sd_pipeline(tmp_path / "x0", prediction_type="sample")
    with pytest.raises(ModelError, match=r"scheduler_config\.json: prediction_type 'sample'"):
        load_model(path)


def test_pickle_weights_need_allow_pickle(tmp_path):
    path = pickle_component(save_sd_pipeline(tmp_path / "pickled"), "text_encoder")
    with pytest.raises(ModelError, match=r"text_encoder/pytorch_model\.bin.*--allow-pickle"):
        load_model(path)
    pickle_component(path, "unet")
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model\.bin.*--allow-pickle"):
        load_model(path)
    adapter = load_model(path, allow_pickle=True)
    assert adapter.info.image_size == PIXELS and not any(p.requires_grad for p in adapter.parameters())


def test_text_pipelines_need_transformers(pipelines, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    message = r'StableDiffusionXLPipeline needs the transformers.*pip install "cdi\[latent\]"'
    with pytest.raises(ModelError, match=message):
        load_model(pipelines["sdxl"])


def test_unsupported_pipeline_lists_every_supported_one(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(
        ModelError,
        match="KandinskyPipeline.*supported: DDIMPipeline, DDPMPipeline, DiTPipeline, StableDiffusionPipeline, "
        "StableDiffusionXLPipeline",
    ):
        load_model(tmp_path)


def test_seeded_posterior_sample_is_per_image(pipelines):
    path = pipelines["sd"]
    digest, files = fingerprint(path)
    mean = load_model(path)
    sampled = StableDiffusionAdapter.load(path, read_model_index(path), digest, files, False, latent_sample_seed=3)
    other_seed = StableDiffusionAdapter.load(path, read_model_index(path), digest, files, False, latent_sample_seed=4)
    x = _images(3)
    z = sampled.encode(x)
    assert not torch.allclose(z, mean.encode(x))
    assert torch.equal(sampled.encode(x[1:2]), z[1:2])  # independent of the batch it is encoded in
    assert not torch.allclose(other_seed.encode(x), z)
    # Cached features of a sampled encoding never mix with those of the posterior mean.
    assert len({mean.info.fingerprint, sampled.info.fingerprint, other_seed.info.fingerprint}) == 3


@pytest.mark.parametrize("kind", ["sd", "sdxl", "dit", "pixel_class"])
def test_all_26_features_are_finite(pipelines, tmp_path, kind):
    from cdi.data import build_image_sets
    from cdi.features import FEATURE_NAMES, extract

    if kind == "pixel_class":  # class-conditional pixel UNets keep working beside the latent adapters
        adapter = load_model(save_pipeline(tmp_path / "pixel", tiny_unet(num_class_embeds=4)))
    else:
        adapter = load_model(pipelines[kind])
    size = adapter.info.image_size
    folders = []
    for role, seed in (("suspect", 1), ("control", 2)):
        folder = write_images(tmp_path / role, 3, size=size, seed=seed, prefix=role[0])
        names = sorted(p.name for p in folder.glob("*.png"))
        if kind == "sd" or kind == "sdxl":  # the last image has no caption: the empty prompt
            entries = {name: {"text": caption} for name, caption in zip(names, ("a red cat", "a blue dog"))}
        else:  # the last image has no label (DiT: the null class; the pixel UNet needs labels)
            entries = {name: {"label": i} for i, name in enumerate(names[: 3 if kind == "pixel_class" else 2])}
        folders.append(write_metadata(folder, entries))
    suspect, control = build_image_sets(*folders, size=size, channels=adapter.info.image_channels, min_size=2)
    report = extract(adapter, [*suspect, *control], FEATURE_NAMES, use_cache=False, progress=False, batch_size=4)
    assert report.values.shape == (6, len(FEATURE_NAMES))
    assert np.isfinite(report.values).all()
