"""Difficulty mode "image+pca+wiener": formula (4) of `cdi.stats.difficulty` against a plain dense loop, its
symmetry in the images, the exact test kept exact (null audits) and the power it adds when a feature's noise
share is common to the Wiener denoiser's loss."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cdi.stats.difficulty import (
    WIENER_COVARIATE,
    WIENER_SHRINKAGE,
    WienerNoise,
    calibrate,
    difficulty_covariates,
    pooled_covariates,
    wiener_denoiser_loss,
)
from cdi.stats.hypothesis import DatasetInferenceTest


def _dense_wiener_loss(z0, draws, alpha_bar, shrinkage=WIENER_SHRINKAGE):
    """Formula (4) written out: the D x D covariance, shrunk, inverted."""
    n, d = z0.shape
    a, s = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    mu, cov = z0.mean(axis=0), np.cov(z0.T)
    cov = cov + shrinkage * np.trace(cov) / d * np.eye(d)
    gain = a * cov @ np.linalg.inv(a * a * cov + s * s * np.eye(d))
    losses = np.zeros(n)
    for i in range(n):
        for r in range(draws.shape[1]):
            x_t = a * z0[i] + s * draws[i, r]
            z0_hat = mu + gain @ (x_t - a * mu)
            losses[i] += np.linalg.norm((x_t - a * z0_hat) / s - draws[i, r])
    return losses / draws.shape[1]


def _images(rng, n, d):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.tanh(rng.normal(size=(n, d)) @ mixing)


@pytest.mark.parametrize("n, d", [(40, 12), (8, 30)])  # more images than pixels, and fewer
def test_wiener_loss_matches_a_dense_loop(n, d):
    rng = np.random.default_rng(0)
    z0, draws = _images(rng, n, d), rng.normal(size=(n, 3, d))
    found = wiener_denoiser_loss(z0, WienerNoise(draws, 0.7))
    np.testing.assert_allclose(found, _dense_wiener_loss(z0, draws, 0.7), rtol=1e-10)


def test_wiener_loss_is_symmetric_in_the_images():
    """Reordering the images reorders their losses and changes nothing else: the map is a symmetric function of
    the pooled images, as the permutation test's exactness needs."""
    rng = np.random.default_rng(1)
    z0, draws = _images(rng, 30, 16), rng.normal(size=(30, 2, 16))
    order = rng.permutation(30)
    np.testing.assert_allclose(wiener_denoiser_loss(z0[order], WienerNoise(draws[order], 0.9)),
                               wiener_denoiser_loss(z0, WienerNoise(draws, 0.9))[order], rtol=1e-12)


def test_wiener_mode_adds_one_named_covariate_and_needs_the_noise():
    rng = np.random.default_rng(2)
    images = _images(rng, 30, 16).reshape(30, 1, 4, 4)
    rows = np.stack([difficulty_covariates(image, pixels=True) for image in images])
    draws = rng.normal(size=(30, 2, 16))
    pca, pca_names = pooled_covariates(rows, "image+pca")
    found, names = pooled_covariates(rows, "image+pca+wiener", WienerNoise(draws, 0.8))
    assert names == [*pca_names, WIENER_COVARIATE]
    np.testing.assert_allclose(found[:, :-1], pca)
    np.testing.assert_allclose(found[:, -1], wiener_denoiser_loss(images.reshape(30, 16), WienerNoise(draws, 0.8)),
                               rtol=1e-9)
    with pytest.raises(ValueError, match="WienerNoise"):
        pooled_covariates(rows, "image+pca+wiener")
    with pytest.raises(ValueError, match="does not match"):
        wiener_denoiser_loss(images.reshape(30, 16), WienerNoise(draws[:10], 0.8))


def _noisy_world(rng, n, shift, d=16, draws=3, alpha_bar=0.8):
    """2n images; a DL-like feature that shares its noise draws with the covariate (a model that is a slightly
    better or worse linear denoiser of each noise draw), plus per-image noise; the first n (members) are
    lower by `shift` standard deviations of that extra noise."""
    images = _images(rng, 2 * n, d)
    noise = rng.normal(size=(2 * n, draws, d))
    wiener = WienerNoise(noise, alpha_bar)
    common = wiener_denoiser_loss(images, wiener, shrinkage=0.5)  # another shrinkage: not the covariate itself
    spread = common.std()
    feature = common + 0.5 * spread * rng.normal(size=2 * n)
    feature[:n] -= shift * 0.5 * spread
    rows = np.stack([difficulty_covariates(image.reshape(1, 4, 4), pixels=True) for image in images])
    return feature[:, None], rows, wiener, np.r_[np.ones(n, dtype=int), np.zeros(n, dtype=int)]


def test_null_audits_with_the_wiener_covariate_reject_at_most_alpha():
    """Exactness: 300 seeded null permutation-test audits (20 vs 20, B = 99) at alpha 0.05 reject inside the
    binomial 99.9 % band of 5 % (6 to 27 of 300)."""
    rng = np.random.default_rng(8)
    rejections, audits = 0, 300
    for i in range(audits):
        feature, rows, wiener, labels = _noisy_world(rng, 20, shift=0.0)
        found = calibrate(feature, [], ["DL"], rows, difficulty="image+pca+wiener", wiener=wiener)
        test = DatasetInferenceTest(test="permutation", n_permutations=99, alpha=0.05, random_state=i)
        rejections += test.fit(found.values, labels).p_value_ < 0.05
    assert stats.binom.ppf(0.001, audits, 0.05) <= rejections <= stats.binom.ppf(0.999, audits, 0.05)


def test_the_wiener_covariate_raises_power_when_the_noise_share_is_common():
    """30 seeded audits (60 vs 60, Welch at alpha 0.01): the covariate that shares the feature's noise detects
    at least 10 more than "image+pca" (measured: 30 of 30 against 4 of 30)."""
    rng = np.random.default_rng(9)
    detected = {"image+pca": 0, "image+pca+wiener": 0}
    for _ in range(30):
        feature, rows, wiener, labels = _noisy_world(rng, 60, shift=1.0)
        for mode in detected:
            found = calibrate(feature, [], ["DL"], rows, difficulty=mode, wiener=wiener)
            detected[mode] += DatasetInferenceTest(test="welch", alpha=0.01).fit(found.values, labels).p_value_ < 0.01
    assert detected["image+pca+wiener"] >= detected["image+pca"] + 10
