"""Image sets: discovery, decoding, conversion to the model's channels and resolution, hashing.

Conversion (documented for users): EXIF orientation is applied; the image is converted to the
model's channels (RGB or grayscale; alpha is composited onto white, palette and CMYK images are
converted, 16-bit images are rescaled to 8 bits); the shorter side is resized to the model's
resolution (bicubic, antialiased) and the centre square is cropped; pixels map to [-1, 1].
Images of any size are accepted (smaller ones are upscaled); the shift guard records whether
the original sizes differ between the suspect and control sets.

Discovery: every file below the folder whose suffix is in IMAGE_SUFFIXES (any case) is an image;
other files (metadata.jsonl, notes, unsupported formats) are ignored. An image file that cannot be
decoded (truncated, empty, not an image) is an error that names the file, and so is one refused from
its header, before any pixel is decoded: more pixels than Pillow's decompression-bomb limit
(Image.MAX_IMAGE_PIXELS), an aspect ratio over MAX_ASPECT_RATIO, or a resized copy (shorter side at
the model's resolution) over MAX_RESIZED_PIXELS.

Duplicates (cdi.data.duplicates): a picture may count once per audit; copies are refused or, with
`duplicates="keep-one"`, dropped, and a picture in both sets is always refused.

File names need not be UTF-8 (Linux allows any bytes; Python keeps the others as surrogate escapes);
`printable_path` is the UTF-8-safe form for messages, tables and JSON.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from cdi.data.duplicates import Fingerprint, find_duplicate_groups, fingerprint, is_exact_group
from cdi.errors import ImageSetError, OptionError
from cdi.hashing import sha256_file
from cdi.text import printable_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Below this many images per side the cross-fitted scorer (5 folds) has too few points per fold
#: to fit 26 coefficients and the t-test has almost no power.
MIN_SET_SIZE = 10
METADATA_FILE = "metadata.jsonl"
#: Longer side over shorter side. Beyond this, resizing the shorter side to the model's resolution makes a
#: strip of absurd length (a 1 x 5,000,000 PNG would become 64 x 320,000,000 pixels at 64 px).
MAX_ASPECT_RATIO = 20
#: Pixels of the resized copy (shorter side at the model's resolution) before the centre crop: 2**25 (about
#: 100 MB as RGB). At 1024 px and the 20:1 aspect limit a resized copy has 21 M pixels.
MAX_RESIZED_PIXELS = 2**25
#: What `build_image_sets` does with copies of one picture within a set ("refuse" or "keep-one").
DUPLICATE_POLICIES = ("refuse", "keep-one")


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

    @property
    def printable_path(self) -> str:
        """The path as valid UTF-8 text (see `printable_path`)."""
        return printable_path(self.path)


def _read_metadata(folder: Path) -> dict[str, dict]:
    """Per-image labels/captions in the Hugging Face imagefolder convention (metadata.jsonl)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    shown = printable_path(path)
    entries: dict[str, dict] = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ImageSetError(
                f"{shown}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save it as UTF-8"
            ) from exc
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImageSetError(f"{shown}:{number}: not a JSON object with a file_name ({exc}); fix that line") from exc
        if not isinstance(entry, dict) or "file_name" not in entry:
            found = "no file_name" if isinstance(entry, dict) else _json_kind(entry)
            raise ImageSetError(f"{shown}:{number}: not a JSON object with a file_name ({found}); fix that line")
        file_name, label, text = entry["file_name"], entry.get("label"), entry.get("text")
        problem = None
        if not isinstance(file_name, str):
            problem = f'"file_name" is {_json_kind(file_name)}; give the path relative to the folder as a string'
        elif label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            problem = f'"label" is {_json_kind(label)}; give a class id (an integer) or a class name (a string)'
        elif text is not None and not isinstance(text, str):
            problem = f'"text" is {_json_kind(text)}; give the caption as a string'
        if problem:
            raise ImageSetError(f"{shown}:{number}: {problem}")
        entries[file_name] = entry
    return entries


def _json_kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), "null" if value is None else type(value).__name__)


def discover_images(folder: str | Path, role: str, option: str | None = None) -> list[ImageRecord]:
    """All images below `folder` (recursive, sorted by relative path) with their sha256."""
    option = option or f"--{role}"
    root = Path(folder)
    if not root.is_dir():
        raise ImageSetError(f"{option} {printable_path(root)}: not a directory; pass a folder of images")
    metadata = _read_metadata(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageSetError(
            f"{option} {printable_path(root)}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} recursively); "
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


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The shorter side scaled to `size` (never below it), before the centre crop."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _check_dimensions(width: int, height: int, size: int | None) -> None:
    """Refuse, from the header alone, a picture whose decoding or resizing would be absurd (ValueError)."""
    if min(width, height) < 1:
        raise ValueError(f"{width} x {height} pixels; re-export it")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise ValueError(
            f"{width} x {height} pixels, aspect ratio {ratio:.0f}:1 over the limit of {MAX_ASPECT_RATIO}:1; "
            "crop it to the picture"
        )
    if size is not None:
        resized = _resized_size(width, height, size)
        if resized[0] * resized[1] > MAX_RESIZED_PIXELS:
            raise ValueError(
                f"{width} x {height} pixels, {resized[0]} x {resized[1]} once resized to the model's {size} px "
                f"(limit {MAX_RESIZED_PIXELS} pixels); crop it to a less elongated picture"
            )


def decode_image(path: str | Path, channels: int, size: int | None = None) -> Image.Image:
    """Decode one file (EXIF orientation applied) and convert it to RGB (3) or grayscale (1).

    Before decoding pixels, refuses (ValueError) a picture over Pillow's pixel limit or the aspect limit, and,
    when the model's resolution `size` is given, one whose resized copy would exceed MAX_RESIZED_PIXELS.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise ValueError(
                f"{found.group(1) + ' pixels' if found else 'too many pixels'}, over Pillow's decompression bomb limit "
                f"of {Image.MAX_IMAGE_PIXELS} pixels (Image.MAX_IMAGE_PIXELS); downscale it"
            ) from exc
        with opened as raw:
            _check_dimensions(*raw.size, size)
            raw.load()
            image = ImageOps.exif_transpose(raw)
    return _to_mode(image, channels)


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Shorter side to `size` (bicubic, antialiased), centre square, (channels, size, size) in [-1, 1]."""
    if image.size != (size, size):
        resized = _resized_size(*image.size, size)
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
        left = (resized[0] - size) // 2
        top = (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """Decode one image to a (channels, size, size) float32 tensor in [-1, 1]."""
    return _to_tensor(decode_image(path, channels, size), size)


def check_decodable(records: Sequence[ImageRecord], size: int, channels: int) -> list[Fingerprint]:
    """Decode and resize every image once; report all unreadable files together in one error.

    Returns each image's duplicate-detection fingerprint (aligned with `records`), taken from the same decode.
    """
    failures = []
    fingerprints = []
    for record in records:
        try:
            image = decode_image(record.path, channels, size)
            _to_tensor(image, size)
            fingerprints.append(fingerprint(image))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            reason = type(exc).__name__ if not str(exc) else printable_path(str(exc).splitlines()[0])
            failures.append(f"{record.printable_path} ({reason})")
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        raise ImageSetError(f"{len(failures)} unreadable image(s): {shown}; remove or re-export them")
    return fingerprints


def _describe(group: Sequence[ImageRecord]) -> str:
    shown = " = ".join(record.printable_path for record in group[:3])
    more = f" and {len(group) - 3} more" if len(group) > 3 else ""
    return f"{shown}{more} ({'exact copies' if is_exact_group(group) else 'near duplicate'})"


def _check_set_size(option: str, folder: str | Path, records: Sequence[ImageRecord], min_size: int,
                    dropped: int = 0) -> None:
    if len(records) < min_size:
        counted = f"{len(records)} image(s)" + (f" once {dropped} duplicate copies are dropped" if dropped else "")
        raise ImageSetError(
            f"{option} {printable_path(folder)}: {counted}, at least {min_size} are needed "
            "(the scorer is cross-fitted over 5 folds and the test needs several images per fold); add images"
        )


def build_image_sets(
    suspect: str | Path,
    control: str | Path,
    size: int,
    channels: int,
    min_size: int = MIN_SET_SIZE,
    duplicates: str = "refuse",
    dropped: list[ImageRecord] | None = None,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Discover, hash and validate the suspect (P) and control (U) sets.

    Each picture may count once (cdi.data.duplicates): copies within a set are refused (`duplicates="refuse"`)
    or all but the first by path are dropped (`"keep-one"`, appended to `dropped` when given); a picture in
    both sets is always refused. The minimum set size counts the pictures that remain.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise OptionError(f"--duplicates {duplicates!r}: not a policy; use one of {', '.join(DUPLICATE_POLICIES)}")
    suspect_records = discover_images(suspect, "suspect")
    control_records = discover_images(control, "control")
    options = {"suspect": ("--suspect", suspect), "control": ("--control", control)}
    for role, records in (("suspect", suspect_records), ("control", control_records)):
        _check_set_size(*options[role], records, min_size)
    control_by_hash = {record.sha256: record for record in control_records}
    shared = [(record, control_by_hash[record.sha256]) for record in suspect_records if record.sha256 in control_by_hash]
    if shared:
        first, other = shared[0]
        raise ImageSetError(
            f"{len(shared)} image(s) are in both sets, e.g. {first.printable_path} = {other.printable_path}; "
            "an image cannot be both suspect and control: remove it from one folder"
        )
    records = [*suspect_records, *control_records]
    groups = find_duplicate_groups(records, check_decodable(records, size, channels))
    across = [group for group in groups if len({record.role for record in group}) == 2]
    if across:
        first = next(record for record in across[0] if record.role == "suspect")
        other = next(record for record in across[0] if record.role == "control")
        raise ImageSetError(
            f"{len(across)} picture(s) are in both sets as near duplicates (the same picture re-encoded, resized or "
            f"edited), e.g. {first.printable_path} = {other.printable_path}; a picture cannot be both suspect and "
            "control: remove it from one folder"
        )
    if groups and duplicates == "refuse":
        raise ImageSetError(
            f"{len(groups)} group(s) of duplicate images (the same picture more than once), e.g. "
            f"{_describe(groups[0])}; each picture may count once: remove the copies, or pass --duplicates keep-one"
        )
    copies = {record.path for group in groups for record in group[1:]}
    result = {}
    for role, records in (("suspect", suspect_records), ("control", control_records)):
        kept = [record for record in records if record.path not in copies]
        removed = [record for record in records if record.path in copies]
        if removed:
            log.warning("%s: %d copies of %d picture(s) dropped (--duplicates keep-one), e.g. %s",
                        options[role][0], len(removed), sum(group[0].role == role for group in groups),
                        removed[0].printable_path)
            if dropped is not None:
                dropped.extend(removed)
        _check_set_size(*options[role], kept, min_size, dropped=len(removed))
        result[role] = kept
    return result["suspect"], result["control"]


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
            "image": load_image(record.path, self.size, self.channels),
            "sha256": record.sha256,
            "label": -1 if record.label is None else record.label,
            "caption": record.caption or "",
        }
