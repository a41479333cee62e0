"""The one way every decode path (shards, annotation folders) turns an image into 8-bit RGB.

PIL's `convert("RGB")` is wrong for some modes web data holds, so modes are
mapped here, each by a stated rule:

- 16-bit greyscale ("I;16", "I;16B", ...): v -> round(v * 255 / 65535),
  i.e. v / 257 rounded, the nearest 8-bit level (exact for 8-bit data stored
  as 16-bit, v = 257 * k). PIL itself clips to 255, so such PNGs came out white.
- "I" (32-bit integers; what Pillow gives for 16-bit TIFF/PGM data): read
  as 16-bit values like "I;16", clipped to 0..65535.
- "F" (32-bit float; float TIFF, PFM): fractions of full scale, 0.0 -> 0 and
  1.0 -> 255, clipped (scikit-image's convention for float images). No
  per-image min-max stretch: it would turn a dark picture bright.
- anything with alpha ("RGBA", "LA", "PA", or "P"/"L"/"RGB" with a
  transparent colour): composited over white, c * a/255 + 255 - a, rounded,
  the rule img2dataset applies while making the shards, so a picture decodes
  the same whether or not it went through the download stage.
- the rest ("1", "L", "P", "CMYK", "YCbCr", ...): PIL's own conversion.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

_FULL_16 = 65535


class ImageTooLarge(ValueError):
    """Width x height above the caller's limit (or PIL's decompression-bomb limit)."""


class UnreadableImage(OSError):
    """The bytes or the file are not a decodable image."""


def decode_rgb(source: bytes | str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes or a file completely (so truncation shows here) into 8-bit RGB."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _decode(io.BytesIO(source), max_pixels)
        with open(source, "rb") as file:
            return _decode(file, max_pixels)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exn:
        raise ImageTooLarge(str(exn)) from exn
    except Exception as exn:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise UnreadableImage(f"{type(exn).__name__}: {exn}") from exn


def _decode(file, max_pixels: int | None) -> Image.Image:
    image = Image.open(file)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width}x{image.height} pixels, more than {max_pixels}")
    image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by the rules of the module docstring."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_grey8(image), "L").convert("RGB")
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8), "RGB")
    return image.convert("RGB")


def _grey8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.rint(np.nan_to_num(values.astype(np.float64)) * 255.0)
        return np.clip(scaled, 0, 255).astype(np.uint8)
    values = np.clip(values.astype(np.int64), 0, _FULL_16)
    return ((values * 255 + _FULL_16 // 2) // _FULL_16).astype(np.uint8)
