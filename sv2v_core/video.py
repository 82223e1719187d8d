"""Video files in and out, through PyAV (its wheel bundles FFmpeg).

Reading: `read_video(path)` returns an iterator of RGB frames
(np.uint8, height x width x 3) and a `VideoInfo`.  Any container and codec
FFmpeg decodes works (mp4/h264, webm/vp9, mov, mkv, avi/mjpeg, gif, ...).
Rotation metadata (phone videos) is applied, so frames come upright.
The file is opened and its first frame decoded before `read_video`
returns, so a missing, unreadable or empty file fails right away.  A file
that breaks later (corrupt or truncated in the middle) yields its good
frames first and then raises `VideoError`; callers that write an output must
therefore not treat a partial run as complete (`VideoWriter` makes that easy:
an exception inside its `with` block leaves no output file).

Writing: `VideoWriter` encodes H.264 MP4 (also .m4v/.mov/.mkv), VP9 WebM or
GIF, chosen by the output's extension, at an exact `Fraction` frame rate.
H.264 and VP9 use yuv420p, which needs even sides: an odd width or height is
padded by repeating the last column or row (nothing is cropped).  GIF stores
frame delays in hundredths of a second, so its rate is the nearest the
format allows.  Frames go to a hidden temporary file in the destination
folder that is renamed over the destination only when `close()` succeeds;
on an error or Ctrl-C (`abort()`, or leaving the `with` block by an
exception) the temporary file is removed and nothing is left behind.

Every problem a person can cause (missing file, not a video, broken file,
no frames, unwritable destination, unknown extension) raises `VideoError`
with one readable sentence.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
from PIL import Image

DEFAULT_FPS = Fraction(25)

# extension -> (FFmpeg muxer, encoder, pixel format, encoder options)
_OUTPUT_FORMATS = {
    ".mp4": ("mp4", "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    ".m4v": ("mp4", "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    ".mov": ("mov", "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    ".mkv": ("matroska", "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    ".webm": ("webm", "libvpx-vp9", "yuv420p", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    ".gif": ("gif", "gif", "pal8", {}),
}
OUTPUT_EXTENSIONS = tuple(_OUTPUT_FORMATS)


class VideoError(ValueError):
    """A video file that cannot be read or written; the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about itself.

    fps: average frame rate as an exact fraction (25 when the file has none).
    frame_count: number of frames; when `frame_count_estimated` is True it
        was computed from duration x fps and may be off by a few.
    width, height: size of the frames as yielded (after rotation).
    codec: FFmpeg's name of the video codec, e.g. "h264".
    """

    fps: Fraction
    frame_count: int
    width: int
    height: int
    codec: str
    frame_count_estimated: bool = False


def _name(path: Path) -> str:
    return f"'{path}'"


def _decoded(container, stream, path: Path) -> Iterator[np.ndarray]:
    """The RGB frames of `stream`, turned upright.  A function, not a VideoReader method: the
    generator must not hold its reader, so a reader dropped unread is freed, threads and all, at
    once rather than at a later garbage collection."""
    decoded = 0
    try:
        for frame in container.decode(stream):
            image = frame.to_ndarray(format="rgb24")
            turns = round((frame.rotation or 0) / 90) % 4
            if turns:
                image = np.ascontiguousarray(np.rot90(image, turns))
            decoded += 1
            yield image
    except av.FFmpegError as err:
        raise VideoError(
            f"{_name(path)} is damaged: decoding failed after {decoded} frames ({_reason(err)})"
        ) from None
    declared = int(stream.frames or 0)
    # Containers with an index (mp4, mov) know their frame count; a file
    # cut short ends early without any decoder error.  Allow a little
    # slack for edit lists that drop a frame or two.
    if declared and decoded < declared - max(2, declared // 50):
        raise VideoError(f"{_name(path)} looks truncated: it ended after {decoded} of {declared} frames")


class VideoReader:
    """An opened video file: `info`, then iterate once for the frames.

    Use as a context manager (or call `close`) to release the file early;
    iterating to the end closes it too, and so does dropping the reader.
    Closing ends the decoder's threads at once.
    threaded=False decodes on the calling thread only, for a process that
    forks while it reads (a forked child inherits no thread, only the locks
    they held).
    """

    def __init__(self, path: str | os.PathLike, *, threaded: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(f"the video file {_name(self.path)} does not exist")
        if self.path.is_dir():
            raise VideoError(f"{_name(self.path)} is a folder, not a video file")
        try:
            self._container = av.open(str(self.path), mode="r")
        except av.FFmpegError as err:
            raise VideoError(f"{_name(self.path)} is not a readable video file ({_reason(err)})") from None
        except OSError as err:
            raise VideoError(f"cannot open {_name(self.path)}: {err.strerror or err}") from None
        try:
            if not self._container.streams.video:
                raise VideoError(f"{_name(self.path)} has no video stream")
            self._stream = self._container.streams.video[0]
            if threaded:
                self._stream.thread_type = "AUTO"
            else:
                self._stream.thread_count = 1
            self._frames = _decoded(self._container, self._stream, self.path)
            first = next(self._frames, None)
            if first is None:
                raise VideoError(f"{_name(self.path)} contains no video frames")
            self._first: np.ndarray | None = first
            self.info = self._probe(first)
        except BaseException:
            self.close()
            raise

    def _probe(self, first: np.ndarray) -> VideoInfo:
        stream = self._stream
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = Fraction(fps) if fps and fps > 0 else DEFAULT_FPS
        count, estimated = int(stream.frames or 0), False
        if count <= 0:
            estimated = True
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif self._container.duration:
                seconds = self._container.duration / av.time_base
            else:
                seconds = 0.0
            count = max(1, round(seconds * fps))
        height, width = first.shape[:2]
        return VideoInfo(fps, count, width, height, stream.codec_context.name, estimated)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is None:
            raise VideoError(f"the frames of {_name(self.path)} were already read")
        if self._frames is None:
            raise VideoError(f"{_name(self.path)} was closed before its frames were read")
        first, self._first = self._first, None
        try:
            yield first
            yield from self._frames
        finally:
            self.close()

    def close(self) -> None:
        """Release the file and end the decoder's threads now (not at some later garbage collection:
        a process forked meanwhile would inherit the threads' locks and hang freeing them)."""
        frames = getattr(self, "_frames", None)
        if frames is not None:
            self._frames = None
            frames.close()
        self._stream = None
        container = getattr(self, "_container", None)
        if container is not None:
            self._container = None
            container.close()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | os.PathLike, *, threaded: bool = True) -> tuple[Iterator[np.ndarray], VideoInfo]:
    """Open `path`; return (iterator of RGB uint8 frames, VideoInfo); `threaded`: see VideoReader."""
    reader = VideoReader(path, threaded=threaded)
    return iter(reader), reader.info


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The `VideoInfo` of `path` (decodes only the first frame, on this thread)."""
    with VideoReader(path, threaded=False) as reader:
        return reader.info


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.strip().rstrip(".") or type(err).__name__


def _palettized(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, ARGB palette) of `frame` with its own 256-colour palette."""
    image = Image.fromarray(frame).quantize(256, method=Image.Quantize.MEDIANCUT)
    rgb = np.zeros((256, 3), np.uint8)
    used = np.frombuffer(bytes(image.getpalette()), np.uint8).reshape(-1, 3)[:256]
    rgb[: len(used)] = used
    palette = np.concatenate([np.full((256, 1), 255, np.uint8), rgb], axis=1)
    return np.asarray(image, dtype=np.uint8), palette


def _even(n: int) -> int:
    return n + (n % 2)


class VideoWriter:
    """Encode frames to `path` atomically; the format follows the extension.

        with VideoWriter("out.mp4", fps=Fraction(30000, 1001)) as writer:
            for frame in frames:
                writer.write(frame)      # np.uint8 HxWx3 RGB, all the same size

    The output appears only when the block ends without an exception.
    The size is taken from the first frame; `size` is the encoded
    (width, height), which for H.264/VP9 rounds odd sides up by padding.
    """

    def __init__(self, path: str | os.PathLike, fps: Fraction | float | int = DEFAULT_FPS):
        self.path = Path(path)
        ext = self.path.suffix.lower()
        if ext not in _OUTPUT_FORMATS:
            raise VideoError(
                f"cannot write {_name(self.path)}: the extension must be one of {', '.join(OUTPUT_EXTENSIONS)}"
            )
        self._format, self._codec, self._pix_fmt, self._options = _OUTPUT_FORMATS[ext]
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        if self.fps <= 0:
            raise VideoError(f"the frame rate must be positive, got {fps}")
        folder = self.path.parent
        if not folder.is_dir():
            raise VideoError(f"cannot write {_name(self.path)}: the folder '{folder}' does not exist")
        if self.path.is_dir():
            raise VideoError(f"cannot write {_name(self.path)}: it is a folder")
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".part{ext}", dir=folder)
        except OSError as err:
            raise VideoError(f"cannot write to the folder '{folder}': {err.strerror or err}") from None
        os.close(fd)
        self._temp: Path | None = Path(temp)
        self._container = None
        self._stream = None
        self.size: tuple[int, int] | None = None
        self.frames_written = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._last_pts = -1
        try:
            self._container = av.open(str(self._temp), mode="w", format=self._format)
        except (av.FFmpegError, OSError) as err:
            self.abort()
            raise VideoError(f"cannot write {_name(self.path)}: {_reason(err)}") from None

    def _start(self, width: int, height: int) -> None:
        if self._pix_fmt == "yuv420p":
            width, height = _even(width), _even(height)
        if self._codec == "gif":
            stream = self._container.add_stream(self._codec, rate=self.fps)
            stream.codec_context.time_base = Fraction(1, 100)
        else:
            stream = self._container.add_stream(self._codec, rate=self.fps, options=dict(self._options))
        stream.width, stream.height, stream.pix_fmt = width, height, self._pix_fmt
        self._stream, self.size = stream, (width, height)

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB frame (np.uint8, HxWx3)."""
        if self._temp is None:
            raise VideoError(f"the writer for {_name(self.path)} is already closed")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise VideoError(f"a video frame must be uint8 HxWx3 RGB, got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
        if self._stream is None:
            self._start(width, height)
            self._frame_shape = frame.shape
        elif frame.shape != self._frame_shape:
            raise VideoError(
                f"frame {self.frames_written} is {width}x{height}, but this video is "
                f"{self._frame_shape[1]}x{self._frame_shape[0]}"
            )
        out_w, out_h = self.size
        if (out_w, out_h) != (width, height):
            frame = np.pad(frame, ((0, out_h - height), (0, out_w - width), (0, 0)), mode="edge")
        if self._codec == "gif":
            video_frame = av.VideoFrame.from_ndarray(_palettized(frame), format="pal8")
            # GIF delays are whole hundredths of a second; keep them increasing
            video_frame.pts = max(self._last_pts + 1, round(self.frames_written * 100 / self.fps))
            self._last_pts = video_frame.pts
            video_frame.time_base = Fraction(1, 100)
        else:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames_written
        try:
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        except (av.FFmpegError, OSError) as err:
            raise VideoError(f"writing {_name(self.path)} failed: {_reason(err)}") from None
        self.frames_written += 1

    def close(self) -> Path:
        """Finish encoding and move the file into place; returns its path."""
        if self._temp is None:
            raise VideoError(f"the writer for {_name(self.path)} is already closed")
        if self.frames_written == 0:
            self.abort()
            raise VideoError(f"no frames were written, so {_name(self.path)} was not created")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self._temp, 0o666 & ~mask)
            os.replace(self._temp, self.path)
        except (av.FFmpegError, OSError) as err:
            self.abort()
            raise VideoError(f"writing {_name(self.path)} failed: {_reason(err)}") from None
        self._temp = None
        return self.path

    def abort(self) -> None:
        """Stop and remove the temporary file; the destination is untouched."""
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except (av.FFmpegError, OSError):
                pass  # the file is being thrown away anyway
        temp, self._temp = self._temp, None
        if temp is not None:
            temp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_temp", None) is not None:
            self.abort()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: Fraction | float | int = DEFAULT_FPS) -> Path:
    """Write RGB uint8 frames to `path` (.mp4, .webm, .gif, ...) atomically."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.path
