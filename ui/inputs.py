"""Decoding what a visitor sends into RGB frames, with size limits.

Canvas snapshots arrive as JPEG bytes on the fast channel (ui.channel) or as
data URLs inside a small JSON payload on the Gradio path
(`snapshot_from_payload` turns that into the same bytes).  The session layer
(ui.live) queues them still encoded, as an `EncodedFrame`, and the renderer
decodes one only when the model takes its frame (`EncodedFrame.decode`), so
a snapshot that a newer one replaces before its turn is never decoded.  API
calls and uploads arrive as image files.  All are capped in bytes and in pixels *before* the pixels are
decoded, then handed to `sv2v_core.images.to_rgb_array` (RGBA, grayscale,
16-bit … become RGB).  Every problem raises `ImageError` (a `ValueError`)
with a readable message.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sv2v_core.images import ImageError, resize, to_rgb_array

from .wire import SnapshotMessage

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
DATA_URL_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")


@dataclass(frozen=True)
class Snapshot:
    """One canvas snapshot sent by the page.

    stamp: the page's clock (performance.now(), ms) when it was taken; sent
        back with the render so the page can show snapshot-to-render latency.
    end: True for the snapshot taken when a stroke ends (or after an edit).
    cut: True when the picture was replaced (clear, new background, upload):
        the feature bank no longer describes the scene.
    seq: the page's number for it (increasing), echoed with its render.
    control: the canvas's ink layer alone (white strokes on black), sent
        when the app has a ControlNet: its control source.
    """

    image: np.ndarray
    stamp: float
    end: bool
    cut: bool
    seq: int = 0
    control: np.ndarray | None = None


def decode_image_bytes(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Image file bytes as an RGB uint8 array, or `ImageError`.

    size: (width, height) to resize to.  A JPEG larger than that is decoded
    at a reduced scale straight away (libjpeg's DCT scaling: 4x cheaper for
    a 512² snapshot rendered at 256²).
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image is {len(data) / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise ImageError(f"the image is {width}×{height}; the limit is {MAX_IMAGE_SIDE} pixels a side")
            if size is not None and image.format == "JPEG":
                image.draft("RGB", size)
            image.load()
            array = to_rgb_array(image)
            return array if size is None else resize(array, *size)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        # PIL raises SyntaxError for some malformed files (e.g. broken PNG chunks).
        raise ImageError("the file is not a readable image (PNG, JPEG or WebP)") from error


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    """An uploaded image file as an RGB uint8 array, or `ImageError`."""
    try:
        size = os.path.getsize(path)
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"the image is {size / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB")
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageError(f"cannot read the uploaded image: {error.strerror or error}") from error
    return decode_image_bytes(data)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL (PNG, JPEG or WebP), or `ImageError`."""
    prefix = next((p for p in DATA_URL_PREFIXES if url.startswith(p)), None)
    if prefix is None:
        raise ImageError("the canvas snapshot is not a PNG, JPEG or WebP data URL")
    if len(url) > MAX_IMAGE_BYTES * 4 // 3 + len(prefix) + 4:
        raise ImageError(f"the canvas snapshot is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        return base64.b64decode(url[len(prefix):], validate=True)
    except binascii.Error as error:
        raise ImageError("the canvas snapshot is not valid base64") from error


def snapshot_from_payload(payload: str) -> SnapshotMessage:
    """The canvas component's value (JSON: "image", "t", "end", "cut", "seq", and "control" with a
    ControlNet; pictures as data URLs) as a snapshot with its pictures' bytes, or `ImageError`."""
    try:
        message = json.loads(payload)
    except (json.JSONDecodeError, TypeError) as error:
        raise ImageError("the canvas sent a malformed snapshot") from error
    if not isinstance(message, dict) or not isinstance(message.get("image"), str):
        raise ImageError("the canvas sent a snapshot without an image")
    stamp = message.get("t", 0.0)
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not math.isfinite(stamp):
        stamp = 0.0
    seq = message.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**32:
        seq = 0
    control = message.get("control")
    if control is not None and not isinstance(control, str):
        raise ImageError("the canvas sent a control image that is not a data URL")
    return SnapshotMessage(seq, float(stamp), bool(message.get("end")), bool(message.get("cut")),
                           data_url_bytes(message["image"]), None if control is None else data_url_bytes(control))


@dataclass(frozen=True)
class EncodedFrame:
    """A canvas frame as it came: the picture's file bytes and, with a ControlNet, its ink layer's;
    decoded only when the model takes the frame (`decode`)."""

    image: bytes
    control: bytes | None = None

    def decode(self, size: tuple[int, int], *, control: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The picture and its ink layer (None: none sent, or `control` False) decoded at `size`
        ((width, height)); `ImageError` for either one that cannot be read."""
        ink = decode_image_bytes(self.control, size) if control and self.control is not None else None
        return decode_image_bytes(self.image, size), ink


def decode_snapshot(message: SnapshotMessage, size: tuple[int, int] | None = None) -> Snapshot:
    """A snapshot's pictures decoded (and resized to `size`, (width, height)), or `ImageError`."""
    control = None if message.control is None else decode_image_bytes(message.control, size)
    return Snapshot(decode_image_bytes(message.image, size), message.stamp, message.end, message.cut, message.seq,
                    control)


def parse_snapshot(payload: str) -> Snapshot:
    """The canvas component's value, decoded (`snapshot_from_payload`, then `decode_snapshot`)."""
    return decode_snapshot(snapshot_from_payload(payload))
