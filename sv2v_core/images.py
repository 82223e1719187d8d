"""Turning whatever a user hands us into an RGB frame, or a clear error.

Accepts PIL images (any mode: RGBA and LA are composited on white, grayscale,
palette, 16-bit and CMYK converted), numpy arrays (H×W, H×W×1/3/4; uint8, uint16,
bool or float in [0, 1]), and paths to image files.  Everything else raises
`ImageError`, a `ValueError` whose message says what was wrong.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096
THUMB_SIDE = 32


class ImageError(ValueError):
    """An input image that cannot be used; the message says why."""


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return _from_array(array / top)
    return np.asarray(image.convert("RGB"))


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"expected an H×W×3 image, got an array of shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("the image contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"unsupported image data type {array.dtype}")
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = (array[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_rgb_array(image) -> np.ndarray:
    """`image` as a contiguous uint8 H×W×3 RGB array, or `ImageError`."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError as error:
            raise ImageError(f"image file not found: {image}") from error
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise ImageError(f"not a readable image: {os.path.basename(str(image))}") from error
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(f"image is {image.width}×{image.height}; the limit is {MAX_PIXELS} pixels")
        array = _from_pil(image)
    elif isinstance(image, np.ndarray):
        array = _from_array(image)
    else:
        raise ImageError(f"expected an image, got {type(image).__name__}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise ImageError("the image is empty")
    if height * width > MAX_PIXELS:
        raise ImageError(f"image is {width}×{height}; the limit is {MAX_PIXELS} pixels")
    return array


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """`array` stretched to width×height (no-op when it already is)."""
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return np.array(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


def fit_size(width: int, height: int, longest: int, multiple: int) -> tuple[int, int]:
    """A render size with the aspect of width×height, its longer side about
    `longest`, both sides rounded to a multiple of `multiple` (at least one)."""
    scale = longest / max(width, height)
    snap = lambda side: max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)  # noqa: E731
    return snap(width), snap(height)


def thumbnail(array: np.ndarray) -> np.ndarray:
    """A 32×32 float32 copy in [0, 1] for cheap frame comparisons."""
    small = Image.fromarray(array).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """1 − mean absolute difference of two thumbnails: 1 for identical frames."""
    return float(1.0 - np.abs(a - b).mean())
