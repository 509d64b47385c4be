"""Duplicate pictures: copies are found (exact and near), refused or dropped, and distinct pictures are left alone."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from cdi.data import (
    ImageRecord,
    build_image_sets,
    check_decodable,
    discover_images,
    find_duplicate_groups,
)
from cdi.errors import ImageSetError, OptionError

DEMO = Path(__file__).resolve().parents[2] / "demo"


def scene(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    """A photo-like RGB picture: 1/f^1.5 noise (the spectrum of natural images), one shared field per channel."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** -1.5

    def field() -> np.ndarray:
        spectrum = (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)) * amplitude
        x = np.fft.irfft2(spectrum, s=(height, width))
        return (x - x.mean()) / x.std()

    shared = field()
    rgb = np.stack([shared + 0.5 * field() for _ in range(3)], axis=-1)
    return Image.fromarray(np.clip(128 + 40 * rgb, 0, 255).astype(np.uint8))


def reencoded(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def noisy(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def cropped(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    return image.crop((left, top, image.width - right, image.height - bottom))


#: The edits an owner's folder picks up: re-exports, format changes, resizes, light edits.
NEAR_COPIES = {
    "jpeg-q50": lambda im: reencoded(im, "JPEG", quality=50),
    "webp-q50": lambda im: reencoded(im, "WEBP", quality=50),
    "png-jpeg-webp": lambda im: reencoded(reencoded(im, "JPEG", quality=80), "WEBP", quality=80),
    "half-size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "half-size-jpeg-q50": lambda im: reencoded(im.resize((im.width // 2, im.height // 2)), "JPEG", quality=50),
    "double-size": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "darker": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
    "less-contrast": lambda im: ImageEnhance.Contrast(im).enhance(0.85),
    "more-contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.15),
    "border-trimmed": lambda im: cropped(im, 2, 2, 2, 2),
    "corner-cropped": lambda im: cropped(im, 3, 3, 0, 0),
    "noise": lambda im: noisy(im, 5.0),
}


def save_all(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name, quality=95) if name.endswith((".jpg", ".webp")) else image.save(folder / name)
    return folder


def scenes(folder: Path, seeds, prefix: str) -> Path:
    return save_all(folder, {f"{prefix}_{seed:03d}.png": scene(seed) for seed in seeds})


@pytest.mark.parametrize("edit", sorted(NEAR_COPIES))
def test_a_near_copy_is_one_picture_with_its_original(edit, tmp_path):
    original = scene(7)
    folder = save_all(tmp_path / "p", {"a.png": original, f"a_{edit}.png": NEAR_COPIES[edit](original),
                                       "other.png": scene(8)})
    records = discover_images(folder, "suspect")
    groups = find_duplicate_groups(records)
    assert [[r.name for r in group] for group in groups] == [["a.png", f"a_{edit}.png"]]


def test_tiny_images_copies_are_found_too(tmp_path):
    # The demo's 16 px digits and 8 px noise: lossless re-encodes, quality-90 JPEG, upscales, brightness, noise.
    digit = Image.open(DEMO / "members" / "digit_0002.png").convert("L")
    speckle = Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    folder = save_all(tmp_path / "p", {
        "digit.png": digit, "digit.webp": reencoded(digit, "WEBP", lossless=True).convert("L"),
        "digit_q50.jpg": reencoded(digit, "JPEG", quality=50), "digit_2x.png": digit.resize((32, 32)),
        "digit_bright.png": ImageEnhance.Brightness(digit).enhance(1.1), "digit_noise.png": noisy(digit, 5.0),
        "speckle.png": speckle, "speckle_q90.jpg": reencoded(speckle, "JPEG", quality=90),
        "speckle_2x.png": speckle.resize((16, 16)),
    })
    groups = find_duplicate_groups(discover_images(folder, "suspect"))
    assert [len(group) for group in groups] == [6, 3]
    assert {r.name for r in groups[1]} == {"speckle.png", "speckle_q90.jpg", "speckle_2x.png"}


def test_exact_copies_are_grouped_by_their_bytes_without_decoding():
    records = [ImageRecord(Path(f"/nowhere/{name}"), sha, "suspect") for name, sha in
               [("b.png", "1" * 64), ("a.png", "1" * 64), ("c.png", "2" * 64), ("d.png", "1" * 64)]]
    flat = [check_fingerprint(seed) for seed in range(4)]
    groups = find_duplicate_groups(records, flat)
    assert [[r.name for r in group] for group in groups] == [["a.png", "b.png", "d.png"]]


def check_fingerprint(seed: int):
    from cdi.data import fingerprint

    return fingerprint(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)))


def test_check_decodable_returns_the_fingerprints_of_its_own_decode(tmp_path):
    original = scene(1)
    folder = save_all(tmp_path / "p", {"a.png": original, "a.jpg": reencoded(original, "JPEG", quality=60),
                                       "b.png": scene(2)})
    records = discover_images(folder, "suspect")
    fingerprints = check_decodable(records, 8, 3)
    assert len(fingerprints) == 3
    assert find_duplicate_groups(records, fingerprints) == find_duplicate_groups(records)


# -- distinct pictures stay distinct ------------------------------------------------------------------


def digit_drawing(digit: int, width: int, dx: int, dy: int, slant: int, size: int = 28) -> Image.Image:
    """A seven-segment digit drawn with lines: a small digit-like drawing."""
    segments = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
                8: "abcdefg", 9: "abcdfg"}
    left, right, top, middle, bottom = 8 + dx, 19 + dx, 4 + dy, 13 + dy, 22 + dy
    ends = {"a": ((left + slant, top), (right + slant, top)), "b": ((right + slant, top), (right, middle)),
            "c": ((right, middle), (right - slant, bottom)), "d": ((left - slant, bottom), (right - slant, bottom)),
            "e": ((left, middle), (left - slant, bottom)), "f": ((left + slant, top), (left, middle)),
            "g": ((left, middle), (right, middle))}
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for segment in segments[digit]:
        draw.line(ends[segment], fill=255, width=width)
    return image


def gradient(degrees: float, size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = np.cos(np.radians(degrees)) * x + np.sin(np.radians(degrees)) * y
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    return Image.fromarray((255 * ramp).round().astype(np.uint8))


def test_no_two_demo_images_are_flagged():
    records = [r for folder in ("members", "heldout", "heldout2") for r in discover_images(DEMO / folder, "suspect")]
    assert len(records) == 300
    assert find_duplicate_groups(records, channels=1) == []


def test_distinct_synthetic_pictures_are_not_flagged(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for i in range(150):
        images[f"noise8_{i:03d}.png"] = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        images[f"noise64_{i:03d}.png"] = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for degrees in range(0, 360, 15):
        images[f"gradient_{degrees:03d}.png"] = gradient(degrees)
    for digit in range(10):
        for k, (width, dx, dy, slant) in enumerate([(2, 0, 0, 0), (3, 2, 0, 0), (2, 0, 2, 0), (3, -2, 1, 0),
                                                    (2, 0, 0, 2), (2, 1, -1, 0)]):
            images[f"digit_{digit}_{k}.png"] = digit_drawing(digit, width, dx, dy, slant)
    for seed in range(40):
        images[f"scene_{seed:02d}.png"] = scene(seed)
    records = discover_images(save_all(tmp_path / "distinct", images), "suspect")
    groups = find_duplicate_groups(records)
    assert [[r.name for r in group] for group in groups] == []


# -- build_image_sets: refuse, keep one, never across ---------------------------------------------------


def owner_with_copies(root: Path, n_copied: int = 5, n_other: int = 10) -> tuple[Path, Path]:
    """An innocent owner's P: `n_copied` pictures each also saved under 4 other names (a copy, a JPEG
    re-export, a half-size web version, a trimmed edit), plus `n_other` single pictures; U: 12 pictures."""
    suspect = {}
    for seed in range(n_copied):
        image = scene(seed)
        suspect[f"img_{seed:02d}.png"] = image
        suspect[f"img_{seed:02d}_copy.png"] = image
        suspect[f"img_{seed:02d}_export.jpg"] = reencoded(image, "JPEG", quality=70)
        suspect[f"img_{seed:02d}_web.webp"] = image.resize((80, 60))
        suspect[f"img_{seed:02d}_trim.png"] = cropped(image, 2, 2, 2, 2)
    for seed in range(100, 100 + n_other):
        suspect[f"single_{seed}.png"] = scene(seed)
    return save_all(root / "p", suspect), scenes(root / "u", range(200, 212), "u")


def test_copies_within_a_set_are_refused_by_default_naming_the_first_group(tmp_path):
    suspect, control = owner_with_copies(tmp_path)
    with pytest.raises(ImageSetError) as info:
        build_image_sets(suspect, control, 8, 3)
    message = str(info.value)
    assert message.startswith("5 group(s) of duplicate images (the same picture more than once), e.g. ")
    assert f"{suspect / 'img_00.png'} = {suspect / 'img_00_copy.png'} = " in message
    assert "(near duplicate)" in message and "pass --duplicates keep-one" in message and "\n" not in message


def test_exact_copies_only_are_described_as_such(tmp_path):
    suspect = scenes(tmp_path / "p", range(12), "p")
    (suspect / "p_003_again.png").write_bytes((suspect / "p_003.png").read_bytes())
    control = scenes(tmp_path / "u", range(50, 62), "u")
    with pytest.raises(ImageSetError, match=r"^1 group\(s\) .*p_003.png = .*p_003_again.png \(exact copies\)"):
        build_image_sets(suspect, control, 8, 3)


def test_keep_one_keeps_the_first_path_of_each_picture_and_reports_the_rest(tmp_path, caplog):
    suspect, control = owner_with_copies(tmp_path)
    dropped: list[ImageRecord] = []
    with caplog.at_level(logging.WARNING, logger="cdi.data.images"):
        kept, kept_control = build_image_sets(suspect, control, 8, 3, duplicates="keep-one", dropped=dropped)
    assert [r.name for r in kept] == [f"img_{seed:02d}.png" for seed in range(5)] + [
        f"single_{seed}.png" for seed in range(100, 110)]
    assert len(kept_control) == 12
    assert sorted(r.name for r in dropped) == sorted(
        f"img_{seed:02d}_{kind}" for seed in range(5) for kind in ("copy.png", "export.jpg", "trim.png", "web.webp"))
    assert "20 copies of 5 picture(s) dropped" in caplog.text


def test_minimum_set_size_counts_distinct_pictures(tmp_path):
    suspect, control = owner_with_copies(tmp_path, n_copied=5, n_other=4)  # 25 files, 9 pictures
    with pytest.raises(ImageSetError, match=r"--suspect .*: 9 image\(s\) once 20 duplicate copies are dropped, "
                                            r"at least 10 are needed"):
        build_image_sets(suspect, control, 8, 3, duplicates="keep-one")


@pytest.mark.parametrize("policy", ["refuse", "keep-one"])
def test_a_near_copy_in_both_sets_is_always_refused(policy, tmp_path):
    suspect = scenes(tmp_path / "p", range(12), "p")
    control = scenes(tmp_path / "u", range(50, 62), "u")
    reencoded(scene(4), "JPEG", quality=60).save(control / "from_the_web.jpg")
    with pytest.raises(ImageSetError) as info:
        build_image_sets(suspect, control, 8, 3, duplicates=policy)
    message = str(info.value)
    assert message.startswith("1 picture(s) are in both sets as near duplicates")
    assert f"{suspect / 'p_004.png'} = {control / 'from_the_web.jpg'}" in message
    assert "remove it from one folder" in message


def test_an_unknown_policy_names_the_option():
    with pytest.raises(OptionError, match="--duplicates 'drop': .*refuse, keep-one"):
        build_image_sets("/nowhere/p", "/nowhere/u", 8, 3, duplicates="drop")


def test_sets_without_copies_are_unchanged(tmp_path):
    suspect, control = scenes(tmp_path / "p", range(12), "p"), scenes(tmp_path / "u", range(50, 62), "u")
    dropped: list[ImageRecord] = []
    for policy in ("refuse", "keep-one"):
        kept, kept_control = build_image_sets(suspect, control, 8, 3, duplicates=policy, dropped=dropped)
        assert kept == discover_images(suspect, "suspect") and kept_control == discover_images(control, "control")
    assert dropped == []
