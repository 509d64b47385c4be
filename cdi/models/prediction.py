"""What a denoiser predicts, read from its scheduler config, and how to turn it into epsilon.

CDI's features are written in terms of the noise prediction eps_hat (method doc, section 2). A model
trained for another target is converted here, in one place, so every adapter does it the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdi.errors import ModelError
from cdi.models.loading import first_line, read_json_object

#: Prediction types cdi can read as epsilon; `sample` (x0) models are refused.
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Most training timesteps a schedule may have (the paper's models: 1000; checked before it is built).
MAX_TRAIN_TIMESTEPS = 100_000


def read_scheduler(root: Path) -> tuple[torch.Tensor, str]:
    """alphas_cumprod and the (supported) prediction type of the pipeline at `root`, refused (ModelError
    naming scheduler_config.json) unless the config is a JSON object whose schedule is a valid one."""
    import diffusers

    config_path = root / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; the pipeline needs a DDPM/DDIM-family scheduler")
    config = read_json_object(config_path, "re-save the pipeline")
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ModelError(f"{config_path}: unknown scheduler class {config.get('_class_name')!r}")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ModelError(f"{config_path}: num_train_timesteps {steps!r} is not an integer in 1..{MAX_TRAIN_TIMESTEPS}; "
                         "fix it or re-save the pipeline")
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or not 1 <= len(betas) <= MAX_TRAIN_TIMESTEPS):
        raise ModelError(f"{config_path}: trained_betas is not a list of at most {MAX_TRAIN_TIMESTEPS} numbers; "
                         "fix it or re-save the pipeline")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(
            f"{config_path}: prediction_type {prediction_type!r} is not supported; cdi reads "
            f"{' or '.join(PREDICTION_TYPES)} models as noise predictions"
        )
    try:
        alphas = getattr(cls.from_config(config), "alphas_cumprod", None)
    except Exception as exc:  # noqa: BLE001 - a scheduler's constructor raises many kinds on bad values
        raise ModelError(f"{config_path}: not a valid {cls.__name__} config ({first_line(exc)}); "
                         "fix it or re-save the pipeline") from exc
    if alphas is None:
        raise ModelError(
            f"{config_path}: scheduler {cls.__name__} has no alphas_cumprod; "
            "cdi needs a DDPM/DDIM-family (variance-preserving) scheduler"
        )
    alphas = torch.as_tensor(alphas)
    # alpha_bar_t = prod_{s <= t} (1 - beta_s) must fall from at most 1 and stay in [0, 1].
    valid = bool(torch.isfinite(alphas).all() and (alphas >= 0).all() and (alphas <= 1).all()
                 and (alphas[1:] <= alphas[:-1]).all())
    if not valid:
        raise ModelError(f"{config_path}: its betas give no valid noise schedule (alpha_bar must fall from 1 "
                         "towards 0 within [0, 1]); check beta_start, beta_end, trained_betas or re-save the pipeline")
    return alphas, str(prediction_type)


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
