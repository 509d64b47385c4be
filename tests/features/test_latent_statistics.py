"""The shift guard's latent statistics come from the extraction engine (device, cache, back-off) and equal a
plain loop over the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdi.data import build_image_sets, load_image
from cdi.features import FEATURE_NAMES, extract
from cdi.features.latent_statistics import latent_statistic_names
from cdi.models import load_model
from latent_builders import save_sd_pipeline


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory, image_sets):
    adapter = load_model(save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd"))
    suspect, control = build_image_sets(*image_sets, adapter.info.image_size, adapter.info.image_channels)
    return adapter, [*suspect, *control]


def test_latent_statistics_equal_a_plain_loop_over_the_encoder_and_are_cached(latent_setup, tmp_path):
    adapter, records = latent_setup
    names = latent_statistic_names(adapter.latent_channels)
    first = extract(adapter, records, names, batch_size=5, progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        z0 = torch.cat([adapter.encode(load_image(r.path, adapter.info.image_size, adapter.info.image_channels)[None])
                        for r in records]).flatten(2).float()
    plain = torch.cat([z0.mean(dim=2), z0.std(dim=2)], dim=1).numpy()
    np.testing.assert_allclose(first.values, plain, rtol=1e-5, atol=1e-6)
    again = extract(adapter, records, names, batch_size=3, progress=False, cache_dir=tmp_path)
    assert again.cache_hits == len(records) and again.cache_misses == 0
    np.testing.assert_array_equal(again.values, first.values)


def test_latent_statistics_are_no_membership_features():
    assert not set(latent_statistic_names(16)) & set(FEATURE_NAMES)
    with pytest.raises(ValueError):
        latent_statistic_names(17)


def test_the_audits_extract_step_gives_the_shift_guard_cached_latent_statistics(latent_setup, image_sets, tmp_path):
    from cdi.audit import ExtractionOptions, extract_step, plan_audit
    from cdi.features import FeatureConfig

    adapter, _ = latent_setup
    settings = dict(names=["DL"], access="gray", feature_config=FeatureConfig(), seed=0, alpha=0.01, folds=5, C=1.0,
                    penalty="l2", test="permutation", n_permutations=100, power_resamples=0,
                    representation="calibrated", reference_formula="difference", difficulty_calibration=None)
    options = ExtractionOptions(cache_dir=tmp_path, progress=False, batch_size=4)
    plan = plan_audit(adapter.info.path, *image_sets, settings, options, prompt="a photo")
    first = extract_step(plan)
    assert first.latent_statistics.values.shape == (len(plan.records), 2 * adapter.latent_channels)
    second = extract_step(plan)
    assert second.latent_statistics.cache_misses == 0 and second.target.cache_misses == 0
    np.testing.assert_array_equal(second.latent_statistics.values, first.latent_statistics.values)
