"""Distribution-shift guard: model-free image statistics, cross-fitted classifier, permutation p."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from cdi.stats import (
    IMAGE_STATISTIC_NAMES,
    ShiftCheckResult,
    ShiftGuard,
    image_statistics,
    shift_check,
)


def _image_statistics(n, brightness, rng):
    """Synthetic photos: a per-image base colour (sd 15 levels a channel) plus pixel noise (sd 25),
    24 x 24 RGB, brightened by `brightness` levels; original sizes 400-800 px a side."""
    rows = []
    for _ in range(n):
        pixels = rng.normal(120, 15, 3) + rng.normal(0, 25, (24, 24, 3)) + brightness
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        size = (int(rng.integers(400, 800)), int(rng.integers(400, 800)))
        rows.append(image_statistics(image, size))
    return np.array(rows)


# --- image_statistics --------------------------------------------------------------------------


def test_statistics_of_a_flat_image_by_hand():
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    image[...] = (255, 51, 0)
    values = dict(zip(IMAGE_STATISTIC_NAMES, image_statistics(image, (640, 480)), strict=True))
    means = (values["mean_red"], values["mean_green"], values["mean_blue"])
    assert means == pytest.approx((1.0, 0.2, 0.0), abs=1e-12)
    stds = (values["std_red"], values["std_green"], values["std_blue"])
    assert stds == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert values["mean_gradient_magnitude"] == 0.0
    assert values["jpeg_blockiness"] == pytest.approx(1.0)
    assert values["clipped_fraction"] == pytest.approx(2 / 3)  # red at 255, blue at 0
    # Hasler-Suesstrunk with zero spread: 0.3 * sqrt(rg^2 + yb^2), rg = 0.8, yb = 0.6
    assert values["colourfulness"] == pytest.approx(0.3 * math.hypot(0.8, 0.6))
    assert values["original_log_pixels"] == pytest.approx(math.log(640 * 480))
    assert values["original_log_aspect"] == pytest.approx(math.log(640 / 480))


def test_blockiness_sees_an_8x8_block_grid():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 8, 3)).repeat(8, axis=0).repeat(8, axis=1)
    blocky = np.clip(blocks + rng.normal(0, 3, blocks.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    index = IMAGE_STATISTIC_NAMES.index("jpeg_blockiness")
    assert image_statistics(blocky, (64, 64))[index] > 5.0
    assert image_statistics(noise, (64, 64))[index] == pytest.approx(1.0, abs=0.1)


def test_grey_images_count_as_three_equal_channels():
    grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(image_statistics(grey, (30, 20)), image_statistics(rgb, (30, 20)))
    assert image_statistics(grey, (30, 20)).shape == (len(IMAGE_STATISTIC_NAMES),)


def test_non_uint8_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        image_statistics(np.zeros((8, 8, 3)), (8, 8))


# --- the guard ---------------------------------------------------------------------------------


def test_guard_fires_on_a_brightness_shifted_control_set():
    """P brightened by 12 levels (5 % of the range), 50 images a side: flagged at alpha 0.01 on
    each of 5 seeds (measured 20/20 seeds; out-of-fold AUC 0.70-0.88)."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        control = _image_statistics(50, 0, rng)
        suspect = _image_statistics(50, 12, rng)
        result = shift_check(suspect, control, random_state=seed)
        assert result.flagged and result.p_value < 0.01 and result.auc > 0.65


def test_guard_stays_quiet_on_an_iid_control_set():
    """P and U from the same generator, 50 a side; 10 seeds at alpha 0.01: at most 1 flagged."""
    flagged = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        result = shift_check(_image_statistics(50, 0, rng), _image_statistics(50, 0, rng))
        flagged += result.flagged
    assert flagged <= 1


def test_guard_is_an_estimator_with_a_frozen_result():
    rng = np.random.default_rng(7)
    X = np.vstack([_image_statistics(30, 12, rng), _image_statistics(30, 0, rng)])
    y = np.r_[np.ones(30, dtype=int), np.zeros(30, dtype=int)]
    guard = ShiftGuard(n_permutations=50, alpha=0.05)
    assert guard.fit(X, y) is guard
    assert isinstance(guard.result_, ShiftCheckResult)
    assert guard.result_ == ShiftCheckResult(
        auc=guard.auc_, p_value=guard.p_value_, flagged=guard.flagged_, n_permutations=50
    )
    assert guard.p_value_ == (1 + np.sum(guard.permutation_statistics_ >= guard.auc_)) / 51
    # brightness moves the channel means: those statistics separate P from U on their own
    means = [IMAGE_STATISTIC_NAMES.index(f"mean_{c}") for c in ("red", "green", "blue")]
    assert np.all(guard.feature_auc_[means] > 0.6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        guard.result_.flagged = False  # type: ignore[misc]
