"""The renderer contract: what owns the sessions' streams, wherever the model runs.

The app keeps what is the visitor's (the recording, the exports, the page's
settings); a renderer keeps what lives next to the model: each session's
stream state (feature bank, frames in flight, fixed noise, prompt
embeddings).  This module is the contract alone: the `Renderer` protocol,
its requests and replies, its figures and its errors.  Two back ends
implement it:

- `InProcessRenderer` (ui.local_renderer): the engine and one
  `RenderScheduler` in this process, which renders each tick's frames of
  all sessions as one batch.  `python app.py` uses it.
- `RayRenderer` (ui.ray_renderer): `CanvasWorker` replicas on Ray Serve,
  each of which runs an `InProcessRenderer` over its own sessions.

Per session: `open` (admission: `RendererBusy` when there is no room),
`step` (render the next frame; newest wins: at most one frame waits per
session and a newer one replaces it, failing the older one's future with
`Superseded`, ui.mailbox; a frame that comes encoded is decoded only when
the model takes it, so a replaced one never is), `reset` (empty the bank), `release` (an idle
session's stream leaves the GPU; its next frame brings it back), `cancel`
(drop the waiting frame), `close` (free the stream).  For the app as a
whole: `warm_up` (every setting the page offers, before serving: the
model's serving graphs are made then, never mid-stroke), `translate` (a video's frames, none dropped), `stats`
(figures for the benchmarks) and `shutdown`; after it every call raises
`RendererClosed`.  A device fault no retry can fix (a CUDA error other than
out of memory) fails the frames with `DeviceFault`, and the renderer takes
no more work.  A reply may carry a `notice` for the page (the batch was
made smaller for memory, the comparison failed, an idle stream was freed).

A `StepRequest` carries everything needed to (re)start the stream from
nothing: the frame and the settings, the seed among them.  It may also
carry a *replay* (recent frames to run through the stream, from an empty
bank, before its frame: so that a bank setting shows at once what it does
while drawing) and the settings of a *comparison* stream: the same frames
(replay included) also render on a second stream of the session, the
page's compare view (the bank off); a request without them frees it.  A `StepReply`
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

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from sv2v_core.config import StreamConfig

from .inputs import EncodedFrame


class Superseded(Exception):
    """A newer frame of the same session replaced this one (or its page left) before it ran."""


class RendererClosed(RuntimeError):
    """The renderer was shut down (the app is shutting down)."""


class RendererBusy(RuntimeError):
    """No room for another session: every worker is full of active sessions."""


class DeviceFault(RuntimeError):
    """The device failed in a way no retry fixes (a CUDA error other than out of memory): the renderer
    takes no more work, and the app exits so that whatever supervises it starts it afresh."""


class SessionLost(RuntimeError):
    """This renderer does not hold the stream the request names (its worker
    restarted, the state was reclaimed, or the request reached a worker that
    does not own the session); a request with `restart` warm-starts it."""


@dataclass(frozen=True)
class StepRequest:
    """One frame of a session, with what is needed to restart its stream.

    frame: RGB uint8 (height, width, 3) at the config's size, or an
        `EncodedFrame` (picture and ink layer still encoded), which the
        renderer decodes at the config's size when the model takes it; one
        that cannot be decoded fails with `ImageError`.
    config: the stream's settings (prompt, size, strength, steps, seed, bank...).
    end: the last frame of a stroke: render it to convergence (a flush in
        stream mode).
    cut: the picture was replaced (cleared, new background): empty the bank
        before this frame.
    epoch: the stream this frame continues (None: the session's stream,
        whichever it is, or a new one); see the module docstring.
    restart: when the named stream is not here, start a fresh one.
    control: the ControlNet's control source for this frame (the canvas's
        ink layer; None: the frame itself); used only with a ControlNet.
    replay: (frame, control) pairs to render first, their renders unshown,
        after emptying the bank: the bank then holds what these frames give
        under `config`, as it would while drawing them.
    compare: the settings of the session's comparison stream, which renders
        the same frames (replay included); None: no comparison (a stream
        kept for one is freed).
    """

    frame: np.ndarray | EncodedFrame
    config: StreamConfig
    end: bool = True
    cut: bool = False
    control: np.ndarray | None = None
    epoch: str | None = None
    restart: bool = False
    replay: tuple[tuple[np.ndarray, np.ndarray | None], ...] = ()
    compare: StreamConfig | None = None


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
    decode_seconds: time decoding its `EncodedFrame` took (0: it came decoded).
    compare_image: the comparison stream's render of the same frame (None:
        the request asked for no comparison, or it failed: see `notice`).
    notice: what the person drawing should know about this render (the
        GPU ran out of memory and renders fewer frames at a time; the
        comparison failed; the session's stream was freed); None: nothing.
    """

    image: np.ndarray
    source_index: int
    input_index: int
    skipped: bool
    model_seconds: float
    epoch: str
    worker: str
    decode_seconds: float = 0.0
    compare_image: np.ndarray | None = None
    notice: str | None = None


@dataclass(frozen=True)
class RenderStats:
    """A renderer's counters since it started.

    submitted, rendered, dropped (superseded or cancelled), failed: frames;
    tasks: other work done on the model's thread; busy_seconds: time the
    model's thread worked; batches: batch size -> ticks that rendered that
    many frames.  A back end that cannot see its model's thread (Ray: the
    replicas have it) leaves busy_seconds and batches empty.
    """

    submitted: int = 0
    rendered: int = 0
    dropped: int = 0
    failed: int = 0
    tasks: int = 0
    busy_seconds: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)


class Renderer(Protocol):
    """What the app needs from whatever owns the streams."""

    name: str
    size_multiple: int  # render sides must be multiples of it
    controlled: bool    # the model has a ControlNet (steps may carry a control source)

    def open(self, session_id: str) -> None:
        """Make room for a session (nothing if it has a stream); RendererBusy when full."""

    def step(self, session_id: str, request: StepRequest) -> Future:
        """Render the session's next frame; a Future of a StepReply (Superseded, RendererBusy, ValueError...)."""

    def reset(self, session_id: str) -> Future:
        """Empty the session's feature banks; a Future of whether it had a stream."""

    def cancel(self, session_id: str) -> None:
        """Drop the session's waiting frame (its page went away); the stream stays."""

    def release(self, session_id: str) -> None:
        """The session is idle: move its stream off the GPU (its next frame brings it back)."""

    def close(self, session_id: str) -> None:
        """The session ended: drop its waiting frame and free its stream."""

    def sessions(self) -> int:
        """Sessions holding room now."""

    def warm_up(self, configs: Sequence[StreamConfig]) -> None:
        """Get ready to render streams of these settings (so the first visitor does not wait, and nobody
        waits for a compile later); ValueError if it cannot."""

    def translate(self, source: str, config: StreamConfig, max_frames: int) -> Iterator[np.ndarray]:
        """Renders of the first `max_frames` frames of the video file `source`, one per frame, none dropped,
        on a stream of their own at the config's size (VideoError for an unreadable file)."""

    def stats(self) -> RenderStats:
        """The counters now."""

    def shutdown(self) -> None:
        """Stop; what is waiting fails with RendererClosed."""
