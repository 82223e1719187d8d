"""A renderer: what owns the sessions' streams, wherever the model runs.

The app keeps what is the visitor's (the recording, the exports, the page's
settings); a renderer keeps what lives next to the model: each session's
stream state (feature bank, frames in flight, fixed noise, prompt
embeddings).  Two back ends implement the same interface:

- `InProcessRenderer` (this module): the engine and the app's
  `RenderScheduler` in this process.  `python app.py` uses it.
- `RayRenderer` (ui.ray_renderer): `CanvasWorker` replicas on Ray Serve,
  each of which runs an `InProcessRenderer` made by `local_renderer`, the
  same function the app uses, over its own sessions.

Per session: `open` (admission: `RendererBusy` when there is no room),
`step` (render the next frame; at most one frame waits per session and a
newer one replaces it, failing the older one's future with `Superseded`),
`reset` (empty the bank), `close` (free the stream).

A `StepRequest` carries everything needed to (re)start the stream from
nothing: the frame and the settings, the seed among them.  A `StepReply`
carries the *epoch* of the stream state that rendered it: a new epoch means
the stream was started afresh (a warm start on another worker after a
failure, or after its state was reclaimed), so the bank is empty and the
input indices count from 0 again.  The app compares epochs to tell the page
"render restarted".

Strict epochs (what the Ray back end sends): a request naming an epoch is
rendered only by that same stream; if this renderer holds no stream for the
session, or another one, it raises `SessionLost` unless the request says
`restart`, in which case a fresh stream warm-starts with this frame.  A
request with no epoch continues whatever stream the session has, or starts
one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

import numpy as np
import torch

from sv2v_core.config import StreamConfig

from .gpu import ZERO_GPU, on_gpu
from .scheduler import RenderScheduler

T = TypeVar("T")

log = logging.getLogger("sv2v.renderer")

# Of a GPU's free memory after the model is loaded, what the sessions may use;
# the rest is for the activations of a render and the allocator's slack.
SESSION_MEMORY_SHARE = 0.8


class RendererBusy(RuntimeError):
    """No room for another session: every worker is full of active sessions."""


class SessionLost(RuntimeError):
    """This renderer does not hold the stream the request names (its worker
    restarted, the state was reclaimed, or the request reached a worker that
    does not own the session); a request with `restart` warm-starts it."""


@dataclass(frozen=True)
class StepRequest:
    """One frame of a session, with what is needed to restart its stream.

    frame: RGB uint8 (height, width, 3) at the config's size.
    config: the stream's settings (prompt, size, strength, steps, seed, bank...).
    end: the last frame of a stroke: render it to convergence (a flush in
        stream mode).
    cut: the picture was replaced (cleared, new background): empty the bank
        before this frame.
    epoch: the stream this frame continues (None: the session's stream,
        whichever it is, or a new one); see the module docstring.
    restart: when the named stream is not here, start a fresh one.
    """

    frame: np.ndarray
    config: StreamConfig
    end: bool = True
    cut: bool = False
    epoch: str | None = None
    restart: bool = False


@dataclass(frozen=True)
class StepReply:
    """A render.

    image: RGB uint8 (height, width, 3).
    source_index, input_index: which input of the stream (0-based, counted
        from the start of `epoch`) the render shows and which one this
        request's frame became; they differ in stream mode.
    skipped: the previous render was re-emitted (a near-identical input).
    model_seconds: time the model spent on this step.
    epoch: the stream state that rendered it.
    worker: which worker rendered it ("local", or a replica's id).
    """

    image: np.ndarray
    source_index: int
    input_index: int
    skipped: bool
    model_seconds: float
    epoch: str
    worker: str


class Renderer(Protocol):
    """What the app needs from whatever owns the streams."""

    name: str

    def open(self, session_id: str) -> None:
        """Make room for a session (nothing if it has a stream); RendererBusy when full."""

    def step(self, session_id: str, request: StepRequest) -> Future:
        """Render the session's next frame; a Future of a StepReply (Superseded, RendererBusy, ValueError...)."""

    def reset(self, session_id: str) -> Future:
        """Empty the session's feature bank; a Future of whether it had a stream."""

    def close(self, session_id: str) -> None:
        """The session ended: drop its waiting frame and free its stream."""

    def sessions(self) -> int:
        """Sessions holding room now."""

    def shutdown(self) -> None:
        """Stop; what is waiting fails."""


@dataclass
class _Stream:
    """A session's room in an InProcessRenderer: its state is made by its first frame."""

    epoch: str
    state: Any = None
    last_used: float = 0.0
    cut_pending: bool = False


@dataclass
class _Step:
    session_id: str
    request: StepRequest
    accepted: float = field(default_factory=time.monotonic)


class InProcessRenderer:
    """The engine and one render scheduler in this process.

    All model work runs on the scheduler's thread (ui.scheduler).  Room:
    at most `max_sessions` sessions hold a stream (None: no limit); when
    full, a session unused for longer than `idle_timeout` seconds is
    reclaimed for a newcomer, an active one never is.
    """

    def __init__(self, engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                 worker: str = "local", clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.name = "in-process"
        self.engine = engine
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.worker = worker
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._epochs = itertools.count()
        self._epoch_prefix = uuid.uuid4().hex[:8]  # epochs stay unique across workers and restarts
        self._on_device = on_gpu(self._step_on_device)
        self.scheduler = RenderScheduler(self._run_step)

    # -- room -----------------------------------------------------------------------
    def open(self, session_id: str) -> None:
        with self._lock:
            self._room(session_id)

    def _room(self, session_id: str) -> _Stream:
        """The session's stream record, made if there is room (under the lock)."""
        now = self._clock()
        stream = self._streams.get(session_id)
        if stream is None:
            if self.max_sessions is not None and len(self._streams) >= self.max_sessions:
                idle = [sid for sid, s in self._streams.items() if now - s.last_used > self.idle_timeout]
                if not idle:
                    raise RendererBusy(f"all {self.max_sessions} render slots are taken by active sessions; "
                                       "try again in a moment")
                oldest = min(idle, key=lambda sid: self._streams[sid].last_used)
                log.info("reclaiming idle session %s for %s", oldest, session_id)
                self._drop(oldest)
            stream = self._streams[session_id] = _Stream(f"{self._epoch_prefix}-{next(self._epochs)}")
        stream.last_used = now
        return stream

    def _drop(self, session_id: str) -> None:
        stream = self._streams.pop(session_id, None)
        if stream is not None:
            stream.state = None  # the tensors go with the last reference

    def sessions(self) -> int:
        with self._lock:
            return len(self._streams)

    def holds(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._streams

    def epoch_of(self, session_id: str) -> str | None:
        with self._lock:
            stream = self._streams.get(session_id)
            return None if stream is None else stream.epoch

    def stream_state(self, session_id: str):
        """The session's engine state (None before its first frame); for tests and measurements."""
        with self._lock:
            stream = self._streams.get(session_id)
            return None if stream is None else stream.state

    # -- per session ------------------------------------------------------------------
    def step(self, session_id: str, request: StepRequest) -> Future:
        if request.cut:  # even if this frame is replaced by a newer one, the next frame that runs cuts
            with self._lock:
                stream = self._streams.get(session_id)
                if stream is not None:
                    stream.cut_pending = True
        return self.scheduler.submit(session_id, _Step(session_id, request)).future

    def reset(self, session_id: str) -> Future:
        def reset() -> bool:
            with self._lock:
                stream = self._streams.get(session_id)
            if stream is None or stream.state is None:
                return False
            stream.state.reset_bank()
            return True

        return self.scheduler.call(reset)

    def close(self, session_id: str) -> None:
        self.scheduler.cancel(session_id)
        with self._lock:
            self._drop(session_id)

    def call(self, fn: Callable[[], T]) -> Future:
        """Run `fn` on the render thread (warm-up, video frames); never dropped."""
        return self.scheduler.call(fn)

    def shutdown(self) -> None:
        self.scheduler.close()
        with self._lock:
            for session_id in list(self._streams):
                self._drop(session_id)

    # -- on the render thread -------------------------------------------------------------
    def _run_step(self, step: _Step) -> StepReply:
        request = step.request
        with self._lock:
            stream = self._streams.get(step.session_id)
            if request.epoch is not None and (stream is None or stream.epoch != request.epoch):
                if stream is not None:  # another stream of this session: stale, whatever sent this
                    self._drop(step.session_id)
                if not request.restart:
                    raise SessionLost(f"session {step.session_id} has no stream {request.epoch} on {self.worker}")
            stream = self._room(step.session_id)
            cut, stream.cut_pending = stream.cut_pending or request.cut, False
        started = time.monotonic()
        state, output = self._on_device(stream.state, request.config, request.frame, request.end, cut)
        stream.state = state
        return StepReply(output.image, output.source_index, state.frames_in - 1, output.skipped,
                         time.monotonic() - started, stream.epoch, self.worker)

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


def local_renderer(engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                   worker: str = "local", base: StreamConfig | None = None) -> InProcessRenderer:
    """The in-process renderer around `engine`: the one function both the app
    (`python app.py`) and every Ray replica use to make theirs.

    max_sessions: a cap on sessions (None: none).  On a CUDA device with a
    `base` config the cap is also bounded by the memory one stream of `base`
    takes (`memory_cap`), so a GPU never runs out for lack of admission.
    """
    if base is not None and engine.device.type == "cuda":
        cap = memory_cap(engine, base)
        log.info("memory allows %d sessions on %s", cap, engine.device)
        max_sessions = cap if max_sessions is None else min(max_sessions, cap)
    return InProcessRenderer(engine, max_sessions=max_sessions, idle_timeout=idle_timeout, worker=worker)


def state_nbytes(state) -> int:
    """Bytes of a stream's tensors (bank, frames in flight, noise, prompt, schedule)."""
    tensors = [state.noise, state.in_flight, state.prompt_embeds, state.negative_embeds, state.last_latent,
               state.in_flight_control, state.last_control, *state.schedule.values()]
    return state.bank.nbytes() + sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_cap(engine, base: StreamConfig, frames: int = 6) -> int:
    """How many streams of `base` fit in the CUDA device's free memory.

    One stream is run for `frames` frames (its bank and frames in flight
    filled); a session costs its state's bytes, and the peak of that render
    above the start is kept free for the activations of a render.
    """
    device = engine.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    state = engine.new_stream(base)
    frame = np.full((base.height, base.width, 3), 255, np.uint8)
    for _ in range(frames):
        engine(state, frame)
    engine.flush(state)
    torch.cuda.synchronize(device)
    per_session = max(state_nbytes(state), 1)
    activations = torch.cuda.max_memory_allocated(device) - start - per_session
    del state
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int((free * SESSION_MEMORY_SHARE - activations) // per_session))
