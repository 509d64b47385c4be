"""A node that never comes is a one-line error within CDI_RENDEZVOUS_TIMEOUT, not a 30-minute hang; an
interrupt during extraction surfaces as cdi.errors.Interrupted and keeps every finished batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cdi.data import build_image_sets
from cdi.errors import Interrupted, OptionError
from cdi.features import GRAY_BOX_FEATURES, extract
from cdi.models import load_model

from builders import free_port


@pytest.fixture(scope="module")
def setup(tiny_model, image_sets):
    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    return adapter, [*suspect, *control]


def test_a_missing_second_node_is_a_one_line_error_within_the_rendezvous_timeout(tiny_model, image_sets, tmp_path):
    command = [sys.executable, "-m", "cdi", "audit", "--model", str(tiny_model), "--suspect", str(image_sets[0]),
               "--control", str(image_sets[1]), "--access", "gray", "--power-resamples", "0", "--no-progress",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--cache-dir", str(tmp_path / "cache"),
               "--device", "cpu", "--threads", "1", "--num-nodes", "2", "--devices", "1"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
           "CDI_RENDEZVOUS_TIMEOUT": "5"}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    # Ends soon after the 5 s rendezvous timeout (never the default's minutes): the bound leaves room for
    # start-up (imports ~10-30 s) on a loaded 2-core machine running the suite on both cores.
    assert time.monotonic() - started < 120
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "--num-nodes 2" in line]
    for part in ("only 1 of 2 ranks", "1 never arrived", "within 5 s", "MASTER_ADDR/MASTER_PORT", "NODE_RANK",
                 "CDI_RENDEZVOUS_TIMEOUT"):
        assert part in line, line


def test_a_node_that_cannot_reach_rank_0_says_so(setup, monkeypatch):
    adapter, records = setup
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nobody listens there
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("CDI_RENDEZVOUS_TIMEOUT", "3")
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))  # Lightning sets it to 1
    started = time.monotonic()
    with pytest.raises(OptionError, match=r"NODE_RANK 1\) could not reach rank 0 at 127\.0\.0\.1:\d+ within 3 s"):
        extract(adapter, records[:4], GRAY_BOX_FEATURES, progress=False, use_cache=False, device="cpu",
                num_nodes=2, strategy="ddp")
    assert time.monotonic() - started < 40


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_rendezvous_timeout_names_the_variable(setup, monkeypatch, value):
    adapter, records = setup
    monkeypatch.setenv("CDI_RENDEZVOUS_TIMEOUT", value)
    with pytest.raises(OptionError, match="CDI_RENDEZVOUS_TIMEOUT .*positive number of seconds"):
        extract(adapter, records[:4], GRAY_BOX_FEATURES, progress=False, use_cache=False, num_nodes=2)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), Interrupted(signal.SIGTERM)],
                         ids=["KeyboardInterrupt", "Interrupted"])
def test_an_interrupt_surfaces_as_interrupted_and_keeps_finished_batches(setup, tmp_path, monkeypatch, interrupt):
    adapter, records = setup
    subset = records[:12]
    original = adapter.eps_hat
    counted = []
    monkeypatch.setattr(adapter, "eps_hat", lambda *a: counted.append(1) or original(*a))
    extract(adapter, subset[:4], GRAY_BOX_FEATURES, batch_size=4, progress=False, use_cache=False)
    per_batch = len(counted)  # model calls of one batch of gray-box features

    calls = []

    def eps_hat(*args):
        calls.append(1)
        if len(calls) > 2 * per_batch:  # the third batch
            raise interrupt
        return original(*args)

    monkeypatch.setattr(adapter, "eps_hat", eps_hat)
    sigint = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as caught:
        extract(adapter, subset, GRAY_BOX_FEATURES, batch_size=4, progress=False, cache_dir=tmp_path)
    expected = signal.SIGINT if isinstance(interrupt, KeyboardInterrupt) else signal.SIGTERM
    assert caught.value.signum == expected
    assert signal.getsignal(signal.SIGINT) is sigint  # Lightning's "ignore SIGINT from now on" is undone

    monkeypatch.setattr(adapter, "eps_hat", original)
    resumed = extract(adapter, subset, GRAY_BOX_FEATURES, batch_size=4, progress=False, cache_dir=tmp_path)
    assert (resumed.cache_hits, resumed.cache_misses) == (8, 4)
