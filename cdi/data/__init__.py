"""Image sets: discovery, decoding, resizing, hashing, labels and captions."""

from __future__ import annotations

from cdi.data.images import (
    IMAGE_SUFFIXES,
    MIN_SET_SIZE,
    ImageDataset,
    ImageRecord,
    build_image_sets,
    check_decodable,
    decode_image,
    discover_images,
    load_image,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SET_SIZE",
    "ImageDataset",
    "ImageRecord",
    "build_image_sets",
    "check_decodable",
    "decode_image",
    "discover_images",
    "load_image",
]
