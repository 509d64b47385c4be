"""Feature cache (warm re-runs, SIGKILL resume) and multi-process extraction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cdi.data import build_image_sets
from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES, extract
from cdi.models import load_model


@pytest.fixture(scope="module")
def setup(tiny_model, image_sets):
    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    return adapter, [*suspect, *control]


@pytest.fixture(scope="module")
def one_process(setup):
    """All 26 features of the 24 images in one process, uncached, one thread, batches of 5: what the
    killed-and-resumed extraction and the two-process extraction must reproduce bit for bit."""
    adapter, records = setup
    return extract(adapter, records, FEATURE_NAMES, batch_size=5, progress=False, use_cache=False, threads=1).values


def test_warm_cache_skips_every_model_pass_and_serves_subsets(setup, tmp_path):
    adapter, records = setup
    cold = extract(adapter, records, FEATURE_NAMES, batch_size=8, progress=False, cache_dir=tmp_path)
    assert (cold.cache_hits, cold.cache_misses) == (0, 24)
    calls = []
    original = adapter.eps_hat
    adapter.eps_hat = lambda *a: calls.append(1) or original(*a)
    try:
        warm = extract(adapter, records, FEATURE_NAMES, batch_size=8, progress=False, cache_dir=tmp_path)
        gray = extract(adapter, records[::-1], GRAY_BOX_FEATURES, batch_size=5, progress=False, cache_dir=tmp_path)
    finally:
        del adapter.eps_hat
    assert calls == []
    assert (warm.cache_hits, warm.cache_misses) == (24, 0)
    np.testing.assert_array_equal(warm.values, cold.values)
    columns = [FEATURE_NAMES.index(n) for n in GRAY_BOX_FEATURES]
    np.testing.assert_array_equal(gray.values[::-1], cold.values[:, columns])
    # another seed is another configuration: nothing is reused
    assert extract(adapter, records[:3], GRAY_BOX_FEATURES, seed=9, progress=False, cache_dir=tmp_path).cache_hits == 0


WORKER = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(int(sys.argv[5]))
    from cdi.data import build_image_sets
    from cdi.features import FEATURE_NAMES, extract
    from cdi.models import load_model
    model, suspect, control, cache = sys.argv[1:5]
    adapter = load_model(model)
    original = adapter.eps_hat
    def slow(*args):  # slow enough that the parent can kill us between batches
        time.sleep(0.02)
        return original(*args)
    adapter.eps_hat = slow
    s, c = build_image_sets(suspect, control, 8, 3)
    extract(adapter, s + c, FEATURE_NAMES, batch_size=5, progress=False, cache_dir=cache)
    """
)


def test_sigkill_during_extraction_loses_no_finished_batch_and_resumes_identically(
    setup, one_process, tiny_model, image_sets, tmp_path
):
    adapter, records = setup
    cache = tmp_path / "cache"
    threads = "1"  # same kernels as `one_process` and the resumed extraction here, so the same bits
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_model), *map(str, image_sets), str(cache), threads])
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.rglob("shard-*.npz"))) < 2:
        assert proc.poll() is None, "worker ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(cache.rglob("shard-*.npz")))
    assert 2 <= finished < 5, "the kill must land mid-extraction"  # 5 batches: four of 5 images, one of 4

    resumed = extract(adapter, records, FEATURE_NAMES, batch_size=5, progress=False, cache_dir=cache, threads=1)
    assert resumed.cache_hits == 5 * finished and resumed.cache_misses == 24 - 5 * finished
    np.testing.assert_array_equal(resumed.values, one_process)  # as a fresh uncached extraction


def test_two_processes_give_the_same_bits_as_one(setup, one_process, tmp_path):
    adapter, records = setup
    # Same thread count in every process (`one_process` too): CPU kernels, and so the last bits, depend on it.
    two = extract(adapter, records, FEATURE_NAMES, batch_size=5, progress=False, cache_dir=tmp_path,
                  devices=2, strategy="ddp_spawn", device="cpu", threads=1)
    np.testing.assert_array_equal(two.values, one_process)
    assert len(list(Path(tmp_path).rglob("shard-*.npz"))) == 5  # 24 images in batches of 5, over both ranks
