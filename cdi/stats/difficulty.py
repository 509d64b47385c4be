"""Per-image difficulty calibration (method doc, section 8).

On weak models an image's features mostly say how hard that image is for *any* model of its kind;
membership is a small shift on top. Two ways to remove the difficulty part before scoring:

1. **Reference models** R_1..R_K (not trained on P or U), each queried with the *same* seeded noise
   as the target M for every (image, feature, timestep, draw) (common random numbers, see
   `cdi.features.seeded_noise`): the noise's share of a loss cancels in the difference. Per image x and
   feature f:

       difference:  f_cal(x) = f_M(x) - (1/K) sum_k f_Rk(x)                      (1)
       log_ratio:   f_cal(x) = log f_M(x) - (1/K) sum_k log f_Rk(x)              (2)

   (2) is the log of the ratio to the references' geometric mean; it needs positive features
   (every CDI feature is a norm) and falls back to (1) for a column with a value <= 0.
   This is the set-level form of LiRA's / RMIA's reference calibration.

2. **Label-free covariates** z(x) (image statistics that no model computes, `difficulty_covariates`):
   each feature column is regressed on [1, z] over all audited images, P and U pooled, and the
   scorer gets the residuals:

       beta = argmin_b sum_x (f(x) - [1, z(x)] b)^2 + lambda |b_z|^2,   f_res(x) = f(x) - [1, z(x)] beta   (3)

   (lambda = 0: ordinary least squares; covariates standardised first.)

   Mode "image": z = the five DIFFICULTY_COVARIATE_NAMES. Mode "image+pca": z = those five and the
   scores of the top k = min(PCA_COMPONENTS, n // 10) principal components of the pixels, the PCA fitted
   on the pooled audited images themselves (no labels; `difficulty_covariates(image, pixels=True)` appends
   the pixels to each row, `pooled_covariates` turns them into component scores).

   Mode "image+pca+wiener" (pixel models): those covariates and one more, the denoising loss of the
   *Wiener denoiser* of the audited images, queried with DL's own seeded noise (common random numbers, as
   with a reference model, but the "reference" needs no weights). With mu and S the mean and covariance of
   the pooled audited images z0 (flattened, D values each), S_d = S + delta I, delta = WIENER_SHRINKAGE
   tr(S) / D, and x_t = a z0 + s eps (a^2 = alpha_bar at DL's timestep, s^2 = 1 - a^2), the linear
   minimum-mean-square-error estimate of z0 is

       z0_hat = mu + a S_d (a^2 S_d + s^2 I)^-1 (x_t - a mu),   eps_hat = (x_t - a z0_hat) / s,     (4)

   and the covariate is w(x) = (1/R) sum_r ||eps_hat_r - eps_r||_2 over DL's R draws. It shares the
   draws' noise with DL, so it removes the noise's share of DL as well as the image's difficulty, which
   the image statistics cannot (`wiener_denoiser_loss`; S_d is applied through the SVD of the centred
   images, so D may exceed the number of images).

Why the permutation test stays exact: (1)-(2) are computed per image, and (3) is fitted on the pooled
images without their labels, so both are symmetric functions of the pooled data. Under H0 P and U
are exchangeable, the calibrated features of an image do not depend on which set it is in, and the
permutation distribution of the whole cross-fitted pipeline is unchanged (tests/stats/test_difficulty.py
checks the false-positive rate of null audits).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator

REPRESENTATIONS = ("raw", "calibrated", "both")
REFERENCE_FORMULAS = ("difference", "log_ratio")
DIFFICULTY_MODES = ("off", "image", "image+pca", "image+pca+wiener")
#: What `--difficulty-calibration` accepts: a mode, or "auto" (the audit picks one per model, `cdi.audit`).
DIFFICULTY_CHOICES = (*DIFFICULTY_MODES, "auto")
#: Modes whose covariates include the pixels of every image (`difficulty_covariates(..., pixels=True)`).
PIXEL_MODES = ("image+pca", "image+pca+wiener")
DIFFICULTY_MODELS = ("ols", "ridge")

#: Label-free difficulty covariates, computed on the image as the model sees it (its resolution).
DIFFICULTY_COVARIATE_NAMES = (
    "mean",  # mean intensity, [0, 1]
    "spread",  # standard deviation of intensity (contrast)
    "ink_fraction",  # share of pixels more than 0.25 away from the image's median (foreground share)
    "zlib_bits",  # zlib-compressed size in bits per pixel of the 8-bit image (compressibility)
    "edge_energy",  # mean squared difference of neighbouring pixels (detail, texture)
)
_INK_THRESHOLD = 0.25
#: Principal components of the pooled images' pixels used by mode "image+pca" (at most n // 10 of them).
PCA_COMPONENTS = 20
#: delta / (tr(S) / D) of formula (4): the isotropic share added to the images' covariance (measured best of
#: 1e-4 .. 1 on the weak testbed, benchmarks/README.md "Statistical power"; 0.1-0.3 were within noise).
WIENER_SHRINKAGE = 0.3
#: Column name of formula (4)'s covariate.
WIENER_COVARIATE = "wiener_DL"


@dataclass(frozen=True)
class WienerNoise:
    """What formula (4) needs besides the images: DL's seeded noise draws of every image, (n, R, D) in the
    order of the covariate rows, and alpha_bar at DL's timestep on the audited model's schedule."""

    draws: np.ndarray
    alpha_bar: float


def calibrated_name(name: str, formula: str) -> str:
    """Column name of a reference-calibrated feature: `DL-ref` (difference) or `DL/ref` (log ratio)."""
    return f"{name}-ref" if formula == "difference" else f"{name}/ref"


def residual_name(name: str) -> str:
    """Column name of a feature with the covariates' share regressed out."""
    return f"{name}.resid"


def reference_calibrated(
    target: np.ndarray, references: Sequence[np.ndarray], formula: str = "difference"
) -> tuple[np.ndarray, list[str]]:
    """Formula (1) or (2), column by column; returns the matrix and the formula used per column."""
    if formula not in REFERENCE_FORMULAS:
        raise ValueError(f"formula must be one of {REFERENCE_FORMULAS}, got {formula!r}")
    if not references:
        raise ValueError("reference calibration needs at least one reference feature matrix")
    target = np.asarray(target, dtype=np.float64)
    stacked = np.stack([np.asarray(r, dtype=np.float64) for r in references])  # (K, n, d)
    if stacked.shape[1:] != target.shape:
        raise ValueError(f"reference features {stacked.shape[1:]} do not match the target's {target.shape}")
    out = target - stacked.mean(axis=0)
    used = ["difference"] * target.shape[1]
    if formula == "log_ratio":
        positive = (target > 0).all(axis=0) & (stacked > 0).all(axis=(0, 1))
        out[:, positive] = np.log(target[:, positive]) - np.log(stacked[:, :, positive]).mean(axis=0)
        used = ["log_ratio" if ok else "difference" for ok in positive]
    return out, used


def represent(
    target: np.ndarray,
    references: Sequence[np.ndarray],
    names: Sequence[str],
    representation: str = "calibrated",
    formula: str = "difference",
) -> tuple[np.ndarray, list[str]]:
    """The feature matrix the scorer sees and its column names.

    `raw`: the target's features; `calibrated`: formula (1)/(2) only; `both`: the two side by side.
    Without references every representation is `raw`.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    target = np.asarray(target, dtype=np.float64)
    if not references or representation == "raw":
        return target, list(names)
    calibrated, used = reference_calibrated(target, references, formula)
    calibrated_names = [calibrated_name(n, f) for n, f in zip(names, used)]
    if representation == "calibrated":
        return calibrated, calibrated_names
    return np.hstack([target, calibrated]), [*names, *calibrated_names]


def difficulty_covariates(image: np.ndarray, pixels: bool = False) -> np.ndarray:
    """The DIFFICULTY_COVARIATE_NAMES of one image, (C, H, W) or (H, W) in [-1, 1] (the model's input).

    Colour images are reduced to their luminance (ITU-R BT.601). `pixels`: append every pixel of the image
    as the model sees it (all channels, in [0, 1]), the input of mode "image+pca" (`pooled_covariates`).
    """
    stats = _image_statistics(image)
    if not pixels:
        return stats
    return np.concatenate([stats, np.clip((np.asarray(image, dtype=np.float64).ravel() + 1.0) / 2.0, 0.0, 1.0)])


def _image_statistics(image: np.ndarray) -> np.ndarray:
    pixels = (np.asarray(image, dtype=np.float64) + 1.0) / 2.0
    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else np.tensordot([0.299, 0.587, 0.114], pixels[:3], axes=1)
    pixels = np.clip(pixels, 0.0, 1.0)
    as_bytes = np.round(pixels * 255).astype(np.uint8)
    edges = np.concatenate([np.diff(pixels, axis=0).ravel(), np.diff(pixels, axis=1).ravel()])
    return np.array([
        pixels.mean(),
        pixels.std(),
        (np.abs(pixels - np.median(pixels)) > _INK_THRESHOLD).mean(),
        8.0 * len(zlib.compress(as_bytes.tobytes(), 9)) / as_bytes.size,
        float(np.mean(edges**2)) if edges.size else 0.0,
    ])


def pca_component_count(n_images: int) -> int:
    """k of mode "image+pca": PCA_COMPONENTS, at most one component per ten audited images (at least 1)."""
    return int(max(1, min(PCA_COMPONENTS, n_images // 10)))


def wiener_denoiser_loss(images: np.ndarray, noise: WienerNoise, shrinkage: float = WIENER_SHRINKAGE) -> np.ndarray:
    """Formula (4): w(x) of each image, `images` (n, D) in [-1, 1] as the model sees them, mu and S fitted on
    all n rows pooled (no labels; symmetric in the rows, so the permutation test stays exact)."""
    z0 = np.asarray(images, dtype=np.float64)
    draws = np.asarray(noise.draws, dtype=np.float64)
    n, d = z0.shape
    if draws.ndim != 3 or draws.shape[0] != n or draws.shape[2] != d:
        raise ValueError(f"Wiener noise of shape {draws.shape} does not match {n} images of {d} values")
    a = float(np.sqrt(noise.alpha_bar))
    s2 = 1.0 - a * a
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha_bar must lie in (0, 1), got {noise.alpha_bar}")
    mu = z0.mean(axis=0)
    centred = z0 - mu
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # S = V diag(singular^2 / (n - 1)) V^T
    eigen = singular**2 / max(n - 1, 1)
    delta = shrinkage * eigen.sum() / d
    gain = a * (eigen + delta) / (a * a * (eigen + delta) + s2)  # along each principal direction
    gain_rest = a * delta / (a * a * delta + s2)  # on the complement, where S_d = delta I
    total = np.zeros(n)
    for r in range(draws.shape[1]):
        eps = draws[:, r, :]
        offset = a * centred + np.sqrt(s2) * eps  # x_t - a mu
        coords = offset @ vt.T
        z0_hat = mu + gain_rest * offset + (coords * (gain - gain_rest)) @ vt
        eps_hat = (a * z0 + np.sqrt(s2) * eps - a * z0_hat) / np.sqrt(s2)
        total += np.linalg.norm(eps_hat - eps, axis=1)
    return total / draws.shape[1]


def pooled_covariates(covariates: np.ndarray, difficulty: str,
                      wiener: WienerNoise | None = None) -> tuple[np.ndarray, list[str]]:
    """The covariate matrix the regression of `difficulty` uses, and its column names.

    "image": the covariates as given (normally the DIFFICULTY_COVARIATE_NAMES). "image+pca": the first
    len(DIFFICULTY_COVARIATE_NAMES) columns and the scores of the top `pca_component_count(n)` principal
    components of the remaining columns (the pixels appended by `difficulty_covariates(..., pixels=True)`),
    fitted on all n rows pooled, without labels. The SVD of the centred rows does not depend on their order
    (up to the sign of a component, which no least-squares residual sees), so the map stays symmetric in the
    images and the permutation test exact. "image+pca+wiener": those and formula (4)'s `wiener_DL`, which
    needs `wiener` (DL's noise of each row).
    """
    covariates = np.asarray(covariates, dtype=np.float64)
    if covariates.ndim != 2:
        raise ValueError(f"difficulty covariates need one row per image, got shape {covariates.shape}")
    q = len(DIFFICULTY_COVARIATE_NAMES)
    if difficulty == "image":
        names = list(DIFFICULTY_COVARIATE_NAMES) if covariates.shape[1] == q else \
            [f"covariate_{i + 1}" for i in range(covariates.shape[1])]
        return covariates, names
    if difficulty not in PIXEL_MODES:
        raise ValueError(f"no covariates for difficulty mode {difficulty!r}")
    stats = covariates[:, :q]
    pixels = covariates[:, q:]
    if covariates.shape[1] <= q:
        raise ValueError(f'difficulty calibration "{difficulty}" needs the pixels of every image: compute the '
                         "covariates with difficulty_covariates(image, pixels=True)")
    k = min(pca_component_count(len(pixels)), pixels.shape[1], max(1, len(pixels) - 1))
    centred = pixels - pixels.mean(axis=0)
    u, singular, _ = np.linalg.svd(centred, full_matrices=False)
    scores = u[:, :k] * singular[:k]
    names = [*DIFFICULTY_COVARIATE_NAMES, *(f"pca_{i + 1}" for i in range(k))]
    if difficulty == "image+pca":
        return np.hstack([stats, scores]), names
    if wiener is None:
        raise ValueError('difficulty calibration "image+pca+wiener" needs DL\'s noise of every image (WienerNoise)')
    loss = wiener_denoiser_loss(2.0 * pixels - 1.0, wiener)
    return np.hstack([stats, scores, loss[:, None]]), [*names, WIENER_COVARIATE]


class DifficultyRegression(BaseEstimator):
    """Formula (3): regress every feature column on the covariates, fitted without labels.

    `fit(X, Z)` takes the features (n, d) and covariates (n, q) of all audited images pooled;
    `transform(X, Z)` returns the residuals. Covariates constant over the images are dropped.
    Attributes: `coef_` (d, q) on standardised covariates, `intercept_` (d,), `r2_` (d,) the share
    of each feature's variance the covariates explain, `kept_` the covariate columns used.
    """

    def __init__(self, model: str = "ols", ridge_alpha: float = 1.0) -> None:
        self.model = model
        self.ridge_alpha = ridge_alpha

    def fit(self, X, Z) -> DifficultyRegression:
        if self.model not in DIFFICULTY_MODELS:
            raise ValueError(f"model must be one of {DIFFICULTY_MODELS}, got {self.model!r}")
        X, Z = np.asarray(X, dtype=np.float64), np.asarray(Z, dtype=np.float64)
        if X.shape[0] != Z.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows but {Z.shape[0]} covariate rows")
        self.mean_, scale = Z.mean(axis=0), Z.std(axis=0)
        self.kept_ = np.flatnonzero(scale > 1e-12 * np.maximum(1.0, np.abs(self.mean_)))
        self.scale_ = scale
        design = self._design(Z)
        lam = 0.0 if self.model == "ols" else float(self.ridge_alpha)
        penalty = lam * np.eye(design.shape[1])
        penalty[0, 0] = 0.0  # the intercept is never shrunk
        beta = np.linalg.lstsq(design.T @ design + penalty, design.T @ X, rcond=None)[0]  # (1 + q, d)
        self.intercept_, self.coef_ = beta[0], beta[1:].T
        residual = X - design @ beta
        total = ((X - X.mean(axis=0)) ** 2).sum(axis=0)
        self.r2_ = np.where(total > 0, 1.0 - (residual**2).sum(axis=0) / np.where(total > 0, total, 1.0), 0.0)
        return self

    def _design(self, Z: np.ndarray) -> np.ndarray:
        kept = (Z[:, self.kept_] - self.mean_[self.kept_]) / self.scale_[self.kept_]
        return np.hstack([np.ones((Z.shape[0], 1)), kept])

    def transform(self, X, Z) -> np.ndarray:
        X, Z = np.asarray(X, dtype=np.float64), np.asarray(Z, dtype=np.float64)
        return X - self.intercept_ - self._design(Z)[:, 1:] @ self.coef_.T

    def fit_transform(self, X, Z) -> np.ndarray:
        return self.fit(X, Z).transform(X, Z)


@dataclass
class Calibrated:
    """The scorer's input after calibration, and what was done to get it."""

    values: np.ndarray
    names: list[str]
    representation: str
    formula: str | None
    difficulty: str
    difficulty_model: str | None = None
    difficulty_r2: dict[str, float] | None = None
    covariate_names: list[str] | None = None

    def describe(self) -> dict:
        return {
            "representation": self.representation,
            "reference_formula": self.formula,
            "difficulty_calibration": self.difficulty,
            "difficulty_model": self.difficulty_model,
            "difficulty_covariates": (list(self.covariate_names or DIFFICULTY_COVARIATE_NAMES)
                                      if self.difficulty != "off" else []),
            "difficulty_r2": self.difficulty_r2,
            "scored_features": list(self.names),
        }


def calibrate(
    target: np.ndarray,
    references: Sequence[np.ndarray],
    names: Sequence[str],
    covariates: np.ndarray | None = None,
    *,
    representation: str = "calibrated",
    formula: str = "difference",
    difficulty: str = "off",
    model: str = "ols",
    wiener: WienerNoise | None = None,
) -> Calibrated:
    """Reference calibration (if references are given), then the covariate regression (if `difficulty`
    is not "off"): the whole label-free map from extracted features to the scorer's input.

    `covariates`: one row per image, `difficulty_covariates(image)` for mode "image",
    `difficulty_covariates(image, pixels=True)` for "image+pca" (mode "image" regresses on every column given,
    so give it the five statistics only), and the same for "image+pca+wiener" with `wiener`, DL's noise of
    every row."""
    if difficulty not in DIFFICULTY_MODES:
        raise ValueError(f"difficulty must be one of {DIFFICULTY_MODES}, got {difficulty!r}")
    values, scored = represent(target, references, names, representation, formula)
    used_representation = representation if references else "raw"
    r2, covariate_names = None, None
    if difficulty != "off":
        if covariates is None:
            raise ValueError("difficulty calibration needs the covariates of every image")
        covariates, covariate_names = pooled_covariates(covariates, difficulty, wiener)
        regression = DifficultyRegression(model=model).fit(values, covariates)
        values = regression.transform(values, covariates)
        r2 = {residual_name(n): float(v) for n, v in zip(scored, regression.r2_)}
        scored = [residual_name(n) for n in scored]
    return Calibrated(values, scored, used_representation, formula if references else None, difficulty,
                      model if difficulty != "off" else None, r2, covariate_names)


__all__ = [
    "DIFFICULTY_CHOICES",
    "DIFFICULTY_COVARIATE_NAMES",
    "DIFFICULTY_MODES",
    "PCA_COMPONENTS",
    "PIXEL_MODES",
    "REFERENCE_FORMULAS",
    "REPRESENTATIONS",
    "WIENER_COVARIATE",
    "WIENER_SHRINKAGE",
    "Calibrated",
    "DifficultyRegression",
    "WienerNoise",
    "calibrate",
    "calibrated_name",
    "difficulty_covariates",
    "pca_component_count",
    "pooled_covariates",
    "reference_calibrated",
    "represent",
    "residual_name",
    "wiener_denoiser_loss",
]
