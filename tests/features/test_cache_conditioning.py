"""The feature cache keys a row by everything the row depends on: image bytes, and the label or caption the
model is queried with; model files, latent sampling, settings and seed through the cache's folders."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cdi.audit import apply_conditioning
from cdi.data import discover_images
from cdi.features import GRAY_BOX_FEATURES, FeatureConfig, extract
from cdi.features.cache import FeatureCache, row_key
from cdi.hashing import sha256_file, sha256_text
from cdi.models import load_model

from builders import save_pipeline, tiny_unet, write_images
from latent_builders import save_dit_pipeline, save_sd_pipeline, write_metadata

NAMES = GRAY_BOX_FEATURES


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("conditioned") / "images", 6, seed=3, prefix="c")


def _labelled(folder, labels):
    write_metadata(folder, {f"c_{i:03d}.png": {"label": label} for i, label in enumerate(labels)})
    return folder


def _captioned(folder, captions):
    write_metadata(folder, {f"c_{i:03d}.png": {"text": caption} for i, caption in enumerate(captions)})
    return folder


def _audit_extract(adapter, folder, cache, prompt=None, class_label=None, **options):
    """What `cdi audit` does: discover (metadata.jsonl), fill --prompt / --class-label, extract."""
    records = apply_conditioning(discover_images(folder, "suspect"), adapter, prompt, class_label)
    return extract(adapter, records, NAMES, batch_size=4, progress=False, cache_dir=cache, **options)


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model(save_pipeline(tmp_path_factory.mktemp("class-unet") / "unet", tiny_unet(num_class_embeds=3)))


def test_relabelled_images_are_recomputed_and_the_same_labels_are_served_from_the_cache(
        class_model, images, tmp_path):
    folder = shutil.copytree(images, tmp_path / "images")
    cache = tmp_path / "cache"
    first = _audit_extract(class_model, _labelled(folder, [0, 1, 2, 0, 1, 2]), cache)
    assert (first.cache_hits, first.cache_misses) == (0, 6)
    again = _audit_extract(class_model, folder, cache)
    assert (again.cache_hits, again.cache_misses) == (6, 0)
    np.testing.assert_array_equal(again.values, first.values)

    relabelled = _audit_extract(class_model, _labelled(folder, [1, 2, 0, 1, 2, 0]), cache)
    assert (relabelled.cache_hits, relabelled.cache_misses) == (0, 6)
    assert not np.isclose(relabelled.values, first.values).all(axis=1).any()  # every row changed
    # ... and the recomputed rows are what a fresh extraction under the new labels gives, bit for bit
    fresh = _audit_extract(class_model, folder, None, use_cache=False)
    np.testing.assert_array_equal(relabelled.values, fresh.values)
    # both labellings now live side by side in one cache
    assert _audit_extract(class_model, _labelled(folder, [0, 1, 2, 0, 1, 2]), cache).cache_misses == 0


def test_the_same_image_under_two_labels_is_two_rows(class_model, images, tmp_path):
    record = discover_images(images, "suspect")[0]
    twice = [replace(record, label=0), replace(record, label=2), replace(record, label=0)]
    report = extract(class_model, twice, NAMES, batch_size=4, progress=False, cache_dir=tmp_path)
    assert report.cache_misses == 2
    assert not np.allclose(report.values[0], report.values[1])
    np.testing.assert_array_equal(report.values[0], report.values[2])
    alone = extract(class_model, [twice[1]], NAMES, progress=False, use_cache=False)  # other batch mates: last bits
    np.testing.assert_allclose(report.values[1], alone.values[0], rtol=1e-5, atol=1e-5)


def test_class_label_option_is_part_of_the_key_on_a_dit(tmp_path, images):
    """--class-label fills the labels metadata.jsonl lacks; images without either get DiT's null class."""
    adapter = load_model(save_dit_pipeline(tmp_path / "dit", num_classes=4))
    cache = tmp_path / "cache"
    unlabelled = _audit_extract(adapter, images, cache)
    as_class_1 = _audit_extract(adapter, images, cache, class_label="1")
    by_name = _audit_extract(adapter, images, cache, class_label="class 1")  # id2label resolves to the same id
    assert (unlabelled.cache_misses, as_class_1.cache_misses, by_name.cache_misses) == (6, 6, 0)
    assert not np.allclose(unlabelled.values, as_class_1.values)
    np.testing.assert_array_equal(by_name.values, as_class_1.values)


def test_captions_and_prompt_are_part_of_the_key_on_a_text_model(tmp_path, images):
    adapter = load_model(save_sd_pipeline(tmp_path / "sd"))
    folder = shutil.copytree(images, tmp_path / "images")
    cache = tmp_path / "cache"
    cats = _audit_extract(adapter, _captioned(folder, ["cat"] * 6), cache)
    dogs = _audit_extract(adapter, _captioned(folder, ["red dog"] * 6), cache)
    assert (cats.cache_misses, dogs.cache_misses) == (6, 6)
    assert not np.allclose(cats.values, dogs.values)
    assert _audit_extract(adapter, folder, cache).cache_misses == 0
    (folder / "metadata.jsonl").unlink()
    prompted = _audit_extract(adapter, folder, cache, prompt="blue cat")
    assert prompted.cache_misses == 6
    # No caption and an empty caption are the same query (the empty prompt): one row.
    empty = _audit_extract(adapter, folder, cache, prompt="")
    none = _audit_extract(adapter, folder, cache)
    assert (empty.cache_misses, none.cache_misses) == (6, 0)
    np.testing.assert_array_equal(empty.values, none.values)


def test_unconditioned_rows_keep_the_plain_image_sha256_as_key(tiny_model, images, tmp_path):
    """Caches written before conditioning was part of the key stay valid: the key is the file's sha256."""
    adapter = load_model(tiny_model)
    records = discover_images(images, "suspect")
    labelled = [replace(r, label=1, caption="cat") for r in records]  # ignored by an unconditioned model
    extract(adapter, records, NAMES, batch_size=4, progress=False, cache_dir=tmp_path)
    assert extract(adapter, labelled, NAMES, batch_size=4, progress=False, cache_dir=tmp_path).cache_hits == 6
    digests = {sha256_file(path) for path in images.glob("*.png")}
    stored = set()
    for shard in tmp_path.rglob("shard-*.npz"):
        with np.load(shard) as data:
            assert "key" not in data.files
            stored.update(str(d) for d in data["sha256"])
    assert stored == digests
    (digest,) = list(digests)[:1]
    assert row_key(digest, "none", 1, "cat") == digest
    # conditioned keys: a digest of the image's sha256 and the query, computed here independently
    assert row_key(digest, "class", 2) == sha256_text(f'{{"image": "{digest}", "label": 2}}')
    assert row_key(digest, "class", None) == row_key(digest, "class", -1) != row_key(digest, "class", 0)
    no_caption = row_key(digest, "text", caption=None)
    assert row_key(digest, "text", caption="") == no_caption != row_key(digest, "text", caption="a")


def test_model_files_latent_sampling_settings_and_seed_each_select_another_cache(tmp_path):
    model = save_sd_pipeline(tmp_path / "sd")
    base = load_model(model).info.fingerprint
    assert load_model(model).info.fingerprint == base
    sampled = load_model(model, latent_sample_seed=1).info.fingerprint
    assert len({base, sampled, load_model(model, latent_sample_seed=2).info.fingerprint}) == 3

    edited = shutil.copytree(model, tmp_path / "edited")
    weights = next((edited / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    assert load_model(edited).info.fingerprint != base

    roots = {FeatureCache.open(tmp_path / "cache", base, FeatureConfig().to_dict(), 0).root,
             FeatureCache.open(tmp_path / "cache", base, FeatureConfig(dl_t=50).to_dict(), 0).root,
             FeatureCache.open(tmp_path / "cache", base, FeatureConfig().to_dict(), 1).root,
             FeatureCache.open(tmp_path / "cache", sampled, FeatureConfig().to_dict(), 0).root}
    assert len(roots) == 4
