"""The fast channel's message format (WebSocket, binary, little-endian).

Page -> server, one binary message per canvas snapshot:

    offset  size  field
    0       2     magic b"SV"
    2       1     version (1)
    3       1     flags: 1 = end of a stroke (render to convergence), 2 = cut
                  (the picture was replaced: empty the feature bank),
                  4 = a control image follows the picture (see below)
    4       4     seq: uint32, strictly increasing per connection
    8       8     stamp: float64, the page clock (ms) when the snapshot was taken
    16      ...   the image: JPEG (what the page sends), PNG or WebP

With flag 4 (sent when the app has a ControlNet) the image is followed by
the control source, the canvas's ink layer alone (white strokes on black,
whatever the background):

    16      4     n: uint32, the picture's length in bytes
    20      n     the picture
    20+n    ...   the ink layer, as an image (JPEG)

Server -> page, one binary message per render:

    0       2     magic b"SV"
    2       1     version (1)
    3       1     flags: 1 = skipped (the previous render re-emitted),
                  2 = a comparison render follows the render (see below)
    4       4     reply: the seq of the snapshot this message answers
    8       4     shows: the seq of the snapshot the picture shows (older than
                  `reply` in stream mode, which lags by steps - 1 frames)
    12      8     stamp: float64, the page clock of the snapshot shown
    20      5x4   float32 server timings, ms: decode, wait (mailbox), model,
                  encode, total (message received -> render sent)
    40      ...   the render, JPEG

With flag 2 (while the page's compare view is on) the render is followed by
the same frame rendered without the feature bank:

    40      4     n: uint32, the render's length in bytes
    44      n     the render, JPEG
    44+n    ...   the render without the bank, JPEG

Server -> page text messages are JSON objects with a "type":
``{"type": "ready", "width": W, "height": H, "max_bytes": N}`` once the
connection is accepted (W×H is the render size: the page sends snapshots at
that size), ``{"type": "error", "seq": n or null, "message": "..."}`` for a
snapshot (or, with a null seq, settings) that could not be used, and ``{"type": "dropped", "seq": n}`` when
a newer snapshot replaced one before the model got to it, and
``{"type": "busy", "seq": n, "ahead": k, "message": "..."}`` when every
place on the server is taken (k people wait before this page), and
``{"type": "notice", "message": "..."}`` for the person drawing (e.g. "render
restarted" when their stream was started afresh on another worker).

Page -> server text messages: the page's render settings, on connecting and
whenever one changes (the Gradio page's own settings events carry them too,
for the Gradio path):

    {"type": "settings", "subject": "a house", "preset": "Watercolor",
     "strength": 0.4, "steps": 4, "seed": 0, "bank": "dyme", "ea": true,
     "ff": true, "control_scale": 1.0, "compare": false}

Every field but control_scale (only with a ControlNet) and compare (the
compare view: every frame also rendered without the bank; default off) is required; their
values are checked like the page's controls (ui.settings), and a bad value
gets an error message (seq null) while the connection stays open.  Any
other text closes the connection (1003).
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .settings import Settings

MAGIC = b"SV"
VERSION = 1
END, CUT, CONTROL = 1, 2, 4
SKIPPED, COMPARED = 1, 2
SNAPSHOT_HEADER = struct.Struct("<2sBBId")
PICTURE_LENGTH = struct.Struct("<I")
RENDER_HEADER = struct.Struct("<2sBBIId5f")
MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024  # a 512² JPEG from the page is 10-60 KB
# JPEG: Chromium encodes it several times faster than WebP (bench.live --codecs;
# docs/performance.md).  Quality 0.85 keeps strokes clean; the model adds noise anyway.
SNAPSHOT_QUALITY = 0.85
RENDER_QUALITY = 85


SETTINGS_FIELDS = ("subject", "preset", "strength", "steps", "seed", "bank", "ea", "ff", "control_scale", "compare")
OPTIONAL_SETTINGS = ("control_scale", "compare")
REQUIRED_SETTINGS = tuple(key for key in SETTINGS_FIELDS if key not in OPTIONAL_SETTINGS)
NOT_SETTINGS = "this channel takes binary canvas snapshots, and settings as JSON text, only"


class ProtocolError(ValueError):
    """A message that does not follow this format (not a bad picture: a bad client)."""


@dataclass(frozen=True)
class SnapshotMessage:
    seq: int
    stamp: float
    end: bool
    cut: bool
    image: bytes
    control: bytes | None = None  # the ink layer (the ControlNet's control source), if sent


@dataclass(frozen=True)
class ServerTimings:
    """Milliseconds spent on one render on the server."""

    decode: float = 0.0
    wait: float = 0.0
    model: float = 0.0
    encode: float = 0.0
    total: float = 0.0


def pack_snapshot(seq: int, stamp: float, image: bytes, *, end: bool = False, cut: bool = False,
                  control: bytes | None = None) -> bytes:
    """A snapshot message (what the page sends; used by tests and load clients)."""
    flags = (END if end else 0) | (CUT if cut else 0) | (CONTROL if control is not None else 0)
    header = SNAPSHOT_HEADER.pack(MAGIC, VERSION, flags, seq, stamp)
    if control is None:
        return header + image
    return header + PICTURE_LENGTH.pack(len(image)) + image + control


def unpack_snapshot(message: bytes) -> SnapshotMessage:
    """Parse a snapshot message; `ProtocolError` naming what is wrong."""
    if len(message) > SNAPSHOT_HEADER.size + MAX_SNAPSHOT_BYTES:
        raise ProtocolError(f"the snapshot is {len(message) / 2**20:.1f} MB; the limit is "
                            f"{MAX_SNAPSHOT_BYTES // 2**20} MB")
    if len(message) <= SNAPSHOT_HEADER.size:
        raise ProtocolError(f"a snapshot message needs a {SNAPSHOT_HEADER.size}-byte header and an image; "
                            f"got {len(message)} bytes")
    magic, version, flags, seq, stamp = SNAPSHOT_HEADER.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError("not a canvas snapshot (bad magic bytes)")
    if version != VERSION:
        raise ProtocolError(f"snapshot format version {version} is not supported (expected {VERSION}); reload the page")
    if flags & ~(END | CUT | CONTROL):
        raise ProtocolError(f"unknown snapshot flags {flags:#x}")
    if stamp != stamp or stamp in (float("inf"), float("-inf")):
        raise ProtocolError("the snapshot's time stamp is not a number")
    body = message[SNAPSHOT_HEADER.size:]
    control = None
    if flags & CONTROL:
        if len(body) < PICTURE_LENGTH.size:
            raise ProtocolError("a snapshot with a control image needs the picture's length")
        (length,) = PICTURE_LENGTH.unpack_from(body)
        if not 0 < length < len(body) - PICTURE_LENGTH.size:
            raise ProtocolError(f"the picture's length {length} leaves no room for it and the control image")
        control = bytes(body[PICTURE_LENGTH.size + length:])
        body = body[PICTURE_LENGTH.size:PICTURE_LENGTH.size + length]
    return SnapshotMessage(seq, stamp, bool(flags & END), bool(flags & CUT), bytes(body), control)


def unpack_settings(text: str) -> Settings:
    """Parse a settings message; `ProtocolError` for text that is not one (values are checked later)."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise ProtocolError(NOT_SETTINGS) from None
    if not isinstance(message, dict) or message.get("type") != "settings":
        raise ProtocolError(NOT_SETTINGS)
    fields = {key: value for key, value in message.items() if key != "type"}
    missing = [key for key in REQUIRED_SETTINGS if key not in fields]
    unknown = sorted(set(fields) - set(SETTINGS_FIELDS))
    if missing or unknown:
        raise ProtocolError(f"a settings message needs {', '.join(REQUIRED_SETTINGS)} (and may have "
                            f"{' and '.join(OPTIONAL_SETTINGS)}); missing {missing or 'none'}, unknown {unknown or 'none'}")
    return Settings(**fields)


def settings_message(settings: Settings) -> str:
    """A settings message (what the page sends; used by tests and clients)."""
    return json.dumps({"type": "settings", **{key: getattr(settings, key) for key in SETTINGS_FIELDS}})


def pack_render(reply: int, shows: int, stamp: float, image: bytes, timings: ServerTimings,
                *, skipped: bool = False, compare: bytes | None = None) -> bytes:
    """A render message; compare: the render without the bank (the compare view), if any."""
    flags = (SKIPPED if skipped else 0) | (COMPARED if compare is not None else 0)
    header = RENDER_HEADER.pack(MAGIC, VERSION, flags, reply, shows, stamp,
                                timings.decode, timings.wait, timings.model, timings.encode, timings.total)
    if compare is None:
        return header + image
    return header + PICTURE_LENGTH.pack(len(image)) + image + compare


def _render_parts(message: bytes) -> tuple[tuple, bytes, bytes | None]:
    """The header's fields, the render and the comparison render (None) of a render message."""
    if len(message) < RENDER_HEADER.size:
        raise ProtocolError("a render message is shorter than its header")
    fields = RENDER_HEADER.unpack_from(message)
    magic, version, flags = fields[:3]
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("not a render message of this version")
    body = bytes(message[RENDER_HEADER.size:])
    if not flags & COMPARED:
        return fields, body, None
    (length,) = PICTURE_LENGTH.unpack_from(body)
    return fields, body[PICTURE_LENGTH.size:PICTURE_LENGTH.size + length], body[PICTURE_LENGTH.size + length:]


def unpack_render(message: bytes) -> tuple[int, int, float, ServerTimings, bool, bytes]:
    """(reply, shows, stamp, timings, skipped, jpeg) of a render message (for clients and tests)."""
    (_, _, flags, reply, shows, stamp, *times), jpeg, _ = _render_parts(message)
    return reply, shows, stamp, ServerTimings(*times), bool(flags & SKIPPED), jpeg


def unpack_compare(message: bytes) -> bytes | None:
    """The render without the bank that a render message carries (the compare view), or None."""
    return _render_parts(message)[2]


def encode_render(image: np.ndarray) -> bytes:
    """A render as JPEG bytes (both channels send renders this way)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=RENDER_QUALITY)
    return buffer.getvalue()


def ready_message(width: int, height: int) -> str:
    return json.dumps({"type": "ready", "width": width, "height": height, "max_bytes": MAX_SNAPSHOT_BYTES,
                       "quality": SNAPSHOT_QUALITY})


def error_message(message: str, seq: int | None = None) -> str:
    return json.dumps({"type": "error", "seq": seq, "message": message})


def busy_message(seq: int, ahead: int, message: str) -> str:
    return json.dumps({"type": "busy", "seq": seq, "ahead": ahead, "message": message})


def notice_message(message: str) -> str:
    return json.dumps({"type": "notice", "message": message})


def dropped_message(seq: int) -> str:
    return json.dumps({"type": "dropped", "seq": seq})
