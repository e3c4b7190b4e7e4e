"""Image checks and conversion: decode once to validate, convert any mode to RGB."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


def check_image(data: bytes, max_pixels: int, limit: str | None = None) -> str | None:
    """Return why ``data`` is not a usable image, or None when it is.

    ``limit`` words the pixel limit in the message (default: the config key data.max_pixels).

    The whole stream is decoded (JPEGs at 1/8 scale through ``draft``, which is
    fast) so truncated files are caught here and not in the middle of training.
    """
    if not data:
        return "zero-byte image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                return f"image has {w * h} pixels, over {limit or f'data.max_pixels={max_pixels}'}"
            if w == 0 or h == 0:
                return "image has no pixels"
            if img.format == "JPEG":
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return "image is a decompression bomb (too many pixels)"
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"image cannot be decoded ({str(exc).splitlines()[0][:80]})"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        arr = ((arr - arr.min()) / span * 255.0).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)
