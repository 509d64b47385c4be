"""One engine pass over a target and its reference models: the bits of separate passes, one decode, one encode
(where the encoders are the same), one noise draw, each model's own cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import save_pipeline, tiny_unet, write_images
from cdi.data import build_image_sets
from cdi.features import FEATURE_NAMES, FeatureBatch, extract, extract_models
from cdi.features.seeded_noise import image_noise
from cdi.models import load_model


@pytest.fixture(scope="module")
def pixel_models(tiny_model, image_sets, tmp_path_factory):
    """The tiny pixel DDPM and two references of its architecture with other weights, and 24 images."""
    root = tmp_path_factory.mktemp("references")
    adapters = [load_model(tiny_model), *(load_model(save_pipeline(root / f"ref{seed}", tiny_unet(seed=seed)))
                                          for seed in (7, 9))]
    suspect, control = build_image_sets(*image_sets, 8, 3)
    return adapters, [*suspect, *control]


def test_one_pass_gives_every_model_the_bits_of_its_own_pass_and_fills_each_cache(pixel_models, tmp_path,
                                                                                 engine_passes):
    adapters, records = pixel_models
    options = dict(seed=3, batch_size=5, progress=False, device="cpu")
    alone = [extract(adapter, records, FEATURE_NAMES, cache_dir=tmp_path / "alone", **options) for adapter in adapters]
    assert [models for models, _ in engine_passes] == [1, 1, 1]
    engine_passes.clear()
    shared = extract_models(adapters, records, FEATURE_NAMES, cache_dir=tmp_path / "shared", **options)
    assert engine_passes == [(3, 24)]  # one Trainer, every batch decoded once for the three models
    for own, together in zip(alone, shared):
        np.testing.assert_array_equal(together.values, own.values)  # bit for bit
        assert (together.cache_hits, together.cache_misses) == (0, 24)
        assert together.seconds > 0 and set(together.family_seconds) >= {"encode", "GradientMasking"}
    assert not np.array_equal(shared[0].values, shared[1].values)  # other weights, other features
    for adapter, own in zip(adapters, alone):  # each model's rows sit in its own cache
        again = extract(adapter, records, FEATURE_NAMES, cache_dir=tmp_path / "shared", **options)
        assert (again.cache_hits, again.cache_misses) == (24, 0)
        np.testing.assert_array_equal(again.values, own.values)
    assert engine_passes == [(3, 24)]  # nothing recomputed


def test_two_processes_share_the_pass_with_the_bits_of_one(pixel_models, tmp_path):
    """ddp_spawn pickles the engine with both models; each rank computes its batches on both, and every model's
    features are those of a one-process pass of its own (same thread count in every process)."""
    adapters, records = pixel_models
    options = dict(seed=3, batch_size=5, progress=False, device="cpu", threads=1)
    alone = [extract(adapter, records, ("DL", "GM_100", "PIA"), use_cache=False, **options) for adapter in adapters[:2]]
    two = extract_models(adapters[:2], records, ("DL", "GM_100", "PIA"), cache_dir=tmp_path, devices=2,
                         strategy="ddp_spawn", **options)
    for own, together in zip(alone, two):
        np.testing.assert_array_equal(together.values, own.values)
    assert len(list(tmp_path.rglob("shard-*.npz"))) == 2 * 5  # 24 images in batches of 5, per model


def test_models_that_lack_different_images_get_their_own_passes_with_unchanged_batches(pixel_models, tmp_path,
                                                                                     engine_passes):
    """A target cached for half the images: sharing would change the batches' composition (and the last bits),
    so the target and the reference each get a pass over what they lack; the same model twice is computed once."""
    adapters, records = pixel_models
    target, reference = adapters[:2]
    names = ("DL", "PIA", "GM_100")
    options = dict(seed=3, batch_size=5, progress=False, device="cpu")
    for cache in ("alone", "mixed"):
        extract(target, records[:12], names, cache_dir=tmp_path / cache, **options)
    expected = [extract(a, records, names, cache_dir=tmp_path / "alone", **options).values for a in (target, reference)]
    engine_passes.clear()
    got = extract_models([target, reference, target], records, names, cache_dir=tmp_path / "mixed", **options)
    assert engine_passes == [(1, 12), (1, 24)]  # the target's 12 missing images, the reference's 24; the repeat is cached
    assert [(r.cache_hits, r.cache_misses) for r in got] == [(12, 12), (0, 24), (12, 12)]
    for report, own in zip(got, [*expected, expected[0]]):
        np.testing.assert_array_equal(report.values, own)


def test_a_pass_over_latent_models_with_one_vae_encodes_each_batch_once(tmp_path, engine_passes):
    """Two DiTs with the same VAE files and other transformers: the VAE encodes each image once per pass, and
    each model's features are those of its own pass."""
    from latent_builders import save_dit_components, tiny_dit_transformer, tiny_vae

    adapters = [load_model(save_dit_components(tmp_path / f"dit{seed}", tiny_dit_transformer(seed=seed), tiny_vae(0)))
                for seed in (0, 1)]
    assert adapters[0].encoder_identity() == adapters[1].encoder_identity() is not None
    assert adapters[0].info.fingerprint != adapters[1].info.fingerprint
    size = adapters[0].info.image_size
    folders = [write_images(tmp_path / role, 3, size=size, seed=seed, prefix=role[0])
               for role, seed in (("suspect", 1), ("control", 2))]
    suspect, control = build_image_sets(*folders, size=size, channels=3, min_size=2)
    records = [*suspect, *control]
    names = ("DL", "SecMI", "GM_100", "ML_100")
    options = dict(seed=2, batch_size=4, progress=False, device="cpu", use_cache=False)
    encoded: list[int] = []
    hooks = [a.vae.encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
             for a in adapters]
    try:
        alone = [extract(adapter, records, names, **options).values for adapter in adapters]
        assert sum(encoded) == 2 * len(records)
        encoded.clear()
        shared = extract_models(adapters, records, names, **options)
    finally:
        for hook in hooks:
            hook.remove()
    assert sum(encoded) == len(records)  # once for both models
    assert [models for models, _ in engine_passes] == [1, 1, 2]
    for own, together in zip(alone, shared):
        np.testing.assert_array_equal(together.values, own)


def test_batch_noise_is_the_seeded_draw_drawn_once_and_handed_out_as_a_copy():
    z0 = torch.zeros(3, 1, 4, 4)
    batch = FeatureBatch(z0=z0, cond=None, sha256=["a" * 64, "b" * 64, "c" * 64], seed=5, noise_drawn={})
    with torch.inference_mode():  # a gray family draws first ...
        first = batch.noise(z0, "DL", 100, 1)
    expected = image_noise(z0, batch.sha256, 5, "DL", 100, 1)
    assert torch.equal(first, expected) and len(batch.noise_drawn) == 1
    first.add_(1.0)  # a family may change its copy in place
    again = batch.noise(z0, "DL", 100, 1)
    assert torch.equal(again, expected) and len(batch.noise_drawn) == 1
    x = torch.ones(3, 1, 4, 4, requires_grad=True)  # ... and a gradient family can still use the same draw
    (x * again).sum().backward()
    assert torch.equal(x.grad, expected)
    assert not torch.equal(batch.noise(z0, "DL", 100, 2), expected)  # another draw, another key
