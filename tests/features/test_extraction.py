"""Extraction through a real Lightning Trainer: an image's features depend only on the image."""

from __future__ import annotations

import numpy as np
import pytest

from cdi.data import build_image_sets
from cdi.errors import OptionError
from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES, extract_features
from cdi.models import load_model


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
