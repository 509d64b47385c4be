"""Extraction through a real Lightning Trainer: an image's features depend only on the image."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.data import build_image_sets
from cdi.errors import OptionError
from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES, extract
from cdi.models import load_model


def extract_features(adapter, records, names, **options):
    return extract(adapter, records, names, **options).values


@pytest.fixture(scope="module")
def setup(tiny_model, image_sets):
    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    return adapter, [*suspect, *control]


def test_features_do_not_depend_on_batch_size_order_or_batch_mates(setup):
    adapter, records = setup
    reference = extract_features(adapter, records, FEATURE_NAMES, seed=5, batch_size=7, progress=False, use_cache=False)
    assert reference.shape == (24, 26) and np.isfinite(reference).all()
    one_by_one = extract_features(adapter, records[::-1], FEATURE_NAMES, seed=5, batch_size=1, progress=False, use_cache=False)[::-1]
    np.testing.assert_allclose(one_by_one, reference, rtol=1e-5, atol=1e-5)
    subset = extract_features(adapter, records[3:9], FEATURE_NAMES, seed=5, batch_size=4, progress=False, use_cache=False)
    np.testing.assert_allclose(subset, reference[3:9], rtol=1e-5, atol=1e-5)


def test_seed_changes_noise_draws_and_gray_access_is_a_column_subset(setup):
    adapter, records = setup
    white = extract_features(adapter, records[:6], FEATURE_NAMES, seed=0, batch_size=6, progress=False, use_cache=False)
    gray = extract_features(adapter, records[:6], GRAY_BOX_FEATURES, seed=0, batch_size=6, progress=False, use_cache=False)
    columns = [FEATURE_NAMES.index(n) for n in GRAY_BOX_FEATURES]
    np.testing.assert_allclose(gray, white[:, columns], rtol=1e-5, atol=1e-5)
    other_seed = extract_features(adapter, records[:6], GRAY_BOX_FEATURES, seed=1, batch_size=6, progress=False, use_cache=False)
    assert not np.allclose(other_seed[:, 0], gray[:, 0])  # DL uses fresh noise under another seed


def test_bad_batch_size_is_an_option_error(setup):
    adapter, records = setup
    with pytest.raises(OptionError, match="--batch-size"):
        extract_features(adapter, records, FEATURE_NAMES, batch_size=0)


def test_fused_batch_equals_each_family_computed_on_its_own(setup):
    """The fused pass (one encode, ML from GM, shared eps0, inference mode) changes no definition."""
    import torch

    from cdi.features import FeatureBatch, FeatureConfig, FeatureExtractor
    from cdi.features.denoising_loss import DenoisingLoss
    from cdi.features.gradient_masking import GradientMasking, MultipleLoss
    from cdi.features.noise_optimisation import NoiseOptimisation
    from cdi.features.pia import PIA
    from cdi.features.secmi import SecMI
    from cdi.data import ImageDataset

    adapter, records = setup
    items = [ImageDataset(records[:5], 8, 3)[i] for i in range(5)]
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "sha256": [it["sha256"] for it in items],
        "label": torch.tensor([-1] * 5),
        "caption": [""] * 5,
    }
    fused, _ = FeatureExtractor(adapter, FEATURE_NAMES, FeatureConfig(), seed=4).compute(batch)
    plain = FeatureBatch(z0=batch["image"], cond=None, sha256=batch["sha256"], seed=4)
    separate = {}
    for family in (DenoisingLoss, SecMI, PIA, MultipleLoss, GradientMasking, NoiseOptimisation):
        values = family(FeatureConfig()).compute(adapter, plain).values
        if family is GradientMasking:  # GM's own ML values are checked against MultipleLoss's below
            values = {k: v for k, v in values.items() if k.startswith("GM_")}
        separate.update(values)
    expected = torch.stack([separate[name] for name in FEATURE_NAMES], dim=1)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_bf16_on_cpu_autocasts_the_model_caches_apart_and_stays_close_to_float32(setup, tmp_path):
    """`--precision bf16` on CPU: the denoiser runs in bfloat16 (but SecMI's round trip in float32) with its
    weights held in bf16 and restored after, features
    come back float32 and close to the float32 ones, and the two precisions never share cache entries.
    Tolerances (tiny random model, 24 images): median relative difference < 1 % for DL, ML, PIA, PIAN and
    SecMI (SecMI with its round trip in bf16 measured ~10 %); every feature finite."""
    import torch

    from cdi.features import extract

    adapter, records = setup
    before = {key: value.clone() for key, value in adapter.unet.state_dict().items()}
    seen, weights = [], []

    def record(module, args, out):
        seen.append(out.sample.dtype)
        weights.append(next(module.parameters()).dtype)

    handle = adapter.unet.register_forward_hook(record)
    try:
        full = extract(adapter, records, FEATURE_NAMES, batch_size=8, progress=False, cache_dir=tmp_path,
                       device="cpu", precision="32")
        assert set(seen) == {torch.float32}
        seen.clear(), weights.clear()
        half = extract(adapter, records, FEATURE_NAMES, batch_size=8, progress=False, cache_dir=tmp_path,
                       device="cpu", precision="bf16")
    finally:
        handle.remove()
    # The weights are held in bf16 while it runs (widened for SecMI's round trip), restored bit for bit after.
    assert weights.count(torch.bfloat16) == len(weights) - 6
    after = adapter.unet.state_dict()
    assert all(after[key].dtype == torch.float32 and torch.equal(after[key], value) for key, value in before.items())
    assert half.cache_hits == 0  # not served the float32 features
    assert seen.count(torch.float32) == 2 * 3  # SecMI's two round-trip calls per batch of 8 (3 batches)
    assert seen.count(torch.bfloat16) == len(seen) - 6 > 0
    assert half.values.dtype == np.float64 and np.isfinite(half.values).all()
    relative = np.abs(half.values - full.values) / np.abs(full.values)
    for name in ("DL", "SecMI", "PIA", "PIAN", *(n for n in FEATURE_NAMES if n.startswith("ML_"))):
        assert np.median(relative[:, FEATURE_NAMES.index(name)]) < 0.01, name
    assert not np.array_equal(half.values, full.values)
    again = extract(adapter, records, FEATURE_NAMES, batch_size=8, progress=False, cache_dir=tmp_path,
                    device="cpu", precision="32")
    assert again.cache_hits == 24
    np.testing.assert_array_equal(again.values, full.values)


def test_float16_on_cpu_is_refused_naming_the_option(setup):
    adapter, records = setup
    with pytest.raises(OptionError, match="--precision 16"):
        extract_features(adapter, records[:2], GRAY_BOX_FEATURES, device="cpu", precision="16", progress=False)


@pytest.mark.parametrize("names", [FEATURE_NAMES, GRAY_BOX_FEATURES, ("SecMI",), ("PIA", "PIAN"), ("GM_0", "ML_0"),
                                   ("ML_500",), ("NO_loss",)])
def test_the_engine_makes_exactly_the_model_calls_the_cost_model_counts(setup, names):
    """Every model pass the search's cost model charges is one the engine makes, and no more: forwards
    counted by a hook on the denoiser, backwards by a hook on the input gradient (GM and NO only)."""
    import torch

    from cdi.search import passes_per_image

    adapter, records = setup
    calls = {"forward": 0, "backward": 0}

    def count(module, args, kwargs, out):
        sample = args[0] if args else kwargs["sample"]
        calls["forward"] += sample.shape[0]
        if torch.is_grad_enabled() and sample.requires_grad:
            sample.register_hook(lambda grad: calls.__setitem__("backward", calls["backward"] + grad.shape[0]))

    handle = adapter.unet.register_forward_hook(count, with_kwargs=True)
    try:
        extract_features(adapter, records[:6], names, batch_size=3, progress=False, use_cache=False, device="cpu")
    finally:
        handle.remove()
    assert (calls["forward"] + calls["backward"]) / 6 == passes_per_image(names)


@pytest.mark.parametrize("error", ["cuda", "cpu"])
def test_out_of_memory_halves_the_batch_keeps_finished_images_and_says_so(tiny_model, image_sets, tmp_path,
                                                                          caplog, error):
    """A device that cannot hold a batch of 4 once the first batch is done: the extraction logs the halving,
    finishes at batch 2 without recomputing the finished batch, and the features are those of a batch-2 run."""
    import torch

    adapter = load_model(tiny_model)  # its own copy: the memory limit below is put on this model only
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    records = [*suspect, *control][:12]
    names = ("DL", "PIA")
    expected = extract_features(adapter, records, names, seed=3, batch_size=2, progress=False, use_cache=False)

    sizes: list[int] = []

    def record(module, args, kwargs):
        sizes.append(len(args[0] if args else kwargs["sample"]))

    count = adapter.unet.register_forward_pre_hook(record, with_kwargs=True)
    extract_features(adapter, records[:4], names, seed=3, batch_size=4, progress=False, use_cache=False)
    calls_per_batch = len(sizes)
    sizes.clear()

    def memory_limit(module, args, kwargs):
        if len(sizes) > calls_per_batch and sizes[-1] > 2:  # the second batch of 4 no longer fits
            if error == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    limit = adapter.unet.register_forward_pre_hook(memory_limit, with_kwargs=True)
    try:
        with caplog.at_level("WARNING", logger="cdi.features.extraction"):
            report = extract(adapter, records, names, seed=3, batch_size=4, progress=False, cache_dir=tmp_path)
    finally:
        limit.remove()
        count.remove()
    assert "out of memory: retrying with batch size 2" in caplog.text
    assert sizes.count(4) == calls_per_batch + 1  # the finished batch once, then the failing call; never redone
    assert sizes.count(2) == 4 * calls_per_batch  # the 8 unfinished images, in batches of 2
    assert report.cache_misses == 12
    np.testing.assert_allclose(report.values, expected, rtol=1e-5, atol=1e-6)


def test_out_of_memory_for_a_single_image_is_a_one_line_error_that_keeps_finished_images(tiny_model, image_sets,
                                                                                         tmp_path):
    import torch

    from cdi.errors import FeatureError

    adapter = load_model(tiny_model)
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    records = [*suspect, *control][:6]
    calls: list[int] = []

    def memory_limit(module, args, kwargs):  # room for the first image's passes only
        calls.append(1)
        if len(calls) > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    limit = adapter.unet.register_forward_pre_hook(memory_limit, with_kwargs=True)
    try:
        with pytest.raises(FeatureError, match=r"--batch-size: out of memory .* the 1 image\(s\) finished are cached"):
            extract(adapter, records, ("DL",), batch_size=1, progress=False, cache_dir=tmp_path)
    finally:
        limit.remove()
    again = extract(adapter, records, ("DL",), batch_size=1, progress=False, cache_dir=tmp_path)
    assert (again.cache_hits, again.cache_misses) == (1, 5)


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_channels_last_runs_the_denoiser_in_that_layout_and_changes_no_feature(tiny_model, image_sets, precision):
    """channels_last (the CUDA default, with bf16) exercised on the CPU: convolution weights are in that
    layout while the denoiser runs, the features agree with the contiguous run to rounding (float32:
    rtol 1e-4; bf16: median relative difference < 1 %, kernels round differently per layout), and the
    model is handed back contiguous."""
    import torch

    adapter = load_model(tiny_model)  # its own copy: the layout is changed and restored on this one only
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    records = [*suspect, *control][:8]
    layouts: list[bool] = []

    def record(module, args, kwargs):
        layouts.append(module.conv_in.weight.is_contiguous(memory_format=torch.channels_last))

    handle = adapter.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        options = dict(seed=2, batch_size=4, progress=False, use_cache=False, device="cpu", precision=precision)
        plain = extract_features(adapter, records, FEATURE_NAMES, channels_last=False, **options)
        assert not any(layouts)
        layouts.clear()
        last = extract_features(adapter, records, FEATURE_NAMES, channels_last=True, **options)
    finally:
        handle.remove()
    assert layouts and all(layouts)
    assert adapter.unet.conv_in.weight.is_contiguous()
    assert np.isfinite(last).all()
    if precision == "32":
        np.testing.assert_allclose(last, plain, rtol=1e-4, atol=1e-5)
    else:
        relative = np.abs(last - plain) / np.abs(plain).clip(1e-6)
        assert np.median(relative) < 0.01


def test_auto_precision_is_half_on_cuda_and_float32_on_cpu(monkeypatch):
    """`--precision auto`: bf16 on a CUDA device that supports it, float16 on one that does not, float32 on CPU."""
    import torch

    from cdi.features.extraction import resolve_precision

    assert resolve_precision("auto", "cpu") == "32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "16"
    assert resolve_precision("32", "cuda") == "32"
    with pytest.raises(OptionError, match="--precision .fp8."):
        resolve_precision("fp8", "cuda")
