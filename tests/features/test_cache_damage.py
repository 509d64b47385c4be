"""A damaged cache (a truncated copy, a flipped bit, a garbled configuration.json) costs a recomputation,
never an audit: the damaged shards are set aside with one warning and their images computed again."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from cdi.data import build_image_sets
from cdi.features import GRAY_BOX_FEATURES, extract
from cdi.features.cache import FeatureCache
from cdi.models import load_model

NAMES = GRAY_BOX_FEATURES


@pytest.fixture(scope="module")
def setup(tiny_model, image_sets):
    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    return adapter, [*suspect, *control]


def _extract(setup, cache):
    adapter, records = setup
    return extract(adapter, records, NAMES, batch_size=8, progress=False, cache_dir=cache)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _as_written_before_checksums(path):
    """The name shards had before their sha256 was part of it: shard-<session>r<rank>-<uuid>.npz."""
    old = path.with_name(re.sub(r"\.[0-9a-f]{64}\.npz$", ".npz", path.name))
    path.rename(old)
    return old


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
@pytest.mark.parametrize("old_name", [False, True], ids=["checksummed", "before-checksums"])
def test_a_damaged_shard_is_set_aside_with_one_warning_and_recomputed(setup, tmp_path, caplog, damage, old_name):
    cache = tmp_path / "cache"
    first = _extract(setup, cache)
    shards = sorted(cache.rglob("shard-*.npz"))
    assert len(shards) == 3  # 24 images in batches of 8
    if old_name:
        shards[1] = _as_written_before_checksums(shards[1])
        assert _extract(setup, cache).cache_hits == 24  # an intact old shard still loads
    damage(shards[1])

    with caplog.at_level(logging.WARNING, logger="cdi.features.cache"):
        again = _extract(setup, cache)
    assert (again.cache_hits, again.cache_misses) == (16, 8)
    np.testing.assert_array_equal(again.values, first.values)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 damaged shard(s)" in warnings[0] and "recomputed" in warnings[0]
    damaged = list(cache.rglob("damaged/*"))
    assert [p.name for p in damaged] == [shards[1].name]
    assert not shards[1].exists()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cdi.features.cache"):
        third = _extract(setup, cache)
    assert (third.cache_hits, third.cache_misses) == (24, 0) and not caplog.records


def test_every_damaged_shard_is_counted_in_the_one_warning(setup, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _extract(setup, cache)
    for shard in sorted(cache.rglob("shard-*.npz"))[:2]:
        _flip_a_byte(shard)
    with caplog.at_level(logging.WARNING, logger="cdi.features.cache"):
        again = _extract(setup, cache)
    np.testing.assert_array_equal(again.values, first.values)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 damaged shard(s)" in warnings[0]


def test_a_shard_whose_bytes_differ_from_its_checksum_is_not_trusted_even_if_it_decodes(setup, tmp_path):
    """A checksummed shard replaced by another well-formed one (a stray copy) is not read."""
    cache = tmp_path / "cache"
    _extract(setup, cache)
    a, b = sorted(cache.rglob("shard-*.npz"))[:2]
    a.write_bytes(b.read_bytes())
    report = _extract(setup, cache)
    assert (report.cache_hits, report.cache_misses) == (16, 8)


def test_a_garbled_configuration_json_is_rewritten_and_the_shards_kept(setup, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = _extract(setup, cache)
    (meta,) = cache.rglob("configuration.json")
    expected = meta.read_text()
    meta.write_bytes(meta.read_bytes()[:10])
    with caplog.at_level(logging.WARNING, logger="cdi.features.cache"):
        again = _extract(setup, cache)
    assert meta.read_text() == expected
    assert again.cache_hits == 24
    np.testing.assert_array_equal(again.values, first.values)
    assert any("configuration.json" in r.getMessage() for r in caplog.records)


def test_shards_carry_the_sha256_of_their_bytes_in_their_name(tmp_path):
    import hashlib

    cache = FeatureCache.open(tmp_path, "f" * 64, {"x": 1}, 0)
    path = cache.write(["a" * 64], ["DL"], np.ones((1, 1)), {"DenoisingLoss": 1.0}, "s-r0-")
    assert path.name.startswith("shard-s-r0-")
    assert path.name.split(".")[-2] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache.seconds("s-r0-") == {"DenoisingLoss": 1.0}
    np.testing.assert_array_equal(cache.load(["a" * 64], ["DL"])["a" * 64], [1.0])
