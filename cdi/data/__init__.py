"""Image sets: discovery, decoding, resizing, hashing, duplicates, labels and captions."""

from __future__ import annotations

from cdi.data.duplicates import Fingerprint, find_duplicate_groups, fingerprint
from cdi.data.images import (
    DUPLICATE_POLICIES,
    IMAGE_SUFFIXES,
    MAX_ASPECT_RATIO,
    MAX_RESIZED_PIXELS,
    MIN_SET_SIZE,
    ImageDataset,
    ImageRecord,
    build_image_sets,
    check_decodable,
    decode_image,
    discover_images,
    load_image,
    printable_path,
)

__all__ = [
    "DUPLICATE_POLICIES",
    "IMAGE_SUFFIXES",
    "MAX_ASPECT_RATIO",
    "MAX_RESIZED_PIXELS",
    "MIN_SET_SIZE",
    "Fingerprint",
    "ImageDataset",
    "ImageRecord",
    "build_image_sets",
    "check_decodable",
    "decode_image",
    "discover_images",
    "find_duplicate_groups",
    "fingerprint",
    "load_image",
    "printable_path",
]
