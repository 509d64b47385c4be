"""What a denoiser predicts, read from its scheduler config, and how to turn it into epsilon.

CDI's features are written in terms of the noise prediction eps_hat (method doc, section 2). A model
trained for another target is converted here, in one place, so every adapter does it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdi.errors import ModelError

#: Prediction types cdi can read as epsilon; `sample` (x0) models are refused.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_scheduler(root: Path) -> tuple[torch.Tensor, str]:
    """alphas_cumprod and the (supported) prediction type of the pipeline at `root`."""
    import diffusers

    config_path = root / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; the pipeline needs a DDPM/DDIM-family scheduler")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_path}: unreadable scheduler config ({exc}); re-save the pipeline") from exc
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelError(f"{config_path}: unknown scheduler class {config.get('_class_name')!r}")
    alphas = getattr(cls.from_config(config), "alphas_cumprod", None)
    if alphas is None:
        raise ModelError(
            f"{config_path}: scheduler {cls.__name__} has no alphas_cumprod; "
            "cdi needs a DDPM/DDIM-family (variance-preserving) scheduler"
        )
    prediction_type = str(config.get("prediction_type", "epsilon"))
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(
            f"{config_path}: prediction_type {prediction_type!r} is not supported; cdi reads "
            f"{' or '.join(PREDICTION_TYPES)} models as noise predictions"
        )
    return torch.as_tensor(alphas), prediction_type


def to_epsilon(output: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The denoiser's `output` at z_t, read as a noise prediction eps_hat."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        ab = alpha_bar.to(device=output.device, dtype=torch.float64)
        # v = sqrt(ab) eps - sqrt(1 - ab) x0 and z_t = sqrt(ab) x0 + sqrt(1 - ab) eps, hence
        # eps = sqrt(ab) v + sqrt(1 - ab) z_t (Salimans & Ho 2022, "Progressive distillation", sec. 4).
        return (ab.sqrt() * output + (1 - ab).sqrt() * z_t).to(output.dtype)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")  # read_scheduler refuses it first
