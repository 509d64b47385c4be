"""Difficulty calibration: the formulas against plain loops, and the exact test kept exact (null audits)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LinearRegression

from cdi.stats.difficulty import (
    DIFFICULTY_COVARIATE_NAMES,
    DIFFICULTY_MODES,
    DifficultyRegression,
    calibrate,
    difficulty_covariates,
    pca_component_count,
    pooled_covariates,
    reference_calibrated,
    represent,
)
from cdi.stats.hypothesis import DatasetInferenceTest


def test_reference_difference_and_log_ratio_match_a_plain_loop():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.5, 2.0, size=(7, 3))
    references = [rng.uniform(0.5, 2.0, size=(7, 3)) for _ in range(3)]
    difference, _ = reference_calibrated(target, references, "difference")
    ratio, used = reference_calibrated(target, references, "log_ratio")
    for i in range(7):
        for j in range(3):
            mean_reference = sum(r[i, j] for r in references) / 3
            assert difference[i, j] == pytest.approx(target[i, j] - mean_reference, rel=1e-12)
            geometric = np.exp(sum(np.log(r[i, j]) for r in references) / 3)
            assert ratio[i, j] == pytest.approx(np.log(target[i, j] / geometric), rel=1e-12)
    assert used == ["log_ratio"] * 3


def test_log_ratio_falls_back_to_the_difference_for_a_column_with_zeros():
    target = np.array([[1.0, 0.0], [2.0, 1.0]])
    reference = np.array([[0.5, 0.5], [1.0, 0.5]])
    values, used = reference_calibrated(target, [reference], "log_ratio")
    assert used == ["log_ratio", "difference"]
    assert values[:, 1].tolist() == [-0.5, 0.5]


def test_representations_name_their_columns():
    target, reference = np.ones((4, 2)), np.zeros((4, 2))
    assert represent(target, [reference], ["DL", "PIA"], "raw")[1] == ["DL", "PIA"]
    assert represent(target, [reference], ["DL", "PIA"], "calibrated")[1] == ["DL-ref", "PIA-ref"]
    values, names = represent(target, [reference], ["DL", "PIA"], "both")
    assert names == ["DL", "PIA", "DL-ref", "PIA-ref"] and values.shape == (4, 4)
    assert represent(target, [], ["DL", "PIA"], "both")[1] == ["DL", "PIA"]  # nothing to calibrate against


def test_covariates_of_a_small_image_by_hand():
    pixels = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # values in [0, 1]
    found = difficulty_covariates(pixels[None] * 2 - 1)
    vertical = (pixels[1:] - pixels[:-1]).ravel()
    horizontal = (pixels[:, 1:] - pixels[:, :-1]).ravel()
    expected_edges = np.mean(np.r_[vertical, horizontal] ** 2)
    assert found[0] == pytest.approx(0.5)
    assert found[1] == pytest.approx(0.5)
    assert found[2] == pytest.approx(1.0)  # median 0.5: every pixel is 0.5 away, above the 0.25 threshold
    assert found[3] == pytest.approx(8 * len(zlib.compress(bytes([0, 0, 255, 0, 255, 255]), 9)) / 6)
    assert found[4] == pytest.approx(expected_edges)


def test_colour_images_use_their_luminance():
    rgb = -np.ones((3, 4, 4))
    rgb[1] = 1.0  # pure green (-1 is black): BT.601 luminance 0.587
    assert difficulty_covariates(rgb)[0] == pytest.approx(0.587)


def test_ols_residuals_match_scikit_learn_and_do_not_depend_on_row_order():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(40, 4))
    X = Z @ rng.normal(size=(4, 3)) + rng.normal(size=(40, 3))
    residuals = DifficultyRegression().fit_transform(X, Z)
    expected = X - LinearRegression().fit(Z, X).predict(Z)
    np.testing.assert_allclose(residuals, expected, atol=1e-9)
    order = rng.permutation(40)
    np.testing.assert_allclose(DifficultyRegression().fit_transform(X[order], Z[order]), residuals[order], atol=1e-9)


def test_constant_covariates_are_dropped_and_r2_reported():
    rng = np.random.default_rng(2)
    Z = np.c_[rng.normal(size=30), np.full(30, 3.0)]
    X = (2 * Z[:, :1]) + 0.1 * rng.normal(size=(30, 1))
    regression = DifficultyRegression().fit(X, Z)
    assert regression.kept_.tolist() == [0]
    assert regression.r2_[0] > 0.95


def _difficulty_world(rng, n, shift):
    """Per-image difficulty d drives the losses of every model; members of the target lose `shift`."""
    d = rng.normal(size=2 * n)
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    covariates = np.c_[d + 0.3 * rng.normal(size=2 * n), rng.normal(size=2 * n)]
    noise = rng.normal(size=2 * n)  # the seeded draws: shared by target and reference (common random numbers)
    target = (d + 0.3 * noise - shift * labels + 0.2 * rng.normal(size=2 * n))[:, None]
    reference = (d + 0.3 * noise + 0.2 * rng.normal(size=2 * n))[:, None]
    return target, reference, covariates, labels


@pytest.mark.parametrize("mode", ["reference", "difficulty", "both"])
def test_null_audits_with_calibration_reject_at_most_alpha(mode):
    """Exactness: P and U exchangeable (no membership), 300 permutation-test audits at alpha 0.05 must not reject
    more often than the binomial 99.9 % bound of 5 % allows (seeded; the bound is 27 of 300)."""
    rng = np.random.default_rng(3)
    rejections, audits = 0, 300
    for i in range(audits):
        target, reference, covariates, labels = _difficulty_world(rng, 20, shift=0.0)
        found = calibrate(target, [reference] if mode != "difficulty" else [], ["DL"],
                          covariates if mode != "reference" else None,
                          difficulty="image" if mode != "reference" else "off")
        test = DatasetInferenceTest(test="permutation", n_permutations=99, alpha=0.05, random_state=i)
        rejections += test.fit(found.values, labels).p_value_ < 0.05
    assert rejections <= stats.binom.ppf(0.999, audits, 0.05)


def test_calibration_raises_power_on_a_difficulty_dominated_signal():
    """The same weak membership shift: raw features rarely detect it at 40 per side, calibrated ones usually do."""
    rng = np.random.default_rng(4)
    detected = {"raw": 0, "reference": 0, "difficulty": 0}
    for i in range(40):
        target, reference, covariates, labels = _difficulty_world(rng, 40, shift=0.25)
        for mode, found in (
            ("raw", calibrate(target, [], ["DL"])),
            ("reference", calibrate(target, [reference], ["DL"])),
            ("difficulty", calibrate(target, [], ["DL"], covariates, difficulty="image")),
        ):
            detected[mode] += DatasetInferenceTest(test="welch", alpha=0.01).fit(found.values, labels).p_value_ < 0.01
    assert detected["raw"] <= 10
    assert detected["reference"] >= 30
    assert detected["difficulty"] >= detected["raw"] + 8


def _pixel_world(rng, n, shift, side=4):
    """Like `_difficulty_world`, but the difficulty is written in the pixels (a fixed pattern scaled by d):
    the five statistics see only part of it, the pixels' principal components see it all."""
    target, reference, covariates, labels = _difficulty_world(rng, n, shift)
    pattern = rng.normal(size=side * side)
    d = covariates[:, 0]
    images = np.tanh(0.5 * (d[:, None] * pattern + 0.5 * rng.normal(size=(2 * n, side * side))))
    rows = np.stack([difficulty_covariates(image.reshape(1, side, side), pixels=True) for image in images])
    return target, reference, rows, labels


def test_pixels_are_appended_after_the_five_statistics():
    image = np.linspace(-1, 1, 12).reshape(1, 3, 4)
    row = difficulty_covariates(image, pixels=True)
    assert row.shape == (len(DIFFICULTY_COVARIATE_NAMES) + 12,)
    np.testing.assert_allclose(row[:5], difficulty_covariates(image))
    np.testing.assert_allclose(row[5:], (image.ravel() + 1) / 2)
    assert "image+pca" in DIFFICULTY_MODES


def test_pca_covariates_match_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    rows = np.c_[rng.normal(size=(60, 5)), rng.normal(size=(60, 30)) @ rng.normal(size=(30, 30))]
    found, names = pooled_covariates(rows, "image+pca")
    k = pca_component_count(60)
    assert k == 6 and names == [*DIFFICULTY_COVARIATE_NAMES, *(f"pca_{i}" for i in range(1, 7))]
    expected = PCA(k, svd_solver="full").fit_transform(rows[:, 5:])
    np.testing.assert_allclose(np.abs(found[:, 5:]), np.abs(expected), atol=1e-8)
    np.testing.assert_allclose(found[:, :5], rows[:, :5])
    assert pooled_covariates(rows[:, :5], "image")[1] == list(DIFFICULTY_COVARIATE_NAMES)
    assert pca_component_count(10_000) == 20 and pca_component_count(5) == 1


def test_image_pca_without_pixels_is_refused():
    rows = np.random.default_rng(6).normal(size=(30, 5))
    with pytest.raises(ValueError, match="pixels=True"):
        calibrate(rows[:, :1], [], ["DL"], rows, difficulty="image+pca")


@pytest.mark.parametrize("mode", ["image", "image+pca"])
def test_covariate_calibration_is_label_free(mode):
    """The calibrated features are a function of the pooled images only: relabelling the sets leaves them
    unchanged (calibrate never sees labels), and reordering the images reorders them and nothing else (the
    regression and the PCA are symmetric in the images), so P and U stay exchangeable under H0."""
    rng = np.random.default_rng(7)
    target, reference, rows, labels = _pixel_world(rng, 30, shift=0.5)
    rows = rows if mode == "image+pca" else rows[:, :5]  # mode "image": the five statistics only
    found = calibrate(target, [], ["DL"], rows, difficulty=mode)
    relabelled = rng.permutation(labels)
    assert not np.array_equal(relabelled, labels)
    again = calibrate(target, [], ["DL"], rows, difficulty=mode)  # the same pooled images, other labels
    np.testing.assert_array_equal(again.values, found.values)
    order = rng.permutation(len(labels))
    moved = calibrate(target[order], [], ["DL"], rows[order], difficulty=mode)
    np.testing.assert_allclose(moved.values, found.values[order], atol=1e-10)
    with_reference = calibrate(target[order], [reference[order]], ["DL"], rows[order], difficulty=mode)
    np.testing.assert_allclose(with_reference.values,
                               calibrate(target, [reference], ["DL"], rows, difficulty=mode).values[order], atol=1e-10)
    assert found.describe()["difficulty_covariates"][:5] == list(DIFFICULTY_COVARIATE_NAMES)


@pytest.mark.parametrize("with_reference", [False, True])
def test_null_audits_with_pca_covariates_reject_at_most_alpha(with_reference):
    """Exactness of mode "image+pca": 300 seeded null permutation-test audits (20 vs 20, B = 99) at alpha 0.05
    reject no more often than the binomial 99.9 % bound of 5 % allows (27 of 300), and not implausibly
    rarely either (at least the 0.1 % bound, 6 of 300: a test that never rejects is not exact either)."""
    rng = np.random.default_rng(8)
    rejections, audits = 0, 300
    for i in range(audits):
        target, reference, rows, labels = _pixel_world(rng, 20, shift=0.0)
        found = calibrate(target, [reference] if with_reference else [], ["DL"], rows, difficulty="image+pca")
        test = DatasetInferenceTest(test="permutation", n_permutations=99, alpha=0.05, random_state=i)
        rejections += test.fit(found.values, labels).p_value_ < 0.05
    assert stats.binom.ppf(0.001, audits, 0.05) <= rejections <= stats.binom.ppf(0.999, audits, 0.05)


def test_pca_covariates_raise_power_when_difficulty_is_in_the_pixels():
    rng = np.random.default_rng(9)
    detected = {"image": 0, "image+pca": 0}
    for _ in range(30):
        target, _, rows, labels = _pixel_world(rng, 60, shift=0.25)
        for mode in detected:
            found = calibrate(target, [], ["DL"], rows if mode == "image+pca" else rows[:, :5], difficulty=mode)
            detected[mode] += DatasetInferenceTest(test="welch", alpha=0.01).fit(found.values, labels).p_value_ < 0.01
    assert detected["image+pca"] >= detected["image"] + 5
