"""Distribution-shift guard: can model-free image statistics tell P from U?

The test's validity hinges on U being i.i.d. with P (method section 1). Another camera, year,
resizing or compression can make P vs U separable without any membership, and the membership test
would then reject H0 for the wrong reason. The guard fits the same cross-fitted classifier on
per-image statistics that no model sees (colour, contrast, sharpness, JPEG blocking, original
size) and tests its out-of-fold AUC with a permutation test, so its p-value is calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator

from cdi.stats.effect import per_feature_auc
from cdi.stats.permutation import cross_fitted_permutation_test
from cdi.stats.scoring import check_alpha, FeatureValueError

IMAGE_STATISTIC_NAMES = (
    "mean_red",  # channel means of the decoded image, values in [0, 1]
    "mean_green",
    "mean_blue",
    "std_red",  # channel standard deviations (contrast), [0, 1] scale
    "std_green",
    "std_blue",
    "mean_gradient_magnitude",  # mean |grad| of luminance (sharpness, noise), [0, 1] scale
    "colourfulness",  # Hasler & Suesstrunk (2003) M3, on [0, 1] values
    "jpeg_blockiness",  # mean |step| across 8x8 block borders / elsewhere; ~1 if not JPEG-coded
    "clipped_fraction",  # share of channel values at 0 or 255 (saturation, exposure)
    "original_log_pixels",  # log(width * height) of the original file
    "original_log_aspect",  # log(width / height) of the original file
)

_BLOCK = 8  # JPEG's DCT block size
_EPS = 1e-4


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights


def _jpeg_blockiness(luma: np.ndarray) -> float:
    """Mean absolute step across 8-pixel block borders over the mean step elsewhere.

    JPEG codes 8x8 blocks independently, so decoded JPEGs have larger steps on the block grid.
    Meaningful only before any resizing (resizing moves the grid).
    """
    border, other = [], []
    for steps in (np.abs(np.diff(luma, axis=1)), np.abs(np.diff(luma, axis=0)).T):
        # steps[:, j] is the step between pixel j and j + 1; a border when j + 1 is a multiple of 8
        on_grid = (np.arange(steps.shape[1]) + 1) % _BLOCK == 0
        border.append(steps[:, on_grid].ravel())
        other.append(steps[:, ~on_grid].ravel())
    border, other = np.concatenate(border), np.concatenate(other)
    if border.size == 0 or other.size == 0:
        return 1.0
    return float((border.mean() + _EPS) / (other.mean() + _EPS))


def image_statistics(image: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Model-free statistics of one image, in the order of IMAGE_STATISTIC_NAMES.

    `image` is the decoded uint8 array, (H, W, 3), (H, W, 4) (alpha ignored), (H, W, 1) or (H, W)
    (grey, used as three equal channels); compute it on the image as decoded from its file, before
    any resizing, so JPEG blocking is still on its grid. `original_size` is (width, height) of the
    original file, as PIL's `Image.size`.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise FeatureValueError(f"image must be a uint8 array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise FeatureValueError(
            f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}"
        )
    width, height = original_size
    if width < 1 or height < 1:
        raise FeatureValueError(f"original_size must be (width, height) > 0, got {original_size}")
    channels = image[:, :, :3] if image.shape[2] >= 3 else np.repeat(image, 3, axis=2)
    clipped = float(np.mean((channels == 0) | (channels == 255)))
    rgb = channels.astype(float) / 255.0
    pixels = rgb.reshape(-1, 3)
    luma = _luminance(rgb)

    gradient_x, gradient_y = np.diff(luma, axis=1)[:-1, :], np.diff(luma, axis=0)[:, :-1]
    gradient = np.sqrt(gradient_x**2 + gradient_y**2)
    mean_gradient = float(gradient.mean()) if gradient.size else 0.0

    # Hasler & Suesstrunk (2003): rg = R - G, yb = (R + G) / 2 - B,
    # M3 = sqrt(sd_rg^2 + sd_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2)
    red, green, blue = pixels.T
    rg, yb = red - green, 0.5 * (red + green) - blue
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())

    return np.array(
        [
            *pixels.mean(axis=0),
            *pixels.std(axis=0),
            mean_gradient,
            colourfulness,
            _jpeg_blockiness(luma),
            clipped,
            np.log(float(width) * float(height)),
            np.log(float(width) / float(height)),
        ]
    )


@dataclass(frozen=True, kw_only=True)
class ShiftCheckResult:
    """Outcome of the shift guard: out-of-fold AUC of P vs U on image statistics, its p-value."""

    auc: float
    p_value: float
    flagged: bool
    n_permutations: int


class ShiftGuard(BaseEstimator):
    """Cross-fitted classifier P vs U on model-free statistics, tested by permutation.

    The same pipeline as the membership scorer (class-balanced K folds, StandardScaler + L2
    logistic regression per fold), with the out-of-fold ROC AUC as statistic and p = (1 +
    #{AUC_b >= AUC}) / (1 + B) over B label permutations, calibrated whatever the dependence
    between folds. Flagged when p < alpha: then P and U differ in ways unrelated to the model, and
    a "used" verdict cannot be trusted. Note the smallest attainable p is 1 / (1 + B): keep
    B >= 1 / alpha.

    Attributes (after fit): `auc_`, `p_value_`, `flagged_`, `permutation_statistics_` (B null
    AUCs), `feature_auc_` (single-statistic AUC per column: which statistic differs), `result_`
    the ShiftCheckResult.
    """

    def __init__(
        self,
        n_splits: int = 5,
        C: float = 1.0,
        n_permutations: int = 200,
        alpha: float = 0.01,
        random_state: int | None = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.n_splits = n_splits
        self.C = C
        self.n_permutations = n_permutations
        self.alpha = alpha
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X, y) -> ShiftGuard:
        """X: per-image statistics (n_images, n_statistics); y: 1 suspect (P), 0 control (U)."""
        check_alpha(self.alpha)
        auc, null, p_value = cross_fitted_permutation_test(
            X,
            y,
            statistic="auc",
            n_permutations=self.n_permutations,
            n_splits=self.n_splits,
            C=self.C,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
        )
        self.auc_ = auc
        self.p_value_ = p_value
        self.flagged_ = bool(p_value < self.alpha)
        self.permutation_statistics_ = null
        self.feature_auc_ = per_feature_auc(X, y)
        self.result_ = ShiftCheckResult(
            auc=auc, p_value=p_value, flagged=self.flagged_, n_permutations=null.size
        )
        return self


def shift_check(stats_suspect, stats_control, **params) -> ShiftCheckResult:
    """Run ShiftGuard(**params) on per-image statistics of P (rows) and U (rows)."""
    suspect = np.asarray(stats_suspect, dtype=float)
    control = np.asarray(stats_control, dtype=float)
    if suspect.ndim != 2 or control.ndim != 2 or suspect.shape[1] != control.shape[1]:
        raise FeatureValueError(
            "stats_suspect and stats_control must be 2-D (n_images, n_statistics) with the same "
            f"number of statistics, got {suspect.shape} and {control.shape}"
        )
    X = np.vstack([suspect, control])
    y = np.r_[np.ones(len(suspect), dtype=int), np.zeros(len(control), dtype=int)]
    return ShiftGuard(**params).fit(X, y).result_


__all__ = [
    "IMAGE_STATISTIC_NAMES",
    "ShiftCheckResult",
    "ShiftGuard",
    "image_statistics",
    "shift_check",
]
