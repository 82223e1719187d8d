"""What the app does, without any Gradio: render, reset, export, translate.

`CanvasService` joins one shared `StreamV2V` engine (the model, loaded once)
with a `SessionRegistry` (one stream and one recording per visitor).  The
Gradio handlers in `ui.layout` only translate widget values into calls here
and exceptions into messages.

Render mode.  The canvas sends a snapshot about every 100 ms, and only while
someone draws.  In the core's stream mode a render lags its input by
steps − 1 snapshots (300 ms of drawing at 4 steps) and the last stroke needs a
flush; in latency mode every render shows the snapshot just sent, after
`steps` UNet calls in a row.  At 10 snapshots a second the model is idle
between snapshots anyway, so the stream batch's higher throughput buys
nothing here while its lag is plainly visible: the app renders the canvas in
latency mode.  It still calls `flush` at the end of every stroke, so running
it in stream mode (`--render-mode stream`) also converges to the last stroke.
Whole videos, where throughput is what counts, are translated in stream mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.images import fit_size, resize
from sv2v_core.video import VideoWriter, probe_video, read_video

from .gpu import ZERO_GPU, on_gpu
from .recording import EXPORT_FORMATS, EXPORT_PACES, export_video
from .sessions import SessionRegistry

MAX_VIDEO_SECONDS = 20.0
MAX_VIDEO_FRAMES = 600
VIDEO_GPU_SECONDS = 120


@dataclass(frozen=True)
class Rendered:
    """A render for the page: the picture and the stamp of the snapshot it shows."""

    image: np.ndarray
    stamp: float
    skipped: bool


def make_config(base: StreamConfig, *, prompt, strength, steps, seed, bank, ea, ff) -> StreamConfig:
    """`base` with the visitor's settings; ValueError with a readable message."""
    if prompt is None:
        prompt = ""
    steps_value = _whole("steps", steps)
    seed_value = _whole("seed", seed)
    try:
        strength_value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number, got {strength!r}") from None
    return base.replace(
        prompt=str(prompt).strip(), strength=strength_value, steps=steps_value, seed=seed_value,
        bank_mode=str(bank), bank_extended_attention=bool(ea), bank_feature_fusion=bool(ff),
    )


def _whole(name: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


class CanvasService:
    """The app's behaviour for every visitor, around one shared engine."""

    def __init__(self, engine, registry: SessionRegistry, base: StreamConfig):
        self.engine = engine
        self.registry = registry
        self.base = base
        self._step = on_gpu(self._step_on_device)
        self._translate = on_gpu(self._translate_on_device, duration=VIDEO_GPU_SECONDS)

    # -- the model work (on the GPU under ZeroGPU) --------------------------------
    def _step_on_device(self, state, config: StreamConfig, frame: np.ndarray, end: bool, cut: bool):
        """Render `frame` for `state` (created or reconfigured as needed); returns (state, output)."""
        if state is None:
            state = self.engine.new_stream(config)
        elif state.config != config:
            state = self.engine.configure(state, config)
        if cut:
            state.reset_bank()
        output = self.engine(state, frame)
        if end:
            flushed = self.engine.flush(state)
            output = flushed[-1] if flushed else output
        if ZERO_GPU:
            state.to("cpu")  # the GPU is gone between calls; the state comes back pickled
        return state, output

    def _translate_on_device(self, config: StreamConfig, source: str) -> Iterator[np.ndarray]:
        """Renders of the first MAX_VIDEO_FRAMES frames of `source` (a path: it pickles)."""
        frames, _ = read_video(source)
        limited = (frame for _, frame in zip(range(MAX_VIDEO_FRAMES), frames))
        state = self.engine.new_stream(config)
        renders = self.engine.translate(state, limited)
        while True:
            with self.registry.gpu_lock:  # one frame at a time: others' canvases keep moving
                image = next(renders, None)
            if image is None:
                return
            yield image

    def warm_up(self) -> None:
        """Render one blank frame on a throwaway stream, so the first visitor does not wait."""
        blank = np.full((self.base.height, self.base.width, 3), 255, np.uint8)
        with self.registry.gpu_lock:
            self._step(None, self.base, blank, True, False)

    # -- per-visitor operations ---------------------------------------------
    def render(self, session_id: str, image: np.ndarray, config: StreamConfig, *,
               stamp: float = 0.0, end: bool = True, cut: bool = False) -> Rendered:
        """Render one canvas frame for a visitor and record it."""
        session = self.registry.get(session_id)
        with self.registry.gpu_lock:
            session.state, output = self._step(session.state, config, image, end, cut)
        session.remember_stamp(session.state.frames_in - 1, stamp)
        shown_stamp = session.stamps.get(output.source_index, stamp)
        sketch = resize(image, output.image.shape[1], output.image.shape[0])
        session.recorder.add(output.image, sketch)
        return Rendered(output.image, shown_stamp, output.skipped)

    def reset_bank(self, session_id: str) -> bool:
        """Empty the visitor's feature bank; False when nothing was rendered yet."""
        session = self.registry.get(session_id)
        with self.registry.gpu_lock:
            if session.state is None:
                return False
            session.state.reset_bank()
        return True

    def recorded(self, session_id: str) -> int:
        return len(self.registry.get(session_id).recorder)

    def clear_recording(self, session_id: str) -> None:
        self.registry.get(session_id).recorder.clear()

    def export(self, session_id: str, fmt: str, pace: str, side_by_side: bool) -> Path:
        """The visitor's recording as a video file in the session's folder."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        if pace not in EXPORT_PACES:
            raise ValueError(f"pace must be one of {', '.join(EXPORT_PACES)}, got {pace!r}")
        recorder = self.registry.get(session_id).recorder
        folder = recorder.folder / "exports"
        folder.mkdir(exist_ok=True)
        name = f"streamv2v-{pace}{'-side-by-side' if side_by_side else ''}-{len(recorder)}.{fmt}"
        return export_video(recorder, folder / name, pace=pace, side_by_side=bool(side_by_side))

    def translate_video(self, source: str, config: StreamConfig, destination: Path,
                        progress: Callable[[int, int], None] = lambda done, total: None) -> Path:
        """Translate a short video file with a fresh stream; VideoError/ValueError on bad input."""
        info = probe_video(source)
        seconds = info.frame_count / float(info.fps)
        if seconds > MAX_VIDEO_SECONDS or info.frame_count > MAX_VIDEO_FRAMES:
            raise ValueError(
                f"the video is {seconds:.1f} s ({info.frame_count} frames); the limit is "
                f"{MAX_VIDEO_SECONDS:.0f} s and {MAX_VIDEO_FRAMES} frames"
            )
        width, height = fit_size(info.width, info.height, max(self.base.width, self.base.height),
                                   self.engine.size_multiple)
        config = dataclasses.replace(config, width=width, height=height, mode="stream")
        with VideoWriter(destination, fps=info.fps) as writer:
            for done, image in enumerate(self._translate(config, source), start=1):
                writer.write(image)
                progress(done, info.frame_count)
        return destination
