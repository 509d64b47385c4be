"""Image sets: discovery, decoding, conversion to the model's channels and resolution, hashing.

Conversion (documented for users): EXIF orientation is applied; the image is converted to the
model's channels (RGB or grayscale; alpha is composited onto white, palette and CMYK images are
converted, 16-bit images are rescaled to 8 bits); the shorter side is resized to the model's
resolution (bicubic, antialiased) and the centre square is cropped; pixels map to [-1, 1].
Images of any size are accepted (smaller ones are upscaled); the shift guard records whether
the original sizes differ between the suspect and control sets.

Discovery: every file below the folder whose suffix is in IMAGE_SUFFIXES (any case) is an image;
other files (metadata.jsonl, notes, unsupported formats) are ignored. An image file that cannot be
decoded (truncated, empty, not an image, over Pillow's decompression-bomb pixel limit) is an error
that names the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from cdi.errors import ImageSetError
from cdi.hashing import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Below this many images per side the cross-fitted scorer (5 folds) has too few points per fold
#: to fit 26 coefficients and the t-test has almost no power.
MIN_SET_SIZE = 10
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class ImageRecord:
    """One image of an audit: where it is, what it is (sha256 of its bytes), which set it is in."""

    path: Path
    sha256: str
    role: str  # "suspect" or "control"
    label: int | str | None = None  # a class id, or a class name the model's id2label resolves
    caption: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _read_metadata(folder: Path) -> dict[str, dict]:
    """Per-image labels/captions in the Hugging Face imagefolder convention (metadata.jsonl)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    entries: dict[str, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[str(entry["file_name"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ImageSetError(f"{path}:{number}: not a JSON object with a file_name ({exc}); fix that line") from exc
    return entries


def discover_images(folder: str | Path, role: str, option: str | None = None) -> list[ImageRecord]:
    """All images below `folder` (recursive, sorted by relative path) with their sha256."""
    option = option or f"--{role}"
    root = Path(folder)
    if not root.is_dir():
        raise ImageSetError(f"{option} {root}: not a directory; pass a folder of images")
    metadata = _read_metadata(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageSetError(
            f"{option} {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} recursively); "
            "point it at the folder that holds the images"
        )
    records = []
    for path in paths:
        entry = metadata.get(path.relative_to(root).as_posix(), {})
        label = entry.get("label")
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        records.append(
            ImageRecord(
                path=path,
                sha256=sha256_file(path),
                role=role,
                label=label,
                caption=entry.get("text"),
            )
        )
    return records


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        # I;16 declares 16 bits (a dark 16-bit image stays dark); "I" does not say: guess from the values.
        peak = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB" if channels == 3 else "L")


def decode_image(path: str | Path, channels: int) -> Image.Image:
    """Decode one file (EXIF orientation applied) and convert it to RGB (3) or grayscale (1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
    return _to_mode(image, channels)


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Decode one image to a (channels, size, size) float32 tensor in [-1, 1]."""
    image = decode_image(path, channels)
    width, height = image.size
    scale = size / min(width, height)
    if (width, height) != (size, size):
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
        left = (resized[0] - size) // 2
        top = (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def check_decodable(records: Sequence[ImageRecord], size: int, channels: int) -> None:
    """Decode every image once; report all unreadable files together in one error."""
    failures = []
    for record in records:
        try:
            load_image(record.path, size, channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            reason = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0]
            failures.append(f"{record.path} ({reason})")
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        raise ImageSetError(f"{len(failures)} unreadable image(s): {shown}; remove or re-export them")


def build_image_sets(
    suspect: str | Path,
    control: str | Path,
    size: int,
    channels: int,
    min_size: int = MIN_SET_SIZE,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Discover, hash and validate the suspect (P) and control (U) sets."""
    suspect_records = discover_images(suspect, "suspect")
    control_records = discover_images(control, "control")
    for option, folder, records in (("--suspect", suspect, suspect_records), ("--control", control, control_records)):
        if len(records) < min_size:
            raise ImageSetError(
                f"{option} {folder}: {len(records)} image(s), at least {min_size} are needed "
                "(the scorer is cross-fitted over 5 folds and the test needs several images per fold); add images"
            )
    control_by_hash = {record.sha256: record for record in control_records}
    shared = [(record, control_by_hash[record.sha256]) for record in suspect_records if record.sha256 in control_by_hash]
    if shared:
        first, other = shared[0]
        raise ImageSetError(
            f"{len(shared)} image(s) are in both sets, e.g. {first.path} = {other.path}; "
            "an image cannot be both suspect and control: remove it from one folder"
        )
    check_decodable([*suspect_records, *control_records], size, channels)
    return suspect_records, control_records


class ImageDataset(torch.utils.data.Dataset):
    """Images decoded lazily; each item carries its index so results can be merged by key."""

    def __init__(self, records: Sequence[ImageRecord], size: int, channels: int) -> None:
        self.records = list(records)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "index": index,
            "image": load_image(record.path, self.size, self.channels),
            "sha256": record.sha256,
            "label": -1 if record.label is None else record.label,
            "caption": record.caption or "",
        }
