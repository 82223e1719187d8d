"""What the app does, without any Gradio: render, reset, export, translate.

`CanvasService` joins a renderer (ui.renderer: what owns each visitor's
stream, next to the model: the engine and its scheduler in this process,
ui.local_renderer, or CanvasWorker replicas on a Ray cluster,
ui.ray_renderer) with a `SessionRegistry` (each visitor's recording,
settings and the epoch of their stream).  It uses the renderer only
through the contract.  The transports (ui.live and its adapters) turn what
pages send into calls here.  A render whose stream epoch differs from the
session's last one comes from a stream started afresh (its worker died or
reclaimed it): it is marked `restarted`, and the page says so.

Render mode.  In stream mode every render shows the snapshot sent
steps − 1 renders earlier, so under flow control its latency is about
`steps` × its per-call time plus the path, always more than latency mode's
`steps` batch-1 calls; it can only win renders per second, and only when
the model, not the drawing nor the page, is what limits them.  People
drawing on live canvases complain most about lag behind their strokes, so
the canvas renders in latency mode; `--render-mode stream` remains for
hosts that prefer smoothness on a slow GPU (the measurements behind this:
docs/performance.md).  The page still sends "end" with the last snapshot
of a stroke and the renderer flushes it, so stream mode also converges to
the last stroke.  Whole videos, where throughput is what counts, are
translated in stream mode.

A settings change re-renders the session's newest frame (`rerender`).
When the bank's settings changed (mode, EA, FF) or the compare view was
turned on, the re-render replays the session's recent frames first, from
an empty bank (ui.renderer's replay): a fresh bank is empty, so the change
would otherwise show only frames later; with the replay the render shown
is the drawing as that bank renders it while drawing.  While the compare
view is on, every frame also renders on a second stream of the session
with the bank off (same frames, same replay); its picture travels beside
the render (`Rendered.compare_image`), for the page alone: the recording
and the pop-out view keep the render with the page's settings.

Many artists on one GPU: the renderer batches the sessions' frames
(ui.local_renderer).  Webcam frames are canvas frames (same mailbox, same
batches).  Each finished render is encoded to JPEG once, on a "finishing"
thread, and that JPEG is what the page gets, what the recording keeps and
what the session's pop-out view shows (ui.feeds).

Stopping (`stop`, then `close`): new frames, exports and videos are refused
with "the server is stopping"; exports in progress get EXPORT_GRACE_SECONDS
to finish (their files are written under a temporary name and renamed when
complete), then every session goes with its recording's folder.

Admission (ui.sessions): a frame is only queued for an admitted session;
otherwise `submit` raises `Busy` ("busy: N people ahead of you").  A
sweeper thread, and every submit, releases sessions idle for
`release_after` seconds (the renderer moves their state to the CPU, freeing
GPU memory and their place; the next frame continues the stream) and frees
sessions idle for the idle timeout (the renderer drops their streams).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.images import fit_size, resize
from sv2v_core.video import VideoWriter, probe_video

from .feeds import ViewLinks
from .inputs import EncodedFrame
from .local_renderer import MAX_BATCH, local_renderer
from .recording import EXPORT_FORMATS, EXPORT_PACES, export_video
from .renderer import Renderer, RendererClosed, RenderStats, StepReply, StepRequest
from .sessions import Drawn, Session, SessionRegistry
from .settings import served_variants
from .wire import encode_render

STOPPING = "the server is stopping"
EXPORT_GRACE_SECONDS = 10.0  # on closing, exports in progress get this long to finish
MAX_VIDEO_SECONDS = 20.0
MAX_VIDEO_FRAMES = 600
SWEEP_SECONDS = 5.0

log = logging.getLogger("sv2v.service")


@dataclass(frozen=True)
class Rendered:
    """A render for the page.

    image: the picture, and `jpeg` the same as JPEG (what both channels send
    and the recording keeps); stamp, seq: the page clock and sequence number
    of the snapshot it shows (an older one than the one just sent, in stream
    mode); skipped: the previous render re-emitted; model_seconds: time on
    the model's thread; encode_seconds: time making the JPEG; restarted: the
    session's stream was started afresh for this render (its bank empty);
    decode_seconds: time decoding the snapshot, when the model took it.
    compare_image, compare_jpeg: the same frame rendered without the bank
    (the compare view; None and b"" when it is off); notice: what the page
    should say with it (ui.renderer's `StepReply.notice`), or None.
    """

    image: np.ndarray
    stamp: float
    seq: int
    skipped: bool
    model_seconds: float = 0.0
    jpeg: bytes = b""
    encode_seconds: float = 0.0
    restarted: bool = False
    decode_seconds: float = 0.0
    compare_image: np.ndarray | None = None
    compare_jpeg: bytes = b""
    notice: str | None = None


def without_bank(config: StreamConfig) -> StreamConfig:
    """The compare view's other side: the same settings with the bank off (plain StreamDiffusion)."""
    return config.replace(bank_mode="none")


@dataclass(frozen=True)
class FrameRequest:
    """What finishing a frame's render needs: whose it is, which snapshot it was, and what to record as
    the sketch beside the render (the frame itself, or the file bytes it came as: no encoding then)."""

    session: Session
    stamp: float
    seq: int
    sketch: np.ndarray | bytes


@dataclass
class Ticket:
    """A queued frame: the renderer's `reply` (a StepReply) and the `future`
    of the finished `Rendered` (encoded and recorded)."""

    reply: Future
    future: Future
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    answered: float | None = None

    @property
    def wait_seconds(self) -> float:
        """Time from submitting to the model starting on it (its turn, and the trip to a worker)."""
        if self.answered is None or self.reply.exception() is not None:
            return 0.0
        reply = self.reply.result()
        return max(0.0, self.answered - self.submitted - reply.model_seconds - reply.decode_seconds)


class CanvasService:
    """The app's behaviour for every visitor, around one renderer.

    renderer: None for the in-process one around `engine` (all model work on
    its scheduler's one thread, in batches of up to `max_batch` frames), or
    another back end (ui.ray_renderer; `engine` is None then).  released_memory:
    the in-process renderer's cap on the host memory of idle sessions' streams
    (bytes; None: none).  Snapshots are
    queued still encoded and decoded by the renderer when the model takes
    them (only the newest of a session's waiting ones ever is); pictures that
    come decoded are resized by the calling thread.  Each render is encoded
    to JPEG once and recorded for export on a separate "finishing" thread.
    """

    def __init__(self, engine, registry: SessionRegistry, base: StreamConfig, *, max_batch: int = MAX_BATCH,
                 sweep_seconds: float = SWEEP_SECONDS, renderer: Renderer | None = None,
                 released_memory: int | None = None):
        self.registry = registry
        self.base = base
        self.renderer = renderer if renderer is not None else local_renderer(engine, max_batch=max_batch,
                                                                             released_memory=released_memory)
        self.views = ViewLinks()
        registry.on_close = self.renderer.close  # an idle session's stream goes with its recording
        # One thread, so each session's frames are recorded in render order.
        self._finishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sv2v-finish")
        self._stop = threading.Event()
        self._stopping = False
        self._exports = 0  # exports in progress
        self._exports_done = threading.Condition()
        self._sweeper = threading.Thread(target=self._sweep_every, args=(sweep_seconds,), name="sv2v-sweeper",
                                         daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        """The server is stopping: new work (frames, exports, videos) is refused with RendererClosed;
        what is under way goes on until `close`."""
        self._stopping = True

    def _refuse_when_stopping(self) -> None:
        if self._stopping:
            raise RendererClosed(STOPPING)

    def close(self) -> None:
        """Stop the worker threads (what they are doing finishes first; exports in progress get up to
        EXPORT_GRACE_SECONDS) and free every session, their recordings' folders with them."""
        self.stop()
        with self._exports_done:
            if not self._exports_done.wait_for(lambda: self._exports == 0, EXPORT_GRACE_SECONDS):
                log.warning("closing with %d export(s) unfinished: their partial files go with the sessions",
                            self._exports)
        self._stop.set()
        self.renderer.shutdown()
        self._finishing.shutdown(wait=True)
        self._sweeper.join(timeout=SWEEP_SECONDS)
        self.registry.close_all()

    @property
    def controlled(self) -> bool:
        """Whether the model has a ControlNet (the page then sends its ink layer as the control source)."""
        return self.renderer.controlled

    # -- idle sessions ------------------------------------------------------------------
    def sweep(self) -> None:
        """Release sessions idle for `release_after` (state to the CPU, on the scheduler's
        thread) and free those idle for the idle timeout."""
        for session in self.registry.release_idle():
            self.renderer.release(session.session_id)
        self.registry.evict_idle()

    def _sweep_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.sweep()
            except RendererClosed:
                return

    # -- finishing a render (on the finishing thread) ----------------------------------
    def _rendered(self, request: FrameRequest, reply: StepReply) -> Rendered:
        """The render for the page: which snapshot it shows, and whether its stream restarted."""
        session = request.session
        restarted = session.epoch is not None and reply.epoch != session.epoch
        if reply.epoch != session.epoch:  # input indices count from 0 again
            session.sources.clear()
            session.epoch = reply.epoch
        session.remember_source(reply.input_index, request.stamp, request.seq)
        # Stream mode's warm-start renders (source −1) show the stream's first frame.
        stamp, seq = session.sources.get(max(reply.source_index, 0), (request.stamp, request.seq))
        return Rendered(reply.image, stamp, seq, reply.skipped, reply.model_seconds, restarted=restarted,
                        decode_seconds=reply.decode_seconds, compare_image=reply.compare_image,
                        notice=reply.notice)

    def _finish(self, ticket: Ticket, request: FrameRequest) -> None:
        """Encode a finished render and record it (on the finishing thread)."""
        error = ticket.reply.exception()
        if error is not None:
            ticket.future.set_exception(error)
            return
        rendered = self._rendered(request, ticket.reply.result())
        started = time.monotonic()
        try:
            jpeg = encode_render(rendered.image)
            compare_jpeg = b"" if rendered.compare_image is None else encode_render(rendered.compare_image)
            encoded = dataclasses.replace(rendered, jpeg=jpeg, compare_jpeg=compare_jpeg,
                                          encode_seconds=time.monotonic() - started)
            request.session.recorder.add(jpeg, request.sketch, ticket.answered)
            if request.session.feed is not None:  # the pop-out view shows the same JPEG: no second render
                request.session.feed.publish(jpeg)
        except Exception as error:  # noqa: BLE001 - not swallowed: whoever waits on the ticket gets it
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(encoded)

    def warm_up(self) -> None:
        """Get the renderer ready for the canvas's streams (every setting of the page that changes the
        model's call shapes: ui.settings.served_variants), so nobody waits for it later."""
        self.renderer.warm_up(served_variants(self.base, controlled=self.controlled))

    def stats(self) -> RenderStats:
        """The renderer's counters (frames rendered and dropped, batch sizes...), for the benchmarks."""
        return self.renderer.stats()

    # -- per-visitor operations ---------------------------------------------
    def submit(self, session_id: str, image: np.ndarray | EncodedFrame, config: StreamConfig, *, stamp: float = 0.0,
               seq: int = 0, end: bool = True, cut: bool = False, control: np.ndarray | None = None,
               replay: tuple[Drawn, ...] = (), again: bool = False) -> Ticket:
        """Queue one canvas frame of a visitor (newest wins); the ticket's future gives a `Rendered`.

        image: a picture (resized here, on the caller's thread, while the
        model may still be busy with the previous one), or an `EncodedFrame`
        (a snapshot as it came, with its ink layer: the renderer decodes it
        when the model takes it, and its bytes are recorded as the sketch as
        they are).  control: the ControlNet's control source of a picture (the
        canvas's ink layer); ignored when the engine has no ControlNet.
        replay: frames to run through the stream first, from an empty bank;
        again: the frame is the session's newest one again (both:
        `rerender`).  With the compare view on, the frame also renders
        without the bank.  Raises `Busy` when every place is taken
        (ui.sessions).
        """
        self._refuse_when_stopping()
        self.sweep()
        session = self.registry.admit(session_id)
        if isinstance(image, EncodedFrame):
            frame, control, sketch = image, None, image.image
        else:
            frame = sketch = resize(image, config.width, config.height)
            control = resize(control, config.width, config.height) if control is not None and self.controlled else None
        if not again:
            session.recent.append(Drawn(frame, control, seq))
        session.rendered_with = (config.bank, session.compare)
        request = FrameRequest(session, stamp, seq, sketch)
        step = StepRequest(frame, config, end=end, cut=cut, control=control,
                           replay=tuple((drawn.frame, drawn.control) for drawn in replay),
                           compare=without_bank(config) if session.compare else None)
        ticket = Ticket(self.renderer.step(session_id, step), Future())

        def answered(_) -> None:
            ticket.answered = time.monotonic()
            self._finishing.submit(self._finish, ticket, request)

        ticket.reply.add_done_callback(answered)
        return ticket

    def render(self, session_id: str, image: np.ndarray | EncodedFrame, config: StreamConfig, *,
               stamp: float = 0.0, seq: int = 0, end: bool = True, cut: bool = False,
               control: np.ndarray | None = None, replay: tuple[Drawn, ...] = (), again: bool = False) -> Rendered:
        """Render one canvas frame for a visitor and record it.

        Raises `Superseded` when a newer frame of the same visitor replaced it first.
        """
        return self.submit(session_id, image, config, stamp=stamp, seq=seq, end=end, cut=cut,
                           control=control, replay=replay, again=again).future.result()

    def rerender(self, session_id: str) -> Rendered | None:
        """Render the visitor's newest frame again with their current settings (None: nothing drawn).

        After a change of the bank's settings, or with the compare view just
        turned on, the visitor's recent frames are replayed first (see the
        module docstring).
        """
        session = self.registry.get(session_id)
        latest = session.latest
        if latest is None:
            return None
        config = self.config_of(session_id)
        bank, compared = session.rendered_with or (None, False)
        replay = tuple(session.recent)[:-1] if config.bank != bank or (session.compare and not compared) else ()
        return self.render(session_id, latest.frame, config, seq=latest.seq, control=latest.control,
                           replay=replay, again=True)

    def set_config(self, session_id: str, config: StreamConfig, *, compare: bool = False) -> None:
        """The settings the visitor's page shows now (used by the fast channel), and whether its compare
        view is on."""
        session = self.registry.get(session_id)
        session.config, session.compare = config, compare

    def config_of(self, session_id: str) -> StreamConfig:
        return self.registry.get(session_id).config or self.base

    def reset_bank(self, session_id: str) -> bool:
        """Empty the visitor's feature bank; False when nothing was rendered yet."""
        self.registry.get(session_id)
        return self.renderer.reset(session_id).result()

    def cancel(self, session_id: str) -> None:
        """Drop the visitor's waiting frame (their connection went away); the stream stays."""
        self.renderer.cancel(session_id)

    def view_token(self, session_id: str) -> str:
        """The unguessable token of the visitor's pop-out view link (ui.popout), made on first use."""
        return self.views.token_for(self.registry.get(session_id))

    def close_session(self, session_id: str | None) -> None:
        """The visitor left: drop their waiting frame and free their stream and recording."""
        if session_id:
            self.renderer.close(session_id)
        self.registry.close(session_id)

    def recorded(self, session_id: str) -> int:
        recorder = self.registry.get(session_id).recorder
        self._finishing.submit(lambda: None).result()  # frames rendered so far are in
        return len(recorder)

    def clear_recording(self, session_id: str) -> None:
        recorder = self.registry.get(session_id).recorder
        self._finishing.submit(recorder.clear).result()

    def export(self, session_id: str, fmt: str, pace: str, side_by_side: bool, keep_pauses: bool = False) -> Path:
        """The visitor's recording as a video file in the session's folder (keep_pauses: at the real pace,
        pauses stay as long as they were; by default they are shortened, ui.recording)."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        if pace not in EXPORT_PACES:
            raise ValueError(f"pace must be one of {', '.join(EXPORT_PACES)}, got {pace!r}")
        self._refuse_when_stopping()
        with self._exports_done:
            self._exports += 1
        try:
            with self.registry.hold(session_id) as session:  # not freed for idleness while it exports
                recorder = session.recorder
                count = self.recorded(session_id)
                folder = recorder.folder / "exports"
                folder.mkdir(exist_ok=True)
                name = f"streamv2v-{pace}{'-side-by-side' if side_by_side else ''}-{count}.{fmt}"
                return export_video(recorder, folder / name, pace=pace, side_by_side=bool(side_by_side),
                                    keep_pauses=bool(keep_pauses))
        finally:
            with self._exports_done:
                self._exports -= 1
                self._exports_done.notify_all()

    def translate_video(self, source: str, config: StreamConfig, destination: Path,
                        progress: Callable[[int, int], None] = lambda done, total: None) -> Path:
        """Translate a short video file with a fresh stream; VideoError/ValueError on bad input.

        The renderer renders every frame (none dropped) in stream mode, for
        throughput, while canvases keep rendering (ui.renderer's `translate`).
        """
        self._refuse_when_stopping()
        info = probe_video(source)
        seconds = info.frame_count / float(info.fps)
        if seconds > MAX_VIDEO_SECONDS or info.frame_count > MAX_VIDEO_FRAMES:
            raise ValueError(
                f"the video is {seconds:.1f} s ({info.frame_count} frames); the limit is "
                f"{MAX_VIDEO_SECONDS:.0f} s and {MAX_VIDEO_FRAMES} frames"
            )
        width, height = fit_size(info.width, info.height, max(self.base.width, self.base.height),
                                   self.renderer.size_multiple)
        config = dataclasses.replace(config, width=width, height=height, mode="stream")
        if self.controlled:  # a video has no ink layer: condition on its edges
            config = config.replace(control_image="canny")
        renders = self.renderer.translate(source, config, MAX_VIDEO_FRAMES)
        with contextlib.closing(renders), VideoWriter(destination, fps=info.fps) as writer:
            for done, image in enumerate(renders, start=1):
                writer.write(image)
                progress(done, info.frame_count)
        return destination
