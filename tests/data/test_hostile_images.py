"""Inputs that used to crash or lose work: absurd image sizes, metadata that is not UTF-8 or has wrong
types, file names that are not UTF-8. Each is refused on one line naming the file, or simply works."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdi.data import (
    MAX_ASPECT_RATIO,
    build_image_sets,
    check_decodable,
    discover_images,
    find_duplicate_groups,
    load_image,
    printable_path,
)
from cdi.errors import ImageSetError

from builders import png_header_only, write_images


@pytest.fixture
def sets(tmp_path) -> tuple[Path, Path]:
    return write_images(tmp_path / "p", 12, seed=1, prefix="p"), write_images(tmp_path / "u", 12, seed=2, prefix="u")


# -- absurd sizes ----------------------------------------------------------------------------------------


def test_a_one_by_five_million_png_is_refused_not_a_memory_error(sets):
    suspect, control = sets
    Image.new("L", (1, 5_000_000), 128).save(suspect / "line.png")  # a real, decodable PNG
    with pytest.raises(ImageSetError) as info:
        build_image_sets(suspect, control, 8, 3)
    message = str(info.value)
    assert message.startswith("1 unreadable image(s): ")
    assert f"{suspect / 'line.png'} (1 x 5000000 pixels, aspect ratio 5000000:1 over the limit of 20:1" in message
    assert "crop it" in message and "\n" not in message


def test_the_aspect_limit_is_refused_from_the_header_alone(tmp_path):
    png_header_only(tmp_path / "strip.png", 30_000, 10)
    with pytest.raises(ValueError, match="30000 x 10 pixels, aspect ratio 3000:1"):
        load_image(tmp_path / "strip.png", 8, 3)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((10, 10 * MAX_ASPECT_RATIO, 3), dtype=np.uint8)).save(wide)  # at the limit: accepted
    assert load_image(wide, 8, 3).shape == (3, 8, 8)


def test_a_resized_copy_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    strip = png_header_only(tmp_path / "strip.png", 100, 2000)  # 20:1, allowed; at 2048 px it would be 2048 x 40960
    with pytest.raises(ValueError, match=r"100 x 2000 pixels, 2048 x 40960 once resized to the model's 2048 px"):
        load_image(strip, 2048, 3)
    with pytest.raises(OSError):  # at 8 px the header passes: decoding finds no pixels
        load_image(strip, 8, 3)


def test_over_the_pixel_limit_is_named_with_the_fix(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageSetError) as info:
        check_decodable(discover_images(tmp_path, "suspect"), 8, 3)
    assert (f"{tmp_path / 'big.png'} (1600 pixels, over Pillow's decompression bomb limit of 1000 pixels "
            "(Image.MAX_IMAGE_PIXELS); downscale it)") in str(info.value)


def test_all_bad_files_are_listed_in_one_error(sets):
    suspect, control = sets
    png_header_only(suspect / "strip.png", 5_000_000, 1)
    png_header_only(control / "bomb.png", 30_000, 30_000)
    (control / "cut.png").write_bytes((control / "u_000.png").read_bytes()[:40])
    with pytest.raises(ImageSetError) as info:
        build_image_sets(suspect, control, 8, 3)
    message = str(info.value)
    assert message.startswith("3 unreadable image(s): ")
    for name, reason in (("strip.png", "aspect ratio"), ("bomb.png", "decompression bomb"), ("cut.png", "")):
        assert name in message and reason in message


# -- metadata.jsonl --------------------------------------------------------------------------------------


def metadata(folder: Path, data: bytes) -> Path:
    write_images(folder, 2, prefix="x")
    (folder / "metadata.jsonl").write_bytes(data)
    return folder / "metadata.jsonl"


def test_latin1_metadata_names_the_line_and_says_save_as_utf8(tmp_path):
    second = '{"file_name": "x_001.png", "text": "caf\u00e9"}'.encode("latin-1")
    path = metadata(tmp_path, b'{"file_name": "x_000.png", "text": "a cat"}\n' + second + b"\n")
    with pytest.raises(ImageSetError) as info:
        discover_images(tmp_path, "suspect")
    column = second.index(b"\xe9") + 1
    assert str(info.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column {column}); save it as UTF-8"


@pytest.mark.parametrize("line, problem", [
    ({"file_name": "x_000.png", "label": [1, 2]}, '"label" is a list; give a class id (an integer) or a class name'),
    ({"file_name": "x_000.png", "label": {"id": 1}}, '"label" is an object; give a class id'),
    ({"file_name": "x_000.png", "label": True}, '"label" is a boolean'),
    ({"file_name": "x_000.png", "label": 1.5}, '"label" is a number'),
    ({"file_name": "x_000.png", "text": 3}, '"text" is a number; give the caption as a string'),
    ({"file_name": "x_000.png", "text": ["a", "cat"]}, '"text" is a list'),
    ({"file_name": 7}, '"file_name" is a number'),
    ([1, 2, 3], "not a JSON object with a file_name (a list)"),
    ({"label": 1}, "not a JSON object with a file_name (no file_name)"),
])
def test_metadata_of_the_wrong_type_names_file_and_line(line, problem, tmp_path):
    path = metadata(tmp_path, b'{"file_name": "x_001.png", "label": 2}\n' + json.dumps(line).encode() + b"\n")
    with pytest.raises(ImageSetError) as info:
        discover_images(tmp_path, "suspect")
    assert str(info.value).startswith(f"{path}:2: {problem}")
    assert "\n" not in str(info.value)


def test_metadata_with_a_bom_crlf_and_unicode_line_separators_in_captions_is_read(tmp_path):
    metadata(tmp_path, "\ufeff".encode() + b'{"file_name": "x_000.png", "label": "3"}\r\n'
             + '{"file_name": "x_001.png", "text": "caf\u00e9\u2028au lait"}\n'.encode())
    first, second = discover_images(tmp_path, "suspect")
    assert first.label == 3 and second.caption == "caf\u00e9\u2028au lait"


# -- file names that are not UTF-8 ----------------------------------------------------------------------


@pytest.fixture
def non_utf8_name(tmp_path) -> Path:
    name = os.fsdecode(b"caf\xe9_\xff.png")  # Latin-1 bytes: a str with surrogate escapes
    path = tmp_path / "p" / name
    path.parent.mkdir()
    try:
        Image.fromarray(np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


def test_printable_path_escapes_bytes_that_are_not_utf8(non_utf8_name):
    shown = printable_path(non_utf8_name)
    assert shown.endswith("caf\\xe9_\\xff.png")
    shown.encode("utf-8")  # writable to a UTF-8 table or JSON
    assert printable_path("plain/caf\u00e9.png") == "plain/caf\u00e9.png"  # valid UTF-8 is left alone
    assert printable_path(b"caf\xe9.png") == "caf\\xe9.png"


def test_discovery_hashing_and_loading_work_on_such_a_name(non_utf8_name):
    records = discover_images(non_utf8_name.parent, "suspect")
    assert [r.path for r in records] == [non_utf8_name]
    assert records[0].sha256 == hashlib.sha256(open(os.fsencode(non_utf8_name), "rb").read()).hexdigest()
    assert load_image(non_utf8_name, 8, 3).shape == (3, 8, 8)
    assert len(check_decodable(records, 8, 3)) == 1
    assert find_duplicate_groups(records) == []
    assert records[0].printable_path.endswith("caf\\xe9_\\xff.png")
    json.dumps({"file": records[0].printable_path}).encode("utf-8")


def test_messages_about_such_a_name_are_utf8(non_utf8_name):
    non_utf8_name.write_bytes(b"not an image")
    with pytest.raises(ImageSetError) as info:
        check_decodable(discover_images(non_utf8_name.parent, "suspect"), 8, 3)
    message = str(info.value)
    message.encode("utf-8")
    assert "caf\\xe9_\\xff.png (" in message
