"""Load images safely as RGB, upright: decompression bombs refused; EXIF orientation applied; RGBA, P, CMYK,
16-bit and float modes converted."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 8192 * 8192 * 2
"""Largest image accepted by :func:`load_image`, in pixels (width * height): two 8k x 8k canvases."""

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image could not be loaded: missing, unreadable, corrupt, too large or of an unsupported mode."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert ``img`` to 8-bit RGB (returned unchanged when it already is RGB).

    - transparency (RGBA, LA, P with a transparent colour) is composited on white;
    - 16-bit greyscale (``I;16*`` and ``I``, read as 0..65535) is scaled to 0..255;
    - float ``F`` is read as 0..1 when all values lie there, else as 0..255 (clipped); NaN/inf become 0;
    - L, 1, CMYK, YCbCr and the other modes Pillow can convert go through ``Image.convert("RGB")``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)  # [H, W]
        grey = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # [H, W]
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def load_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file (path) or encoded image (bytes) as RGB, turned upright by its EXIF orientation tag.

    ``max_pixels`` caps width * height; the size is read from the header and checked before any
    pixel is decoded. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, whose double is a hard
    error) applies as well. Every failure raises :class:`ImageLoadError` naming the file.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    fp: str | Path | IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; our cap below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        f"{name}: image is {width}x{height} = {width * height} pixels, above the cap "
                        f"max_pixels={max_pixels} (decompression-bomb guard); pass a larger max_pixels "
                        "if the file is trusted"
                    )
                img.load()
                # cameras store pixels as the sensor read them and the rotation in EXIF; viewers (and
                # annotators drawing gt_boxes) show them rotated
                ImageOps.exif_transpose(img, in_place=True)
                return to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: no such file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            f"{name}: refused by Pillow's decompression-bomb guard ({exc}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels if the file is trusted"
        ) from exc
    except Exception as exc:  # decoders of corrupt files raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"{name}: cannot read image: {type(exc).__name__}: {exc}") from exc
