"""Recording a session's renders and exporting them as a video.

`Recorder` keeps every rendered frame (and the sketch it was rendered from)
with the time it was made, each as an RGB array or as JPEG bytes (the live
path records the very JPEGs it sends and receives, so recording costs no
encoding).  Only the newest `keep_in_memory` frames stay in RAM; older ones
are spilled to JPEG files in the recorder's own temporary folder (arrays are
encoded then, bytes written as they are), so a long session costs disk, not
memory.  Reading the recording back
(`frames()`) yields every frame in order, from disk and memory alike, so an
export never loses frames.  `close()` deletes the folder.

`export_video` writes a recording as MP4 or GIF, at the real pace (a fixed
frame rate showing, at each tick, the newest frame made by then) or as a
time-lapse (every recorded frame once), optionally side by side with the
sketch.  At the real pace a pause longer than MAX_PAUSE_SECONDS between two
renders is shortened to it, unless the pauses are kept: a video of a
session plays its drawing, not its coffee breaks, and idling never brings
it near the frame cap.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from sv2v_core.video import VideoWriter

EXPORT_FORMATS = ("mp4", "gif")
EXPORT_PACES = ("real", "timelapse")
REAL_PACE_FPS = 25
TIMELAPSE_FPS = 12
MAX_EXPORT_FRAMES = 15_000  # 10 minutes at the real-pace frame rate
MAX_PAUSE_SECONDS = 1.0  # a real-pace export shortens longer pauses to this, unless it keeps them
GIF_MAX_WIDTH = 512
SPILL_QUALITY = 95


@dataclass(frozen=True)
class RecordedFrame:
    """One render: when it was made, the picture and the sketch behind it."""

    t: float
    render: np.ndarray
    sketch: np.ndarray | None


Picture = np.ndarray | bytes  # an RGB array, or JPEG bytes


@dataclass(frozen=True)
class _Entry:
    t: float
    render: Picture | Path
    sketch: Picture | Path | None


def _load(item: Picture | Path | None) -> np.ndarray | None:
    if item is None or isinstance(item, np.ndarray):
        return item
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as image:
        return np.asarray(image.convert("RGB"))


def _keep(item: Picture | None) -> Picture | None:
    """A private copy of a picture handed to `add` (bytes are immutable already)."""
    return item if item is None or isinstance(item, bytes) else np.array(item, np.uint8)


def _write(item: Picture, path: Path) -> Path:
    if isinstance(item, bytes):
        path.write_bytes(item)
    else:
        Image.fromarray(item).save(path, quality=SPILL_QUALITY)
    return path


class Recorder:
    """Every frame of one session, bounded in memory, spilling to disk."""

    def __init__(self, keep_in_memory: int = 16, max_frames: int = MAX_EXPORT_FRAMES, parent: str | None = None):
        if keep_in_memory < 1:
            raise ValueError("keep_in_memory must be at least 1")
        self.keep_in_memory = keep_in_memory
        self.max_frames = max_frames
        self.folder = Path(tempfile.mkdtemp(prefix="sv2v-rec-", dir=parent))
        self._entries: list[_Entry] = []
        self._first_in_memory = 0  # entries before this index live on disk
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self) >= self.max_frames

    def add(self, render: Picture, sketch: Picture | None = None, t: float | None = None) -> bool:
        """Record one frame (arrays or JPEG bytes); False when the recording is full or closed."""
        entry = _Entry(time.monotonic() if t is None else t, _keep(render), _keep(sketch))
        with self._lock:
            if self._closed or len(self._entries) >= self.max_frames:
                return False
            self._entries.append(entry)
            while len(self._entries) - self._first_in_memory > self.keep_in_memory:
                self._spill(self._first_in_memory)
                self._first_in_memory += 1
        return True

    def _spill(self, index: int) -> None:
        entry = self._entries[index]
        render_path = _write(entry.render, self.folder / f"{index:07d}-render.jpg")
        sketch_path = None if entry.sketch is None else _write(entry.sketch, self.folder / f"{index:07d}-sketch.jpg")
        self._entries[index] = _Entry(entry.t, render_path, sketch_path)

    def frames(self) -> Iterator[RecordedFrame]:
        """Every recorded frame, oldest first (a snapshot of the recording now)."""
        with self._lock:
            entries = list(self._entries)
        for entry in entries:
            yield RecordedFrame(entry.t, _load(entry.render), _load(entry.sketch))

    def clear(self) -> None:
        """Forget every frame (the folder stays usable)."""
        with self._lock:
            self._entries.clear()
            self._first_in_memory = 0
            for path in self.folder.glob("*.jpg"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget everything and delete the temporary folder."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            shutil.rmtree(self.folder, ignore_errors=True)


def _side_by_side(frame: RecordedFrame) -> np.ndarray:
    render = frame.render
    if frame.sketch is None:
        sketch = np.full_like(render, 255)
    else:
        sketch = frame.sketch
        if sketch.shape != render.shape:
            size = (render.shape[1], render.shape[0])
            sketch = np.asarray(Image.fromarray(sketch).resize(size, Image.Resampling.BILINEAR))
    return np.concatenate([sketch, render], axis=1)


def _real_pace(frames: Iterable[RecordedFrame], fps: int, max_pause: float | None) -> Iterator[RecordedFrame]:
    """At every tick of a `fps` clock, the newest frame made by then; pauses between frames longer than
    `max_pause` seconds are shortened to it (None: kept)."""
    iterator = iter(frames)
    current = next(iterator, None)
    if current is None:
        return
    start, tick = current.t, 0
    for upcoming in iterator:
        pause = upcoming.t - current.t
        if max_pause is not None and pause > max_pause:
            start += pause - max_pause  # the clock skips the rest of the pause
        # Ticks strictly before `upcoming` was made show `current` (1e-6: float slack).
        while tick < math.ceil((upcoming.t - start) * fps - 1e-6):
            yield current
            tick += 1
        current = upcoming
    yield current


def export_video(recorder: Recorder, path: str | Path, *, pace: str = "timelapse",
                 side_by_side: bool = False, fps: int | None = None, keep_pauses: bool = False) -> Path:
    """Write the recording to `path` (.mp4 or .gif); returns the path.

    keep_pauses: at the real pace, keep pauses longer than MAX_PAUSE_SECONDS
    between renders as they were (by default they are shortened to it).

    Raises ValueError when there is nothing to export or the choice is unknown,
    VideoError when writing fails.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if pace not in EXPORT_PACES:
        raise ValueError(f"pace must be one of {', '.join(EXPORT_PACES)}, got {pace!r}")
    if len(recorder) == 0:
        raise ValueError("nothing has been rendered yet, so there is nothing to export")
    fps = fps or (REAL_PACE_FPS if pace == "real" else TIMELAPSE_FPS)
    frames: Iterable[RecordedFrame] = recorder.frames()
    if pace == "real":
        frames = _real_pace(frames, fps, None if keep_pauses else MAX_PAUSE_SECONDS)
    with VideoWriter(path, fps=fps) as writer:
        for count, frame in enumerate(frames):
            if count >= MAX_EXPORT_FRAMES:
                raise ValueError(
                    f"the video would be longer than {MAX_EXPORT_FRAMES} frames; export a time-lapse instead"
                    + ("" if pace != "real" or not keep_pauses else ", or shorten the pauses")
                )
            picture = _side_by_side(frame) if side_by_side else frame.render
            if fmt == "gif" and picture.shape[1] > GIF_MAX_WIDTH:
                height = round(picture.shape[0] * GIF_MAX_WIDTH / picture.shape[1])
                picture = np.asarray(Image.fromarray(picture).resize((GIF_MAX_WIDTH, height), Image.Resampling.BILINEAR))
            writer.write(picture)
    return path
