"""LoRA on the suspect model: a low-rank update fused into the base pipeline's weights before the audit.

A LoRA (Hu et al. 2021) adds to a linear or convolution weight W the product B A of two low-rank
factors, scaled by alpha / r (alpha / sqrt(r) with rsLoRA): W' = W + (alpha / r) B A. cdi audits the
model W' that the LoRA's user runs, so the update is merged into the weights once, at load time, and
the adapter is the plain base adapter afterwards (same speed, same contract).

Files read (safetensors; pickle only with `allow_pickle`):
- diffusers `save_lora_weights` output (`pytorch_lora_weights.safetensors`): tensors under `unet.`,
  `text_encoder.`, `text_encoder_2.` (or `transformer.`), PEFT or diffusers naming, with each
  component's LoraConfig in the header's `lora_adapter_metadata` where the trainer saved one;
- kohya / A1111 files (`lora_unet_...`, `lora_te_...`, `.alpha`), converted by diffusers (SD, SDXL);
- PEFT files: `get_peft_model_state_dict(model)` saved with safetensors (no prefix, or `unet.` /
  `transformer.`), or `PeftModel.save_pretrained`'s `adapter_model.safetensors`, whose
  `adapter_config.json` beside it gives alpha.
alpha comes from the file's metadata, the kohya alphas or adapter_config.json, else alpha = r (scale
1), as diffusers does. Text-encoder LoRA layers are applied too: the LoRA's user conditions through them.
Every LoRA tensor must fit a layer of the pipeline (name and shape), else the file is refused whole.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdi.errors import ModelError
from cdi.hashing import sha256_file, sha256_text
from cdi.models.base import DiffusionAdapter

#: Name of the injected adapter while it is merged; it never outlives `apply_lora`.
ADAPTER_NAME = "cdi_lora"
#: Diffusers' safetensors header key holding each component's LoraConfig (`unet.r`, `unet.lora_alpha`, ...).
METADATA_KEY = "lora_adapter_metadata"
#: Component prefixes diffusers' LoRA files use; a prefix the pipeline lacks means another kind of model.
KNOWN_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
PEFT_MODEL_PREFIX = "base_model.model."  # PeftModel.save_pretrained
# `<module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`, `.lora_magnitude_vector` (DoRA), embeddings.
_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?"
    r"|lora_embedding_A|lora_embedding_B)$"
)
_LORA_MARKERS = (".lora_A.", ".lora_B.", "lora_down", "lora_up", ".lora.down", ".lora.up", "lora_linear_layer",
                 "_lora.down", "_lora.up")


@dataclass
class LoraFile:
    """A LoRA weights file read into memory: its tensors, diffusers metadata and the files it was read from."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None = None  # flat `component.field` -> value (diffusers), or None
    peft_config: dict[str, Any] | None = None  # adapter_config.json beside a PeftModel's adapter_model.safetensors
    files: dict[str, str] = field(default_factory=dict)  # "lora/<name>" -> sha256

    @property
    def sha256(self) -> str:
        return self.files[f"lora/{self.path.name}"]


def is_lora_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file whose tensors are LoRA factors. Reads the header only;
    pickle files are never opened (they can run code) and answer False."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - any unreadable header means "not a LoRA file"
        return False
    return bool(keys) and all(_looks_like_lora(key) for key in keys)


def _looks_like_lora(key: str) -> bool:
    return any(marker in key for marker in _LORA_MARKERS) or key.endswith(".alpha") or "lora_magnitude" in key


def lora_files(path: str | Path) -> dict[str, str]:
    """The `info.files` entries a LoRA adds (the evidence manifest records them): `lora/<file name>`, and
    `lora/adapter_config.json` where a PEFT adapter's config beside it sets the scale."""
    path = Path(path)
    files = {f"lora/{path.name}": sha256_file(path)}
    config = _peft_config_path(path)
    if config is not None:
        files["lora/adapter_config.json"] = sha256_file(config)
    return files


def _peft_config_path(path: Path) -> Path | None:
    config = path.with_name("adapter_config.json")
    return config if path.name.startswith("adapter_model") and config.is_file() else None


def _require_peft(path: Path) -> None:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ModelError(f'--lora {path}: applying a LoRA needs the peft package; pip install "cdi[lora]"') from exc


def read_lora_file(path: str | Path, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA weights file, refusing pickle unless `allow_pickle` and anything that is not a tensor file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"--lora {path}: a directory; pass the LoRA weights file in it "
                         "(e.g. pytorch_lora_weights.safetensors)")
    if not path.is_file():
        raise ModelError(f"--lora {path}: no such file; pass a LoRA weights file (.safetensors)")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise ModelError(f"--lora {path}: not a .safetensors file; pickle files can run code when loaded; convert it "
                         "to safetensors (safetensors.torch.save_file) or pass --allow-pickle if you trust it")
    _require_peft(path)
    metadata = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                header = handle.metadata() or {}
            if header.get(METADATA_KEY):
                metadata = json.loads(header[METADATA_KEY])
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors and torch.load raise many kinds on a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"--lora {path}: not a readable LoRA weights file ({reason}); re-save it with "
                         "save_lora_weights (safetensors)") from exc
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ModelError(f"--lora {path}: does not hold a dict of tensors; re-save it with save_lora_weights")
    if not tensors:
        raise ModelError(f"--lora {path}: holds no tensors; re-save it with save_lora_weights")
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelError(f"--lora {path}: its {METADATA_KEY} header is not a JSON object; re-save it")
    peft_config = None
    config_path = _peft_config_path(path)
    if config_path is not None:
        try:
            peft_config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{config_path}: unreadable adapter config ({exc}); re-save the adapter") from exc
        if str(peft_config.get("peft_type", "LORA")).upper() != "LORA":
            raise ModelError(f"{config_path}: a {peft_config.get('peft_type')} adapter; cdi applies LoRA adapters only")
    return LoraFile(path, tensors, metadata, peft_config, lora_files(path))


def apply_lora(adapter: DiffusionAdapter, lora: LoraFile) -> DiffusionAdapter:
    """Merge `lora` into `adapter`'s weights (denoiser and, where the file has them, text encoders) and give
    the adapter a fingerprint of base + LoRA, with the LoRA file listed in `info.files`. On a ModelError the
    adapter may be partly changed: discard it (`load_model` does)."""
    targets = adapter.lora_targets()
    if not targets:
        raise ModelError(f"--lora {lora.path}: {adapter.info.pipeline_class} models cannot take a LoRA in cdi; "
                         "LoRA is supported for pixel UNet, Stable Diffusion, SDXL and DiT pipelines")
    denoiser_name = next(iter(targets))
    tensors, alphas = _diffusers_layout(adapter, lora)
    parts = _split_by_component(tensors, targets, denoiser_name, adapter.info.pipeline_class, lora.path)
    alpha_parts = _split_by_component(alphas, targets, denoiser_name, adapter.info.pipeline_class, lora.path)
    if not parts:
        raise ModelError(f"--lora {lora.path}: holds no LoRA layers, only alphas; re-save it with save_lora_weights")
    for component, part in parts.items():
        module = targets[component]
        is_denoiser = component == denoiser_name
        renamed = _peft_names(list(part), module, is_denoiser, lora.path)
        part = {renamed[key]: value for key, value in part.items()}
        layer_alphas = _file_alphas(alpha_parts.get(component, {}), renamed, module, is_denoiser)
        config = _component_config(lora, component, is_denoiser)
        _merge_into(module, part, layer_alphas, config, component, lora.path)
    for module in targets.values():
        module.eval().requires_grad_(False)
    base = adapter.info
    # Content only (not the file's name): base fingerprint, the LoRA's sha256, its PEFT config's if it has one.
    lines = [base.fingerprint, f"lora\t{lora.sha256}"]
    if "lora/adapter_config.json" in lora.files:
        lines.append(f"lora-config\t{lora.files['lora/adapter_config.json']}")
    digest = sha256_text("\n".join(lines))
    adapter.info = replace(base, fingerprint=digest, files={**base.files, **lora.files}, lora=str(lora.path.resolve()))
    return adapter


# -- reading the file's layout -------------------------------------------------------------------
def _diffusers_layout(adapter: DiffusionAdapter, lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tensors in diffusers naming (kohya / A1111 files converted where the pipeline has a diffusers loader),
    and the per-layer alphas such files carry (`<component>.<module>.alpha`)."""
    tensors = dict(lora.tensors)
    alphas: dict[str, float] = {}
    loader_name = adapter.lora_converter
    if loader_name and all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in tensors):
        import diffusers.loaders as loaders

        loader = getattr(loaders, loader_name)
        unet = getattr(adapter, "unet", None)
        try:
            tensors, network_alphas = loader.lora_state_dict(tensors, unet_config=getattr(unet, "config", None))
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise ValueError, KeyError, IndexError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"--lora {lora.path}: cannot read it as a kohya LoRA ({reason})") from exc
        alphas.update({key: float(value) for key, value in (network_alphas or {}).items()})
    for key in [key for key in tensors if key.endswith(".alpha")]:
        alphas[key] = float(tensors.pop(key).float().reshape(-1)[0])
    return tensors, alphas


def _split_by_component(tensors: dict[str, Any], targets: dict[str, nn.Module], denoiser: str,
                        pipeline_class: str, path: Path) -> dict[str, dict[str, Any]]:
    """The file's entries by component (their prefix removed); entries without a known prefix: the denoiser's."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        head = key.split(".", 1)[0]
        if head in targets:
            component, name = head, key[len(head) + 1:]
        elif head in KNOWN_PREFIXES:
            raise ModelError(f"--lora {path}: holds LoRA layers for a `{head}` ({key}), which a {pipeline_class} "
                             "does not have; this LoRA was made for another kind of model")
        else:  # PEFT files of the denoiser alone carry no component prefix
            component, name = denoiser, key.removeprefix(PEFT_MODEL_PREFIX)
        parts.setdefault(component, {})[name] = value
    return parts


def _peft_names(keys: list[str], module: nn.Module, is_denoiser: bool, path: Path) -> dict[str, str]:
    """Each key's PEFT name (`<module>.lora_A.weight`), from the diffusers and older attention-processor
    namings; diffusers' converters only rename keys, so they map the names themselves (old -> new)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    renamed = {key: key for key in keys}  # the converters return {new name: value}: here value = old name
    if not all(_PEFT_KEY.match(key) for key in keys):
        try:
            converted = convert_unet_state_dict_to_peft(renamed) if is_denoiser else convert_state_dict_to_peft(renamed)
            renamed = {old: new for new, old in converted.items()}
        except ValueError:
            pass  # no known naming: the check below names the first key that is not a LoRA factor
    bad = [old for old, new in renamed.items() if not _PEFT_KEY.match(new)]
    if bad:
        raise ModelError(f"--lora {path}: {bad[0]!r} is not a LoRA factor (lora_A/lora_B, lora_down/lora_up); "
                         "cdi applies LoRA files only (not LoKr, LoHa or full weights)")
    if not is_denoiser:
        renamed = dict(zip(renamed, _text_model_names(dict.fromkeys(renamed.values()), module)))
    return renamed


def _text_model_names(part: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """CLIP text encoders lost their `text_model.` level in transformers 5; files name layers either way."""
    flat = not hasattr(module, "text_model")
    if flat:
        return {key.removeprefix("text_model."): value for key, value in part.items()}
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in part.items()}


# -- the scale of each layer -------------------------------------------------------------------
def _component_config(lora: LoraFile, component: str, is_denoiser: bool) -> dict[str, Any]:
    """The trainer's LoraConfig fields for one component: diffusers' header metadata (`<component>.<field>`),
    else adapter_config.json (denoiser only), else none."""
    if lora.metadata:
        prefix = f"{component}."
        fields = {key[len(prefix):]: value for key, value in lora.metadata.items() if key.startswith(prefix)}
        if fields:
            return fields
    if is_denoiser and lora.peft_config:
        return dict(lora.peft_config)
    return {}


def _file_alphas(alphas: dict[str, float], renamed: dict[str, str], module: nn.Module,
                 is_denoiser: bool) -> dict[str, float]:
    """Per-layer alphas a file carries (kohya `.alpha` tensors), keyed by PEFT module name. An alpha is named
    after one factor of its layer (`<factor key>.alpha`, renamed as the factor) or after the layer itself."""
    found: dict[str, float] = {}
    for key, value in alphas.items():
        stem = key.removesuffix(".alpha")
        if stem in renamed:
            found[_PEFT_KEY.match(renamed[stem])["module"]] = value
        else:
            name = stem.replace(".processor.", ".")
            found[name if is_denoiser else next(iter(_text_model_names({name: None}, module)))] = value
    return found


def _layer_alpha(name: str, rank: int, alphas: dict[str, float], config: dict[str, Any]) -> float:
    if name in alphas:
        return alphas[name]
    if config:
        # A pattern key is a regular expression matched against the end of a module name, as in peft.
        pattern = config.get("alpha_pattern") or {}
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return float(value)
        if config.get("lora_alpha") is not None:
            return float(config["lora_alpha"])
    return float(rank)  # no alpha anywhere: W + B A, the diffusers / PEFT convention


# -- merging -----------------------------------------------------------------------------------
def _merge_into(module: nn.Module, part: dict[str, torch.Tensor], alphas: dict[str, float], config: dict[str, Any],
                component: str, path: Path) -> None:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    layers = dict(module.named_modules())
    names = sorted({_PEFT_KEY.match(key)["module"] for key in part})
    for name in names:
        if name not in layers:
            raise ModelError(f"--lora {path}: LoRA layer {component}.{name} matches no layer of the {component} "
                             f"({type(module).__name__}); this LoRA was made for another model")
    ranks = {}
    for name in names:
        factor = part.get(f"{name}.lora_A.weight", part.get(f"{name}.lora_embedding_A"))
        if factor is None or factor.ndim < 2:
            raise ModelError(f"--lora {path}: LoRA layer {component}.{name} has no lora_A factor; "
                             "the file is incomplete")
        ranks[name] = int(factor.shape[0])
    layer_alphas = {name: _layer_alpha(name, ranks[name], alphas, config) for name in names}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(layer_alphas.values()).most_common(1)[0][0]
    # Exact module names (escaped: pattern keys are regular expressions).
    peft_config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in layer_alphas.items() if v != lora_alpha},
        target_modules=names,
        use_rslora=bool(config.get("use_rslora", False)),
        # Passed only when set: older peft releases have no such field.
        **({"use_dora": True} if any("lora_magnitude_vector" in key for key in part) else {}),
        **({"lora_bias": True} if any(key.endswith("lora_B.bias") for key in part) else {}),
    )
    try:
        inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"--lora {path}: its layers do not fit the {component} ({reason})") from exc
    expected = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    for key, value in part.items():
        if key not in expected:
            raise ModelError(f"--lora {path}: {component}.{key} fits no LoRA parameter of the {component}; "
                             "this LoRA was made for another model")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"--lora {path}: {component}.{key} has shape {tuple(value.shape)} but the {component}'s layer needs "
                f"{tuple(expected[key].shape)}; this LoRA was made for another model"
            )
    missing = sorted(set(expected) - set(part))
    if missing:
        raise ModelError(f"--lora {path}: {component}.{missing[0]} is missing; the file is incomplete")
    weights = {key: value.to(torch.float32) for key, value in part.items()}
    set_peft_model_state_dict(module, weights, adapter_name=ADAPTER_NAME)
    try:
        _merge_and_unload(module)
    except ValueError as exc:  # safe_merge: the merged weights would not be finite
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"--lora {path}: merging it into the {component} fails ({reason})") from exc


def _merge_and_unload(module: nn.Module) -> None:
    """W <- W + scale B A in every LoRA layer, then the LoRA wrappers replaced by their (updated) base layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]
    with torch.no_grad():
        for _, layer in wrapped:
            layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
    for name, layer in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        module.__dict__.pop(attribute, None)


__all__ = ["LoraFile", "apply_lora", "is_lora_file", "lora_files", "read_lora_file"]
