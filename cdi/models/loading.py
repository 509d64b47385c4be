"""Reading a diffusers pipeline directory safely: model_index.json, fingerprint, weight format."""

from __future__ import annotations

import json
from pathlib import Path

from cdi.errors import ModelError
from cdi.hashing import sha256_file, sha256_text
from cdi.models.base import model_files

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


def read_model_index(root: Path) -> dict:
    if not root.is_dir():
        raise ModelError(f"--model {root}: not a directory; pass a diffusers pipeline directory (save_pretrained output)")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"--model {root}: no model_index.json; pass a diffusers pipeline directory (as written by save_pretrained)"
        )
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index}: unreadable model_index.json ({exc}); re-save the pipeline with save_pretrained") from exc


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
