from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionleaf.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels but that holds no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # red is transparent -> composited on white
    return img


# (mode, image, expected RGB at (0, 0), expected RGB at (1, 0))
CASES = [
    # opaque red stays red; the half-transparent black pixel turns mid-grey on white
    (
        "RGBA",
        Image.frombytes("RGBA", (2, 1), bytes([255, 0, 0, 255, 0, 0, 0, 128])),
        (255, 0, 0),
        (127, 127, 127),
    ),
    # fully transparent grey becomes pure white
    ("LA", Image.frombytes("LA", (2, 1), bytes([50, 0, 50, 255])), (255, 255, 255), (50, 50, 50)),
    # palette: index 1 is blue, the transparent index 0 becomes white
    ("P", _palette_with_transparency(), (0, 0, 255), (255, 255, 255)),
    # CMYK: full cyan is (0, 255, 255); zero ink is white
    (
        "CMYK",
        Image.frombytes("CMYK", (2, 1), bytes([255, 0, 0, 0, 0, 0, 0, 0])),
        (0, 255, 255),
        (255, 255, 255),
    ),
    # 16-bit: 65535 is white, 32896 is mid-grey (not clipped to 255 as a plain convert would)
    (
        "I;16",
        Image.fromarray(np.array([[65535, 32896]], dtype=np.uint16)),
        (255, 255, 255),
        (128, 128, 128),
    ),
    # 32-bit integer read as 16-bit range
    ("I", Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I"), (0, 0, 0), (255, 255, 255)),
    # float in [0, 1] is scaled by 255
    ("F", Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)), (128, 128, 128), (255, 255, 255)),
    # float beyond 1 is read as 0..255 and clipped; NaN becomes 0 -> row is checked at (0, 0) only
    ("F", Image.fromarray(np.array([[300.0, 7.0]], dtype=np.float32)), (255, 255, 255), (7, 7, 7)),
    ("L", Image.frombytes("L", (2, 1), bytes([0, 200])), (0, 0, 0), (200, 200, 200)),
    ("1", Image.frombytes("1", (2, 1), bytes([0b01000000])), (0, 0, 0), (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "img", "first", "second"), CASES)
def test_to_rgb_converts_modes(mode: str, img: Image.Image, first: tuple, second: tuple) -> None:
    assert img.mode == mode
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert rgb.size == img.size
    assert rgb.getpixel((0, 0)) == pytest.approx(first, abs=1)
    if img.width > 1:
        assert rgb.getpixel((1, 0)) == pytest.approx(second, abs=1)


def test_to_rgb_float_nan_becomes_black() -> None:
    img = Image.fromarray(np.array([[np.nan, np.inf, 0.25]], dtype=np.float32))
    assert [to_rgb(img).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (0, 0, 0), (64, 64, 64)]


def test_to_rgb_keeps_rgb_object() -> None:
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img


RED = Image.new("RGB", (8, 6), (200, 40, 40))

# (file format, image saved in it, expected RGB of every loaded pixel, tolerance)
FILE_CASES = [
    ("PNG", RED.convert("RGBA"), (200, 40, 40), 0),
    ("PNG", RED.convert("P", dither=Image.Dither.NONE), (204, 51, 51), 0),  # web palette
    ("JPEG", RED.convert("CMYK"), (200, 40, 40), 3),  # lossy
    ("PNG", Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16)), (155, 155, 155), 0),  # 16-bit / 257
    ("PNG", RED.convert("L"), (88, 88, 88), 0),  # ITU-R 601 luminance of (200, 40, 40)
    ("TIFF", RED.convert("F"), (88, 88, 88), 0),  # float above 1 read as 0..255
]


@pytest.mark.parametrize(("fmt", "img", "expected", "tol"), FILE_CASES)
def test_load_image_from_file_each_mode(tmp_path: Path, fmt: str, img: Image.Image, expected: tuple, tol: int) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_encode(img, fmt))
    for source in (path, str(path), path.read_bytes()):
        out = np.asarray(load_image(source)).astype(int)  # [6, 8, 3]
        assert out.shape == (6, 8, 3)
        assert np.abs(out - np.array(expected)).max() <= tol, (img.mode, out[0, 0])


def test_load_image_rgb_pixels_exact(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), arr)


def test_bomb_refused_from_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # 12000 x 12000 = 144e6 pixels > the default cap (134e6) but below Pillow's hard limit (179e6);
    # the file has no pixel data, so decoding would fail with a different error.
    data = _png_header_only(12000, 12000)
    assert DEFAULT_MAX_PIXELS < 12000 * 12000

    def no_decode(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageLoadError, match=r"<bytes>: image is 12000x12000 .*max_pixels=134217728"):
        load_image(data)


def test_small_cap_refuses_real_image(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=1000)
    message = str(info.value)
    assert str(path) in message and "4096 pixels" in message and "max_pixels=1000" in message
    assert load_image(path, max_pixels=4096).size == (64, 64)  # the cap is inclusive


def test_pillow_hard_limit_reported_with_what_to_set() -> None:
    # above twice PIL.Image.MAX_IMAGE_PIXELS Pillow refuses on open, whatever our cap says
    with pytest.raises(ImageLoadError, match=r"<bytes>: .*MAX_IMAGE_PIXELS"):
        load_image(_png_header_only(20000, 20000), max_pixels=10**9)


def test_header_only_png_under_cap_is_corrupt() -> None:
    with pytest.raises(ImageLoadError, match=r"<bytes>: cannot read image"):
        load_image(_png_header_only(10, 10))


@pytest.mark.parametrize(
    "data",
    [
        b"",  # empty file
        b"not an image at all",  # unknown format
        _encode(Image.new("RGB", (32, 32), (9, 9, 9)), "PNG")[:60],  # truncated PNG
        _encode(Image.new("RGB", (32, 32), (9, 9, 9)), "JPEG")[:200],  # truncated JPEG
    ],
)
def test_corrupt_file_names_the_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=rf"^{path}: cannot read image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"^<bytes>: cannot read image"):
        load_image(data)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match=rf"^{path}: no such file"):
        load_image(path)
    assert issubclass(ImageLoadError, ValueError)


def _jpeg_with_orientation(orientation: int) -> bytes:
    """A 64x32 JPEG, left half red and right half blue as stored, whose EXIF asks for ``orientation``."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


# (EXIF orientation, displayed size, colour near the displayed top-left, colour near the displayed bottom-right)
ORIENTATIONS = [
    (1, (64, 32), (255, 0, 0), (0, 0, 255)),  # as stored
    (3, (64, 32), (0, 0, 255), (255, 0, 0)),  # rotated 180 degrees
    (6, (32, 64), (255, 0, 0), (0, 0, 255)),  # rotated 90 degrees clockwise: the stored left half is on top
    (8, (32, 64), (0, 0, 255), (255, 0, 0)),  # rotated 90 degrees counter-clockwise: the stored left half is below
]


@pytest.mark.parametrize(("orientation", "size", "top_left", "bottom_right"), ORIENTATIONS)
def test_load_image_applies_exif_orientation(
    tmp_path: Path, orientation: int, size: tuple[int, int], top_left: tuple, bottom_right: tuple
) -> None:
    data = _jpeg_with_orientation(orientation)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (64, 32) and raw.getexif()[0x0112] == orientation  # stored unrotated, tag present
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for img in (load_image(path), load_image(data)):
        assert img.mode == "RGB" and img.size == size
        width, height = size
        pixels = np.asarray(img).astype(int)  # [H, W, 3]
        assert np.abs(pixels[4, 4] - top_left).max() <= 8
        assert np.abs(pixels[height - 5, width - 5] - bottom_right).max() <= 8
