"""What the app does, without any Gradio: render, reset, export, translate.

`CanvasService` joins one shared `StreamV2V` engine (the model, loaded once)
with a `SessionRegistry` (one stream and one recording per visitor).  The
Gradio handlers in `ui.layout` only translate widget values into calls here
and exceptions into messages.

Render mode, decided by measurement (python -m ui.bench --cases echo:15
echo:40 tiny:256 --modes latency stream; the echo engine stands in for a GPU
taking the given time per frame, 512², 4 steps; the fast channel; headless
Chromium drawing at 60 Hz on a 2-core machine; medians of 2 runs):

    case          mode     renders/s  latency p50  model busy
    echo 15 ms    latency     57         30 ms        93 %
    echo 15 ms    stream      57         76 ms        46 %
    echo 40 ms    latency     24         60 ms        99 %
    echo 40 ms    stream      46         99 ms        95 %
    tiny, 256²    latency      2.2      0.46 s        99 %
    tiny, 256²    stream       2.9      1.34 s        99 %

(The echo engine's stream batch is assumed to cost half of `steps` batch-1
calls, roughly what a large GPU does.) In stream mode every render shows the
snapshot sent steps − 1 renders earlier, so under flow control its latency
is about `steps` × its per-call time plus the path, always more than latency
mode's `steps` batch-1 calls; it can only win renders per second, and only
when the model, not the drawing (60 changes a second) nor the page, is what
limits them (echo 40: 46 vs 24 renders/s, for 39 ms more lag; the built-in
model on a CPU: 2.9 vs 2.2, for three times the lag). People drawing on live
canvases complain most about lag behind their strokes, so the canvas renders
in latency mode; `--render-mode stream` remains for hosts that prefer
smoothness on a slow GPU. The page still sends "end" with the last snapshot
of a stroke and the service flushes it, so stream mode also converges to the
last stroke. Whole videos, where throughput is what counts, are translated
in stream mode.

Many artists on one GPU.  The scheduler hands each tick's frames (the newest
of up to `max_batch` sessions, taking turns) to `_render_batch`, which makes
one `on_gpu` call (`_step_on_device`) for the whole batch: each stream is
configured (created, reconfigured, its bank emptied at a cut) and its frame
checked (`engine.prepare`) on its own, so bad settings or a bad picture fail
only that frame; the rest render in one `engine.render` call, which stacks
compatible streams into shared UNet calls.  Should that call raise anyway
(say, out of GPU memory for the batch), each of its frames is rendered
again on its own, so the culprit gets its error and the others their
renders.  Stream mode's end-of-stroke flush runs per stream afterwards.
Webcam frames are canvas frames (same mailbox, same batches).  Video
translation stays a series of tasks, one frame each between ticks: its
frames must never be dropped (newest-wins would), and a video's stream
(stream mode, the video's aspect) never shares a batch key with the
canvases' (latency mode, square) anyway.

Admission (ui.sessions): a frame is only queued for an admitted session;
otherwise `submit` raises `Busy` ("busy: N people ahead of you").  A
sweeper thread, and every submit, releases sessions idle for
`release_after` seconds (their state moves to the CPU on the scheduler's
thread, freeing GPU memory and their place; the next frame continues the
stream) and frees sessions idle for the idle timeout.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.images import fit_size, resize
from sv2v_core.video import VideoWriter, probe_video, read_video

from .gpu import ZERO_GPU, on_gpu
from .popout import ViewLinks
from .recording import EXPORT_FORMATS, EXPORT_PACES, export_video
from .scheduler import Job, RenderScheduler, SchedulerClosed
from .sessions import Session, SessionRegistry
from .wire import encode_render

MAX_VIDEO_SECONDS = 20.0
MAX_VIDEO_FRAMES = 600
VIDEO_GPU_SECONDS = 120
SWEEP_SECONDS = 5.0
# Frames per tick.  In the load test's cost model (an H100 at 512²: 8 ms per call + 3 ms per frame)
# batch 8 renders 2.75x as many frames per second as one at a time and batch 16 only 3.1x, for
# 24 ms more per tick (README, "Many users"); more sessions than this take turns.
MAX_BATCH = 8


@dataclass(frozen=True)
class Rendered:
    """A render for the page.

    image: the picture, and `jpeg` the same as JPEG (what both channels send
    and the recording keeps); stamp, seq: the page clock and sequence number
    of the snapshot it shows (an older one than the one just sent, in stream
    mode); skipped: the previous render re-emitted; model_seconds: time on
    the model's thread; encode_seconds: time making the JPEG.
    """

    image: np.ndarray
    stamp: float
    seq: int
    skipped: bool
    model_seconds: float = 0.0
    jpeg: bytes = b""
    encode_seconds: float = 0.0


@dataclass(frozen=True)
class FrameRequest:
    """One frame for the scheduler: already decoded and at the render size.

    sketch: what to record as the sketch beside the render: the frame itself,
    or the JPEG it was decoded from (no encoding needed then).
    control: the ControlNet's control source for this frame (the canvas's
    ink layer, at the render size), or None: derived from the frame.
    """

    session: Session
    image: np.ndarray
    config: StreamConfig
    stamp: float
    seq: int
    end: bool
    sketch: np.ndarray | bytes
    control: np.ndarray | None = None


@dataclass
class Step:
    """One stream's part of a batch on the device: its state (None: not created yet), the
    settings, the frame (at the render size), a stroke's end (flush) and a cut (empty the bank)."""

    state: object
    config: StreamConfig
    frame: np.ndarray
    end: bool = False
    cut: bool = False
    control: np.ndarray | None = None


@dataclass(frozen=True)
class Ticket:
    """A queued frame: its scheduler `job` (wait and model times) and the
    `future` of the finished `Rendered` (encoded and recorded)."""

    job: Job
    future: Future


def make_config(base: StreamConfig, *, prompt, strength, steps, seed, bank, ea, ff,
                control_scale=None) -> StreamConfig:
    """`base` with the visitor's settings; ValueError with a readable message.

    control_scale: the ControlNet's conditioning scale (None: keep base's).
    """
    if prompt is None:
        prompt = ""
    steps_value = _whole("steps", steps)
    seed_value = _whole("seed", seed)
    try:
        strength_value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number, got {strength!r}") from None
    if control_scale is not None:
        try:
            control_scale = float(control_scale)
        except (TypeError, ValueError):
            raise ValueError(f"conditioning scale must be a number, got {control_scale!r}") from None
    return base.replace(
        prompt=str(prompt).strip(), strength=strength_value, steps=steps_value, seed=seed_value,
        bank_mode=str(bank), bank_extended_attention=bool(ea), bank_feature_fusion=bool(ff),
        control_scale=base.control_scale if control_scale is None else control_scale,
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
    """The app's behaviour for every visitor, around one shared engine.

    All model work goes through `scheduler` (one worker thread).  Frames are
    decoded and resized by the calling thread before they are queued; each
    render is encoded to JPEG once and recorded for export on a separate
    "finishing" thread.  So neither holds up the model.
    """

    def __init__(self, engine, registry: SessionRegistry, base: StreamConfig, *, max_batch: int = MAX_BATCH,
                 sweep_seconds: float = SWEEP_SECONDS):
        self.engine = engine
        self.registry = registry
        self.base = base
        self._step = on_gpu(self._step_on_device)
        self._translate = on_gpu(self._translate_on_device, duration=VIDEO_GPU_SECONDS)
        self.scheduler = RenderScheduler(self._render_batch, max_batch=max_batch)
        self.views = ViewLinks()
        # One thread, so each session's frames are recorded in render order.
        self._finishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sv2v-finish")
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_every, args=(sweep_seconds,), name="sv2v-sweeper",
                                         daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the worker threads (what they are doing finishes first) and free every session."""
        self._stop.set()
        self.scheduler.close()
        self._finishing.shutdown(wait=True)
        self._sweeper.join(timeout=SWEEP_SECONDS)
        self.registry.close_all()

    @property
    def controlled(self) -> bool:
        """Whether the engine has a ControlNet (the page then sends its ink layer as the control source)."""
        return getattr(self.engine, "controlnet", None) is not None

    # -- the model work (on the scheduler's thread; on the GPU under ZeroGPU) -------
    def _step_on_device(self, steps: list[Step]) -> list[tuple[object, object]]:
        """Render one batch: (state, output or the exception of that frame alone) per step.

        One call per batch, so one `spaces.GPU` call on ZeroGPU, where the
        states come in pickled and must be returned.
        """
        results: list = [None] * len(steps)
        ready: list[int] = []
        for index, step in enumerate(steps):
            try:
                step.state = self._configured(step.state, step.config)
                if step.cut:
                    step.state.reset_bank()
                self.engine.prepare(step.state, step.frame)
            except ValueError as error:  # bad settings or picture (ImageError is one): this frame only
                results[index] = error
            else:
                ready.append(index)
        if ready:
            for index, output in zip(ready, self._render_together([steps[i] for i in ready])):
                results[index] = output
        for index, step in enumerate(steps):
            if step.end and not isinstance(results[index], Exception):  # a stroke's end: render it to convergence
                try:
                    flushed = self.engine.flush(step.state)
                except (ValueError, RuntimeError) as error:
                    results[index] = error
                else:
                    results[index] = flushed[-1] if flushed else results[index]
            if ZERO_GPU and step.state is not None:
                step.state.to("cpu")  # the GPU is gone between calls; the state comes back pickled
        return [(step.state, output) for step, output in zip(steps, results)]

    def _configured(self, state, config: StreamConfig):
        if state is None:
            return self.engine.new_stream(config)
        if state.config != config:
            return self.engine.configure(state, config)
        return state

    def _render_together(self, steps: list[Step]) -> list:
        """Outputs of one `engine.render` over `steps`; if it raises, each step again on its own."""
        try:
            return self.engine.render([(step.state, step.frame, step.control) for step in steps])
        except (ValueError, RuntimeError) as error:  # e.g. out of memory for the batch
            if len(steps) == 1:
                return [error]
        outputs = []
        for step in steps:
            bank = getattr(step.state, "bank", None)
            if bank is not None:
                bank.discard_pending()  # what the failed call recorded
            try:
                outputs.append(self.engine.render([(step.state, step.frame, step.control)])[0])
            except (ValueError, RuntimeError) as error:
                outputs.append(error)
        return outputs

    def _render_batch(self, requests: list[FrameRequest]) -> list[Rendered | Exception]:
        """Render one tick's frames (the scheduler's `run_batch`): a `Rendered` or an exception each."""
        steps = []
        for request in requests:
            session = request.session
            cut, session.cut_pending = session.cut_pending, False
            steps.append(Step(session.state, request.config, request.image, request.end, cut, request.control))
        started = time.monotonic()
        outcomes = self._step(steps)
        model_seconds = time.monotonic() - started
        results: list[Rendered | Exception] = []
        for request, step, (state, output) in zip(requests, steps, outcomes):
            session = request.session
            if state is not None:
                session.state = state
            if isinstance(output, Exception):
                session.cut_pending = session.cut_pending or step.cut  # the next frame still starts afresh
                results.append(output)
                continue
            session.remember_source(state.frames_in - 1, request.stamp, request.seq)
            # Stream mode's warm-start renders (source −1) show the stream's first frame.
            stamp, seq = session.sources.get(max(output.source_index, 0), (request.stamp, request.seq))
            results.append(Rendered(output.image, stamp, seq, output.skipped, model_seconds))
        return results

    # -- idle sessions ------------------------------------------------------------------
    def sweep(self) -> None:
        """Release sessions idle for `release_after` (state to the CPU, on the scheduler's
        thread) and free those idle for the idle timeout."""
        for session in self.registry.release_idle():
            self.scheduler.call(lambda session=session: self._release(session))
        self.registry.evict_idle()

    @staticmethod
    def _release(session: Session) -> None:
        """Move an idle session's stream state (bank, latents, noise) off the GPU; the engine moves
        it back with its next frame."""
        if session.state is not None:
            session.state.to("cpu")

    def _sweep_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.sweep()
            except SchedulerClosed:
                return

    def _finish(self, ticket: Ticket, request: FrameRequest) -> None:
        """Encode a finished render and record it (on the finishing thread)."""
        job = ticket.job
        error = job.future.exception()
        if error is not None:
            ticket.future.set_exception(error)
            return
        rendered = job.future.result()
        started = time.monotonic()
        try:
            jpeg = encode_render(rendered.image)
            encoded = dataclasses.replace(rendered, jpeg=jpeg, encode_seconds=time.monotonic() - started)
            request.session.recorder.add(jpeg, request.sketch, job.finished)
            if request.session.feed is not None:  # the pop-out view shows the same JPEG: no second render
                request.session.feed.publish(jpeg)
        except Exception as error:  # noqa: BLE001 - not swallowed: whoever waits on the ticket gets it
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(encoded)

    def _translate_on_device(self, config: StreamConfig, source: str) -> Iterator[np.ndarray]:
        """Renders of the first MAX_VIDEO_FRAMES frames of `source` (a path: it pickles)."""
        frames, _ = read_video(source)
        limited = (frame for _, frame in zip(range(MAX_VIDEO_FRAMES), frames))
        yield from self.engine.translate(self.engine.new_stream(config), limited)

    def warm_up(self) -> None:
        """Render one blank frame on a throwaway stream, so the first visitor does not wait."""
        blank = np.full((self.base.height, self.base.width, 3), 255, np.uint8)
        (_, output), = self.scheduler.call(lambda: self._step([Step(None, self.base, blank, end=True)])).result()
        if isinstance(output, Exception):
            raise output

    # -- per-visitor operations ---------------------------------------------
    def submit(self, session_id: str, image: np.ndarray, config: StreamConfig, *, stamp: float = 0.0,
               seq: int = 0, end: bool = True, cut: bool = False, jpeg: bytes | None = None,
               control: np.ndarray | None = None) -> Ticket:
        """Queue one canvas frame of a visitor (newest wins); the ticket's future gives a `Rendered`.

        The frame is resized here, on the caller's thread, while the model may
        still be busy with the previous one.  jpeg: the JPEG `image` was decoded
        from, if it came as one (recorded as the sketch as it is).  control:
        the ControlNet's control source (the canvas's ink layer); ignored
        when the engine has no ControlNet.  Raises `Busy` when every place is
        taken (ui.sessions).
        """
        self.sweep()
        session = self.registry.admit(session_id)
        frame = resize(image, config.width, config.height)
        control = resize(control, config.width, config.height) if control is not None and self.controlled else None
        session.last_frame, session.last_seq, session.last_control = frame, seq, control
        if cut:
            session.cut_pending = True
        sketch = frame if jpeg is None else jpeg
        request = FrameRequest(session, frame, config, stamp, seq, end, sketch, control)
        ticket = Ticket(self.scheduler.submit(session_id, request), Future())
        ticket.job.future.add_done_callback(lambda _: self._finishing.submit(self._finish, ticket, request))
        return ticket

    def render(self, session_id: str, image: np.ndarray, config: StreamConfig, *,
               stamp: float = 0.0, seq: int = 0, end: bool = True, cut: bool = False,
               control: np.ndarray | None = None) -> Rendered:
        """Render one canvas frame for a visitor and record it.

        Raises `Superseded` when a newer frame of the same visitor replaced it first.
        """
        return self.submit(session_id, image, config, stamp=stamp, seq=seq, end=end, cut=cut,
                           control=control).future.result()

    def rerender(self, session_id: str) -> Rendered | None:
        """Render the visitor's newest frame again with their current settings (None: nothing drawn)."""
        session = self.registry.get(session_id)
        if session.last_frame is None:
            return None
        return self.render(session_id, session.last_frame, self.config_of(session_id), seq=session.last_seq,
                           control=session.last_control)

    def set_config(self, session_id: str, config: StreamConfig) -> None:
        """The settings the visitor's page shows now (used by the fast channel)."""
        self.registry.get(session_id).config = config

    def config_of(self, session_id: str) -> StreamConfig:
        return self.registry.get(session_id).config or self.base

    def reset_bank(self, session_id: str) -> bool:
        """Empty the visitor's feature bank; False when nothing was rendered yet."""
        session = self.registry.get(session_id)

        def reset() -> bool:
            if session.state is None:
                return False
            session.state.reset_bank()
            return True

        return self.scheduler.call(reset).result()

    def view_token(self, session_id: str) -> str:
        """The unguessable token of the visitor's pop-out view link (ui.popout), made on first use."""
        return self.views.token_for(self.registry.get(session_id))

    def close_session(self, session_id: str | None) -> None:
        """The visitor left: drop their waiting frame and free their stream and recording."""
        if session_id:
            self.scheduler.cancel(session_id)
        self.registry.close(session_id)

    def recorded(self, session_id: str) -> int:
        recorder = self.registry.get(session_id).recorder
        self._finishing.submit(lambda: None).result()  # frames rendered so far are in
        return len(recorder)

    def clear_recording(self, session_id: str) -> None:
        recorder = self.registry.get(session_id).recorder
        self._finishing.submit(recorder.clear).result()

    def export(self, session_id: str, fmt: str, pace: str, side_by_side: bool) -> Path:
        """The visitor's recording as a video file in the session's folder."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        if pace not in EXPORT_PACES:
            raise ValueError(f"pace must be one of {', '.join(EXPORT_PACES)}, got {pace!r}")
        with self.registry.hold(session_id) as session:  # not freed for idleness while it exports
            recorder = session.recorder
            count = self.recorded(session_id)
            folder = recorder.folder / "exports"
            folder.mkdir(exist_ok=True)
            name = f"streamv2v-{pace}{'-side-by-side' if side_by_side else ''}-{count}.{fmt}"
            return export_video(recorder, folder / name, pace=pace, side_by_side=bool(side_by_side))

    def translate_video(self, source: str, config: StreamConfig, destination: Path,
                        progress: Callable[[int, int], None] = lambda done, total: None) -> Path:
        """Translate a short video file with a fresh stream; VideoError/ValueError on bad input.

        Each frame is one task on the scheduler, so canvases keep rendering
        between the video's frames.
        """
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
        if self.controlled:  # a video has no ink layer: condition on its edges
            config = config.replace(control_image="canny")
        renders = self._translate(config, source)
        try:
            with VideoWriter(destination, fps=info.fps) as writer:
                done = 0
                while (image := self.scheduler.call(lambda: next(renders, None)).result()) is not None:
                    writer.write(image)
                    done += 1
                    progress(done, info.frame_count)
        finally:
            self.scheduler.call(renders.close).result()
        return destination
