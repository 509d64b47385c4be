"""Image sets: discovery, conversion, hashing and the errors a user can cause."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from cdi.data import build_image_sets, discover_images, load_image
from cdi.errors import ImageSetError

from builders import write_images


def test_discovery_is_recursive_sorted_and_hashes_file_bytes(tmp_path):
    write_images(tmp_path / "a", 2, prefix="x")
    write_images(tmp_path / "b" / "deep", 2, prefix="y")
    Image.new("RGB", (4, 4)).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    records = discover_images(tmp_path, "suspect")
    rel = [r.path.relative_to(tmp_path).as_posix() for r in records]
    assert rel == ["a/x_000.png", "a/x_001.png", "b/deep/y_000.png", "b/deep/y_001.png", "c.jpg"]
    assert records[0].sha256 == hashlib.sha256((tmp_path / "a/x_000.png").read_bytes()).hexdigest()


def test_resize_shorter_side_then_centre_crop(tmp_path):
    # 40x20 image: left half black, right half white, with a red column band in the centre.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 8, 3)
    assert x.shape == (3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    # shorter side 20 -> 8, width 40 -> 16, centre crop keeps columns 4..12 of 16: the white band
    assert float(x.mean()) > 0.9


def test_conversion_of_alpha_palette_16bit_and_grayscale(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("P", (8, 8)).save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    transparent = load_image(tmp_path / "transparent.png", 8, 3)
    assert transparent.min() == pytest.approx(1.0)  # composited onto white
    assert load_image(tmp_path / "palette.png", 8, 3).shape == (3, 8, 8)
    assert load_image(tmp_path / "deep.png", 8, 1).max() == pytest.approx(1.0)  # 16-bit white stays white
    assert load_image(tmp_path / "cmyk.jpg", 8, 1).shape == (1, 8, 8)



def test_16_bit_images_are_scaled_by_their_bit_depth_not_their_values(tmp_path):
    # 16-bit grey 100 of 65535 is near black; scaling by the brightest value (<= 255) would make it grey 100/255.
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode == "I;16"
    assert load_image(tmp_path / "dark16.png", 8, 1).max() == pytest.approx(-1.0)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "mid16.png")  # 128.0 of 255
    assert load_image(tmp_path / "mid16.png", 8, 3).mean() == pytest.approx(128 / 127.5 - 1, abs=1e-6)

def test_unreadable_files_are_reported_together(tmp_path):
    suspect = write_images(tmp_path / "p", 12, prefix="p")
    control = write_images(tmp_path / "u", 12, seed=9, prefix="u")
    (suspect / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (control / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageSetError) as info:
        build_image_sets(suspect, control, 8, 3)
    message = str(info.value)
    assert "2 unreadable" in message and "broken.png" in message and "empty.jpg" in message
    assert "\n" not in message


def test_same_image_in_both_sets_is_refused(tmp_path):
    suspect = write_images(tmp_path / "p", 12, prefix="p")
    control = write_images(tmp_path / "u", 12, seed=9, prefix="u")
    (control / "copy.png").write_bytes((suspect / "p_003.png").read_bytes())
    with pytest.raises(ImageSetError, match="both sets.*p_003.png"):
        build_image_sets(suspect, control, 8, 3)


def test_minimum_set_size_and_empty_or_missing_folders(tmp_path):
    suspect = write_images(tmp_path / "p", 9, prefix="p")
    control = write_images(tmp_path / "u", 12, seed=9, prefix="u")
    with pytest.raises(ImageSetError, match="--suspect .*9 image.*at least 10"):
        build_image_sets(suspect, control, 8, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="--control .*no images found"):
        build_image_sets(control, tmp_path / "empty", 8, 3)
    with pytest.raises(ImageSetError, match="not a directory"):
        build_image_sets(control, tmp_path / "missing", 8, 3)


def test_metadata_jsonl_gives_labels_and_captions(tmp_path):
    write_images(tmp_path, 2, prefix="x")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "x_000.png", "label": 3}\n{"file_name": "x_001.png", "text": "a cat"}\n'
    )
    first, second = discover_images(tmp_path, "suspect")
    assert first.label == 3 and first.caption is None
    assert second.label is None and second.caption == "a cat"
