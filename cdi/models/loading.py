"""Reading a diffusers pipeline directory safely: model_index.json, configs, fingerprint, weights.

A suspect's model is untrusted input, and a damaged one must be refused, never audited: diffusers and
transformers fill a weight missing from the files with random values or leave it uninitialised, so
such a model gives another answer on every run under one fingerprint. `load_component` therefore

1. reads config.json (a JSON object; sizes are positive integers, `sample_size` at most
   `max_sample_size`) before anything is built;
2. reads every safetensors header of the component (a truncated or garbage file fails here) and
   checks each shard an index names;
3. builds the component on the meta device (no memory): a config whose sizes do not fit fails here,
   and one with more than `MAX_PARAMETERS` numbers is refused;
4. loads it, and refuses it unless the files provide every parameter and persisted buffer with its
   shape. Tensors the files hold beyond those are ignored with a warning.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch

from cdi.errors import ModelError
from cdi.hashing import sha256_file, sha256_text
from cdi.models.base import model_files

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
#: Largest image side (pixels) cdi audits at; a denoiser's `sample_size` is checked against it (latent
#: models: divided by the VAE's downsampling factor) before the model is built.
MAX_IMAGE_SIZE = 4096
#: Most numbers (parameters and persisted buffers) one component may hold: 4e10 bytes in float32. SDXL's
#: UNet, the largest supported, has 2.6e9. Counted on the meta device, before any memory is allocated.
MAX_PARAMETERS = 10_000_000_000
#: Config fields that are sizes: a positive integer, a (nested) list of them, or null (the default).
SIZE_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
    "transformer_layers_per_block", "num_class_embeds", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "patch_size", "num_layers", "num_embeds_ada_norm",
    "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings",
    "projection_dim",
)
RESAVE = "re-save the pipeline with save_pretrained"
#: Tensor names quoted in a message; the rest are counted.
QUOTED = 5


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _few(names: Iterable[str]) -> str:
    names = sorted(names)
    quoted = ", ".join(names[:QUOTED])
    return quoted + (f", ... ({len(names) - QUOTED} more)" if len(names) > QUOTED else "")


def read_json_object(path: Path, fix: str = RESAVE) -> dict:
    """The JSON object in `path`; anything else (unreadable, not JSON, a list) is a ModelError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not readable JSON ({first_line(exc)}); {fix}") from exc
    if not isinstance(value, dict):
        raise ModelError(f"{path}: holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def read_model_index(root: Path) -> dict:
    if not root.is_dir():
        raise ModelError(f"--model {root}: not a directory; pass a diffusers pipeline directory (save_pretrained output)")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"--model {root}: no model_index.json; pass a diffusers pipeline directory (as written by save_pretrained)"
        )
    content = read_json_object(index)
    if not isinstance(content.get("_class_name"), str):
        raise ModelError(f"{index}: no pipeline class name (_class_name, a string); {RESAVE}")
    return content


def fingerprint(root: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (relative path, sha256) pairs of every weight and config file."""
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in model_files(root)}
    combined = sha256_text("\n".join(f"{name}\t{digest}" for name, digest in sorted(files.items())))
    return combined, files


def weight_format(component_dir: Path, allow_pickle: bool) -> bool:
    """Return `use_safetensors` for a component; refuse pickle weights unless explicitly allowed.

    A suspect's model is untrusted input: unpickling can run arbitrary code.
    """
    if any(component_dir.glob("*.safetensors")):
        return True
    pickles = sorted(p for p in component_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise ModelError(f"{component_dir}: no weights (*.safetensors) found; re-save the pipeline with save_pretrained")
    if not allow_pickle:
        raise ModelError(
            f"{pickles[0]}: pickle weights can run code when loaded; convert them to safetensors "
            "or pass --allow-pickle if you trust this model"
        )
    return False


# -- config.json ------------------------------------------------------------------------------------


def _is_size(value: Any, depth: int = 0) -> bool:
    if isinstance(value, list) and depth < 2:
        return bool(value) and all(_is_size(item, depth + 1) for item in value)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_sample_size(path: Path, config: dict, limit: int, unit: str = "pixels") -> int:
    """A denoiser's (square) resolution from its config: a positive integer (or a list of two) <= limit."""
    size = config.get("sample_size")
    sides = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(isinstance(side, int) and not isinstance(side, bool) for side in sides):
        raise ModelError(f"{path}: sample_size {size!r} is not a positive integer; {RESAVE}")
    if not all(1 <= side <= limit for side in sides):
        raise ModelError(
            f"{path}: sample_size {size!r} is outside 1..{limit} {unit} (cdi audits images up to "
            f"{MAX_IMAGE_SIZE} pixels a side); fix sample_size or {RESAVE}"
        )
    return int(sides[0])


def read_config(folder: Path, max_sample_size: int | None = None, unit: str = "pixels") -> dict:
    """A component's config.json, checked: a JSON object whose size fields are positive integers and whose
    `sample_size` is at most `max_sample_size` (denoisers, where it is required) or `MAX_IMAGE_SIZE`."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing; the pipeline needs a config.json for '{folder.name}'; {RESAVE}")
    config = read_json_object(path)
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is not None and not _is_size(value):
            raise ModelError(f"{path}: {name} {value!r} is not a positive integer (or a list of them); {RESAVE}")
    for name in ("scaling_factor", "shift_factor"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not abs(value) < float("inf") or (name == "scaling_factor" and value <= 0)):
            raise ModelError(f"{path}: {name} {value!r} is not a {'positive ' if name == 'scaling_factor' else ''}"
                             f"finite number; {RESAVE}")
    if max_sample_size is not None:
        check_sample_size(path, config, max_sample_size, unit)
    elif config.get("sample_size") is not None:  # e.g. a VAE's tile size: optional, but not absurd either
        check_sample_size(path, config, MAX_IMAGE_SIZE)
    return config


# -- weights ----------------------------------------------------------------------------------------


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header. safe_open also checks that the header is valid and
    that the tensors it lists cover the file exactly, so a truncated or garbage file fails here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file is damaged either way
        raise ModelError(
            f"{path}: not a readable safetensors file ({first_line(exc)}); it is truncated or damaged: "
            "copy or download it again, or re-save the pipeline"
        ) from exc


def read_safetensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) over every safetensors file of a component, after checking each
    index (`*.safetensors.index.json`): every shard it names is beside it and holds the tensors it lists."""
    shapes = {path.name: _header_shapes(path) for path in sorted(folder.glob("*.safetensors"))}
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index}: no weight_map from tensor names to shard files; {RESAVE}")
        by_shard: dict[str, set[str]] = defaultdict(set)
        for key, shard in weight_map.items():
            by_shard[shard].add(key)
        for shard, keys in sorted(by_shard.items()):
            if shard not in shapes:
                raise ModelError(f"{index}: shard {shard!r} is missing beside it; the checkpoint is incomplete: "
                                 "copy every shard, or re-save the pipeline")
            lacking = keys - shapes[shard].keys()
            if lacking:
                raise ModelError(f"{folder / shard}: lacks {len(lacking)} tensor(s) its index {index.name} puts "
                                 f"there ({_few(lacking)}); copy the shard again or re-save the pipeline")
    return {key: (folder / name, shape) for name, tensors in shapes.items() for key, shape in tensors.items()}


def weights_file(folder: Path, use_safetensors: bool) -> Path:
    """The file a component's weights are read from (an index for a sharded checkpoint), for messages."""
    suffix = ".safetensors" if use_safetensors else ".bin"
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for name in (f"{stem}{suffix}", f"{stem}{suffix}.index.json"):
            if (folder / name).is_file():
                return folder / name
    return folder


@contextlib.contextmanager
def _libraries_quiet():
    """diffusers' and transformers' own load reports and progress bars off: cdi reports what matters itself."""
    # Only libraries already imported can be loading; importing transformers for a pixel model costs seconds.
    modules = [sys.modules[name] for name in ("diffusers.utils.logging", "transformers.utils.logging")
               if name in sys.modules]
    saved = [(module, module.get_verbosity(), module.is_progress_bar_enabled()) for module in modules]
    for module in modules:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, verbosity, bar in saved:
            module.set_verbosity(verbosity)
            if bar:
                module.enable_progress_bar()


def _is_transformers_model(cls: type) -> bool:
    return getattr(cls, "config_class", None) is not None and hasattr(cls, "_from_config")


def _build_on_meta(cls: type, config: dict, path: Path) -> torch.nn.Module:
    """The component's skeleton on the meta device: checks the config fits, allocates nothing."""
    try:
        with _libraries_quiet(), torch.device("meta"):
            if _is_transformers_model(cls):
                return cls(cls.config_class.from_dict(config))
            return cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config can make the library's constructor raise anything
        raise ModelError(f"{path}: does not describe a valid {cls.__name__} ({first_line(exc)}); {RESAVE}") from exc


def _check_shapes(expected: dict[str, tuple[int, ...]], provided: dict[str, tuple[Path, tuple[int, ...]]],
                  cls: type) -> None:
    """Tensors of the files that the model has under the same name must have the model's shape."""
    for key, shape in expected.items():
        if key in provided and provided[key][1] != shape:
            path, found = provided[key]
            raise ModelError(f"{path}: tensor {key} has shape {list(found)} but the {cls.__name__} of "
                             f"{path.parent / 'config.json'} needs {list(shape)}; the weights and config.json do not "
                             "belong together: re-save the pipeline")


def _check_loading_info(model: torch.nn.Module, info: dict, weights: Path, cls: type) -> None:
    missing = set(info.get("missing_keys") or ())
    mismatched = {item[0] if isinstance(item, (tuple, list)) else str(item) for item in info.get("mismatched_keys") or ()}
    # A library may leave a tensor it did not load on the meta device without listing it: caught here too.
    missing |= {name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                if tensor.is_meta}
    if missing:
        total = len(model.state_dict())
        raise ModelError(
            f"{weights}: lacks {len(missing)} of the {total} tensors {cls.__name__} needs ({_few(missing)}); "
            "missing weights would be filled with random values: use the complete checkpoint or re-save the pipeline"
        )
    if mismatched:
        raise ModelError(f"{weights}: {len(mismatched)} tensor(s) have another shape than config.json implies "
                         f"({_few(mismatched)}); the weights and config.json do not belong together: re-save the pipeline")
    if info.get("error_msgs"):
        raise ModelError(f"{weights}: cannot be loaded as {cls.__name__} ({first_line(info['error_msgs'][0])}); {RESAVE}")
    unexpected = set(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s: %d tensor(s) that %s does not use are ignored (%s)", weights, len(unexpected),
                    cls.__name__, _few(unexpected))


def load_component(
    root: Path, subfolder: str, cls: type, allow_pickle: bool, max_sample_size: int | None = None,
    unit: str = "pixels",
) -> Any:
    """One frozen, float32, eval-mode component of the pipeline at `root`, from local files only, refused
    (ModelError naming the file) unless its config is sound and its files provide every weight it has.

    `max_sample_size`: denoisers only, the largest `sample_size` accepted (in `unit`)."""
    folder = root / subfolder
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder}: missing {subfolder}/config.json; the pipeline needs a {cls.__name__} component '{subfolder}'"
        )
    config = read_config(folder, max_sample_size, unit)
    use_safetensors = weight_format(folder, allow_pickle)
    provided = read_safetensors(folder) if use_safetensors else {}
    skeleton = _build_on_meta(cls, config, folder / "config.json")
    expected = {key: tuple(tensor.shape) for key, tensor in skeleton.state_dict().items()}
    numbers = sum(int(torch.Size(shape).numel()) for shape in expected.values())
    if numbers > MAX_PARAMETERS:
        raise ModelError(f"{folder / 'config.json'}: describes {cls.__name__} with {numbers:.3g} parameters, more "
                         f"than the {MAX_PARAMETERS:.0e} cdi loads; fix the config or {RESAVE}")
    del skeleton
    _check_shapes(expected, provided, cls)
    weights = weights_file(folder, use_safetensors)
    kwargs: dict[str, Any] = {"use_safetensors": use_safetensors, "local_files_only": True, "output_loading_info": True}
    if _is_transformers_model(cls):
        kwargs["ignore_mismatched_sizes"] = True  # reported in the loading info, refused below
    try:
        with _libraries_quiet():
            model, info = cls.from_pretrained(root, subfolder=subfolder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - damaged files make the loaders raise many kinds
        raise ModelError(f"{folder}: cannot load it as {cls.__name__} ({first_line(exc)}); {RESAVE}") from exc
    _check_loading_info(model, dict(info), weights, cls)
    # Half-precision checkpoints are widened: autocast decides the compute precision, not the file.
    if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
        model = model.to(torch.float32)
    return model.eval().requires_grad_(False)
