"""The in-process renderer: the engine and one render scheduler in this process.

`InProcessRenderer` implements the renderer contract (ui.renderer) around
an engine: every piece of its model work runs on one `RenderScheduler`
thread (ui.scheduler), which hands it each tick's newest frames of up to
`max_batch` sessions as one batch.  `local_renderer` makes one: both the
app (`python app.py`) and every Ray replica (ui.ray_renderer) use it.

Decode on take: a snapshot waits in the mailbox still encoded (an
`EncodedFrame`, ui.inputs); the tick decodes the frames it takes, at their
render size, several at once on decoding threads, before the model runs.
So a snapshot that a newer one replaces before its turn costs no decode,
and one that cannot be decoded fails alone with its `ImageError`.

A batch is rendered in one call of the device function (on ZeroGPU, one
`spaces.GPU` call through ui.crossing, whose worker keeps the streams, and
a stream's state here is a `HeldStream` handle; the video's translation
goes through that same function, a chunk of frames per call): each stream is configured (created, reconfigured, its bank
emptied at a cut) and its frame checked (`engine.prepare`) on its own, so
bad settings or a bad picture fail only that frame; the rest render in one
`engine.render` call, which stacks compatible streams into shared UNet
calls.  Stream mode's end-of-stroke flush runs per stream afterwards.

Faults.  Before that call each stream's position is checkpointed
(`StreamState.checkpoint`); should the call raise, every stream is put
back (no input counted twice, nothing the failed call recorded kept in a
bank) before anything is rendered again:
- out of GPU memory: the batch cap (`batch_cap`, at most `max_batch`) is
  halved, the batch is rendered again in parts of that size, the
  scheduler takes at most that many frames per tick, the pages of that
  tick get a notice and the log a warning; after `GROW_AFTER_TICKS`
  ticks without running out, the cap doubles again, up to `max_batch`.
  A single frame that does not fit fails alone;
- a device fault other than that (a CUDA error, a device-side assert):
  no retry can help, so the tick's frames fail with `DeviceFault`, the
  renderer takes no more work and calls `on_device_fault` (the app exits
  then, so that whatever supervises it starts it afresh);
- anything else: each frame is rendered again on its own, so the culprit
  alone gets its error and the others their renders.
A model call that runs longer than `stall_seconds` is logged, with the
sessions it renders, while it runs (`StallWatch`).

A request's replay (ui.renderer) runs on its stream alone, after emptying
the bank and before its frame.  A request with comparison settings adds a
second step to the batch: the same frame on the session's comparison
stream (made on its first use, freed by the first request without one).

A video is translated as a series of tasks, one frame each between ticks:
its frames must never be dropped (newest-wins would), and a video's stream
(stream mode, the video's aspect) never shares a batch with the canvases'
anyway.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from sv2v_core.config import StreamConfig
from sv2v_core.images import ImageError
from sv2v_core.video import read_video

from .crossing import Crossing, WorkerStreams, gpu_seconds
from .gpu import on_gpu, zero_gpu
from .inputs import EncodedFrame
from .renderer import DeviceFault, RendererBusy, RenderStats, SessionLost, StepReply, StepRequest
from .scheduler import RenderScheduler

T = TypeVar("T")

log = logging.getLogger("sv2v.renderer")

# Frames per tick by default; more sessions than this take turns (see docs/performance.md for the choice).
MAX_BATCH = 8
# Of a GPU's free memory after the model is loaded, what the sessions may use;
# the rest is for the activations of a render and the allocator's slack.
SESSION_MEMORY_SHARE = 0.8
# What a page is told when its idle session's stream was freed to keep the host's memory bounded.
FREED_NOTICE = "your session was idle and its stream was freed; starting afresh"
GROW_AFTER_TICKS = 50  # ticks without running out of memory before a lowered batch cap doubles again
STALL_SECONDS = 10.0  # a model call running longer than this is logged as stalled
# What a device error that is not running out of memory says (no retry helps: the process must restart).
DEVICE_FAULT_MARKS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
                      "CUDNN_STATUS", "cuDNN error", "unspecified launch failure")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` is a device failure other than running out of memory (not worth a retry)."""
    if isinstance(error, DeviceFault):
        return True
    if not isinstance(error, RuntimeError) or is_out_of_memory(error):
        return False
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or any(
        mark in str(error) for mark in DEVICE_FAULT_MARKS)


def device_fault(error: BaseException) -> DeviceFault:
    """The DeviceFault the pages get for `error`."""
    return DeviceFault(f"the GPU failed ({' '.join(str(error).split())[:200]}); the server is restarting")


class StallWatch:
    """Logs a model call that runs longer than `seconds` (once, while it runs), with its sessions."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._call: list | None = None  # [started, session ids, reported]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sv2v-stall-watch", daemon=True)
        self._thread.start()

    def begin(self, sessions: Sequence[str]) -> None:
        with self._lock:
            self._call = [time.monotonic(), list(sessions), False]

    def end(self) -> None:
        with self._lock:
            call, self._call = self._call, None
        if call is not None and call[2]:
            log.warning("the stalled model call for sessions %s finished after %.1f s",
                        ", ".join(call[1]), time.monotonic() - call[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            with self._lock:
                call = self._call
                if call is None or call[2] or time.monotonic() - call[0] <= self.seconds:
                    continue
                call[2] = True
            log.warning("a model call has run for over %.1f s: stalled? (sessions %s)", self.seconds,
                        ", ".join(call[1]))


@dataclass
class Step:
    """One stream's part of a batch on the device: its state (None: not created yet), the
    settings, the frame (at the render size), a stroke's end (flush), a cut (empty the bank)
    and a replay (empty the bank, then render these (frame, control) pairs first, unshown)."""

    state: object
    config: StreamConfig
    frame: np.ndarray
    end: bool = False
    cut: bool = False
    control: np.ndarray | None = None
    replay: tuple = ()


@dataclass
class _Stream:
    """A session's room in an InProcessRenderer: its state is made by its first frame; its
    comparison stream's state by the first frame asking for a comparison."""

    epoch: str
    state: Any = None
    compare_state: Any = None
    last_used: float = 0.0
    cut_pending: bool = False
    released_at: float | None = None  # when its states were moved to the host (None: in use)
    released_bytes: int = 0           # what they hold there
    freed: bool = False               # its released states were freed: its next render says so


@dataclass
class _Step:
    session_id: str
    request: StepRequest
    accepted: float = field(default_factory=time.monotonic)


class InProcessRenderer:
    """The engine and one render scheduler in this process.

    All model work runs on the scheduler's thread (ui.scheduler), each
    tick's frames (up to `max_batch`) in one batch: the frames that came
    encoded are decoded then (decode on take: a frame replaced before its
    turn never is), each stream is configured and its frame checked on its
    own, so a bad frame fails only itself; the rest render in one `engine.render` call (its faults: the
    module docstring).  Room:
    at most `max_sessions` sessions hold a stream (None: no limit); when
    full, a session unused for longer than `idle_timeout` seconds is
    reclaimed for a newcomer, an active one never is.
    """

    def __init__(self, engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                 worker: str = "local", clock: Callable[[], float] = time.monotonic,
                 max_batch: int = MAX_BATCH, stall_seconds: float = STALL_SECONDS,
                 released_memory: int | None = None) -> None:
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.name = "in-process"
        self.engine = engine
        self.size_multiple = engine.size_multiple  # render sides must be multiples of it
        self.controlled = getattr(engine, "controlnet", None) is not None
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.worker = worker
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._epochs = itertools.count()
        self._epoch_prefix = uuid.uuid4().hex[:8]  # epochs stay unique across workers and restarts
        if zero_gpu():  # one GPU function; the streams stay in its worker (ui.crossing)
            self._worker_streams = WorkerStreams(self._step_on_device, engine)  # the worker's copy is used
            self._crossing = Crossing(on_gpu(self._worker_streams.run, duration=gpu_seconds))
            self._on_device = self._crossing.steps
            self._translate_on_device = self._translation_in_chunks
        else:
            self._on_device = self._step_on_device
            self._translate_on_device = self._translation
        # Snapshots are decoded when the scheduler takes them, several at once on these threads.
        self._decoder = ThreadPoolExecutor(max_workers=max(1, min(max_batch, os.cpu_count() or 1)),
                                           thread_name_prefix="sv2v-decode")
        self.released_memory = released_memory  # bytes the released sessions' states may hold (None: no cap)
        self.max_batch = max_batch
        self.batch_cap = max_batch  # lowered while batches run out of GPU memory (the module docstring)
        self._calm_ticks = 0  # ticks in a row without running out of memory
        self.grow_after = GROW_AFTER_TICKS
        self.device_fault: DeviceFault | None = None  # set by a device fault: no more work is taken
        self.on_device_fault: Callable[[DeviceFault], None] | None = None  # the app's exit
        self._stalls = StallWatch(stall_seconds)
        self.scheduler = RenderScheduler(self._run_batch, max_batch=max_batch)

    @property
    def stall_seconds(self) -> float:
        """A model call running longer than this is logged as stalled, with its sessions."""
        return self._stalls.seconds

    @stall_seconds.setter
    def stall_seconds(self, seconds: float) -> None:
        self._stalls.seconds = seconds

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
            stream.state = stream.compare_state = None  # the tensors go with the last reference

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

    def compare_state(self, session_id: str):
        """The engine state of the session's comparison stream (None: not comparing); for tests."""
        with self._lock:
            stream = self._streams.get(session_id)
            return None if stream is None else stream.compare_state

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
            for state in (stream.state, stream.compare_state):
                if state is not None:
                    state.reset_bank()
            return True

        return self.scheduler.call(reset)

    def cancel(self, session_id: str) -> None:
        self.scheduler.cancel(session_id)

    def release(self, session_id: str) -> None:
        def release() -> None:
            with self._lock:
                stream = self._streams.get(session_id)
            if stream is None:
                return
            states = [state for state in (stream.state, stream.compare_state) if state is not None]
            for state in states:
                state.to("cpu")  # the engine moves it back with its next frame
            with self._lock:
                if self._streams.get(session_id) is stream and stream.released_at is None:
                    stream.released_at = self._clock()
                    stream.released_bytes = sum(state_nbytes(state) for state in states)
                    self._bound_released()

        self.scheduler.call(release)

    def released_bytes(self) -> int:
        """Host memory the released sessions' stream states hold now."""
        with self._lock:
            return sum(stream.released_bytes for stream in self._streams.values())

    def _bound_released(self) -> None:
        """Free the oldest released streams while they hold more than `released_memory` (under the lock)."""
        if self.released_memory is None:
            return
        released = sorted((s for s in self._streams.values() if s.released_at is not None and s.released_bytes),
                          key=lambda s: s.released_at)
        total = sum(stream.released_bytes for stream in released)
        for stream in released:
            if total <= self.released_memory:
                return
            total -= stream.released_bytes
            log.info("freeing an idle session's stream (%.1f MiB) to keep released streams under %.1f MiB",
                     stream.released_bytes / 2**20, self.released_memory / 2**20)
            stream.state = stream.compare_state = None
            stream.released_bytes, stream.freed = 0, True
            stream.epoch = f"{self._epoch_prefix}-{next(self._epochs)}"  # a fresh stream: indices from 0

    def close(self, session_id: str) -> None:
        self.scheduler.cancel(session_id)
        with self._lock:
            self._drop(session_id)

    def warm_up(self, configs: Sequence[StreamConfig]) -> None:
        """Prepare the engine for streams of these settings (`engine.warm_up`: serving graphs for every
        bucket of their call shapes, then frozen, so no frame waits for a compile), then render one blank
        frame of the first on a throwaway stream, so the first visitor does not wait.  On the render
        thread, where the frames will run (CUDA graphs are the recording thread's)."""
        configs = list(configs)
        blank = np.full((configs[0].height, configs[0].width, 3), 255, np.uint8)

        def warm():
            started = time.monotonic()
            self.engine.warm_up(configs, freeze=True)
            outcome = self._on_device([Step(None, configs[0], blank, end=True)])
            log.info("warm-up done in %.1f s", time.monotonic() - started)
            return outcome

        (_, output), = self.scheduler.call(warm).result()
        if isinstance(output, Exception):
            raise output

    def translate(self, source: str, config: StreamConfig, max_frames: int) -> Iterator[np.ndarray]:
        """Renders of a video's frames, in the config's mode (stream mode for throughput), one task each,
        so canvases keep rendering between them."""
        renders = self._translate_on_device(config, source, max_frames)
        try:
            while (image := self.scheduler.call(lambda: next(renders, None)).result()) is not None:
                yield image
        finally:
            self.scheduler.call(renders.close).result()

    def _translation(self, config: StreamConfig, source: str, max_frames: int) -> Iterator[np.ndarray]:
        """Renders of the first `max_frames` frames of `source` (a path: it pickles, for ZeroGPU)."""
        frames, _ = read_video(source)
        limited = (frame for _, frame in zip(range(max_frames), frames))
        yield from self.engine.translate(self.engine.new_stream(config), limited)

    def _translation_in_chunks(self, config: StreamConfig, source: str, max_frames: int) -> Iterator[np.ndarray]:
        """On ZeroGPU: `_translation`'s renders, through the one GPU function a chunk of frames at a
        time (the video decoded on this thread only: the GPU worker may be forked meanwhile)."""
        frames, _ = read_video(source, threaded=False)
        yield from self._crossing.translation(config, itertools.islice(frames, max_frames))

    def call(self, fn: Callable[[], T]) -> Future:
        """Run `fn` on the render thread, never dropped (for tests and measurements)."""
        return self.scheduler.call(fn)

    def stats(self) -> RenderStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self.scheduler.close()
        self._decoder.shutdown(wait=True, cancel_futures=True)
        self._stalls.close()
        with self._lock:
            for session_id in list(self._streams):
                self._drop(session_id)

    # -- on the render thread -------------------------------------------------------------
    def _stream_for(self, step: _Step) -> tuple[_Stream, bool]:
        """The stream a step renders on (epoch rules, room) and whether it cuts; SessionLost/RendererBusy."""
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
            stream.released_at, stream.released_bytes = None, 0  # in use again
        return stream, cut

    def _run_batch(self, steps: list[_Step]) -> list[StepReply | Exception]:
        """Render one tick's frames (the scheduler's `run_batch`): a StepReply or an exception each."""
        results: list[StepReply | Exception | None] = [None] * len(steps)
        # (index of the step, its stream, the device step, whether it is the comparison stream's, decode seconds)
        ready: list[tuple[int, _Stream, Step, bool, float]] = []
        for index, (step, (request, decode_seconds)) in enumerate(zip(steps, self._decoded(steps))):
            if isinstance(request, ImageError):  # its picture cannot be read: this frame alone fails
                results[index] = request
                continue
            try:
                stream, cut = self._stream_for(step)
            except (SessionLost, RendererBusy) as error:
                results[index] = error
                continue
            ready.append((index, stream, Step(stream.state, request.config, request.frame, request.end, cut,
                                              request.control, request.replay), False, decode_seconds))
            if request.compare is None:
                stream.compare_state = None
            else:
                ready.append((index, stream, Step(stream.compare_state, request.compare, request.frame, request.end,
                                                  cut, request.control, request.replay), True, 0.0))
        started, cap = time.monotonic(), self.batch_cap
        self._stalls.begin(sorted({steps[entry[0]].session_id for entry in ready}))
        try:
            outcomes = self._on_device([entry[2] for entry in ready]) if ready else []
        except DeviceFault as fault:
            self._stop_for(fault)
            return [fault] * len(steps)
        finally:
            self._stalls.end()
        seconds = time.monotonic() - started
        notice = self._paced(lowered=self.batch_cap < cap)
        compared: dict[int, np.ndarray | Exception] = {}
        for (index, stream, device, comparison, decode_seconds), (state, output) in zip(ready, outcomes):
            if comparison:
                if state is not None:
                    stream.compare_state = state
                compared[index] = output if isinstance(output, Exception) else output.image
                continue
            if state is not None:
                stream.state = state
            if isinstance(output, Exception):
                with self._lock:
                    stream.cut_pending = stream.cut_pending or device.cut  # the next frame still starts afresh
                results[index] = output
            else:
                freed, stream.freed = stream.freed, False
                results[index] = StepReply(output.image, output.source_index, state.frames_in - 1, output.skipped,
                                           seconds, stream.epoch, self.worker, decode_seconds,
                                           notice=FREED_NOTICE if freed else notice)
        for index, image in compared.items():
            if not isinstance(results[index], StepReply):
                continue
            if isinstance(image, Exception):  # the render goes out alone, and the page says why
                log.warning("the comparison of session %s failed: %s", steps[index].session_id, image)
                results[index] = dataclasses.replace(
                    results[index], notice=f"the comparison could not be rendered ({image}); showing the render alone")
            else:
                results[index] = dataclasses.replace(results[index], compare_image=image)
        return results

    def _paced(self, *, lowered: bool) -> str | None:
        """After a tick: the notice for its pages if it lowered the batch cap; a cap lowered long enough ago
        grows back (doubling, up to `max_batch`)."""
        if lowered:
            self._calm_ticks = 0
            self.scheduler.max_batch = self.batch_cap
            log.warning("the GPU ran out of memory for a batch: rendering at most %d frames at a time",
                        self.batch_cap)
            return f"the GPU ran out of memory: rendering {self.batch_cap} at a time"
        if self.batch_cap < self.max_batch:
            self._calm_ticks += 1
            if self._calm_ticks >= self.grow_after:
                self._calm_ticks = 0
                self.batch_cap = self.scheduler.max_batch = min(self.max_batch, self.batch_cap * 2)
                log.info("no batch ran out of memory for %d ticks: rendering up to %d frames at a time",
                         self.grow_after, self.batch_cap)
        return None

    def _stop_for(self, fault: DeviceFault) -> None:
        """A device fault: take no more work (what waits fails with RendererClosed) and tell the app."""
        if self.device_fault is not None:
            return
        self.device_fault = fault
        log.error("device fault, not retried: %s; the renderer takes no more work and the app exits for a "
                  "restart", fault.__cause__ or fault)
        self.scheduler.close()
        if self.on_device_fault is not None:
            self.on_device_fault(fault)

    def _decoded(self, steps: list[_Step]) -> list[tuple[StepRequest | ImageError, float]]:
        """Each step's request with its `EncodedFrame` decoded at its render size (the ink layer only with
        a ControlNet), or the `ImageError` of that picture; and the seconds decoding took.  Several are
        decoded at once on the decoding threads (PIL lets go of the interpreter lock)."""
        encoded = sum(isinstance(step.request.frame, EncodedFrame) for step in steps)
        if encoded > 1:
            return list(self._decoder.map(self._decode, [step.request for step in steps]))
        return [self._decode(step.request) for step in steps]

    def _decode(self, request: StepRequest) -> tuple[StepRequest | ImageError, float]:
        """The request with its frame and its replay's frames decoded (a replay follows a bank change)."""
        encoded = [frame for frame, _ in request.replay if isinstance(frame, EncodedFrame)]
        if not isinstance(request.frame, EncodedFrame) and not encoded:
            return request, 0.0
        started = time.monotonic()
        size = (request.config.width, request.config.height)
        replay = []
        for frame, control in request.replay:
            if isinstance(frame, EncodedFrame):
                try:
                    frame, control = frame.decode(size, control=self.controlled)
                except ImageError:  # a snapshot that failed alone when it came is left out of the replay
                    continue
            replay.append((frame, control))
        try:
            image, control = (request.frame.decode(size, control=self.controlled)
                              if isinstance(request.frame, EncodedFrame) else (request.frame, request.control))
        except ImageError as error:
            return error, time.monotonic() - started
        return dataclasses.replace(request, frame=image, control=control, replay=tuple(replay)), time.monotonic() - started

    # -- the model work (one call per batch; on the GPU under ZeroGPU) -------------------
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
                if step.cut or step.replay:
                    step.state.reset_bank()
                for frame, control in step.replay:
                    self.engine.render([(step.state, frame, control)])
                self.engine.prepare(step.state, step.frame)
            except (ValueError, RuntimeError) as error:  # bad settings or picture (ImageError is one), a failed
                if is_device_fault(error):               # replay: this frame only; a device fault: all
                    raise device_fault(error) from error
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
                    if is_device_fault(error):
                        raise device_fault(error) from error
                    results[index] = error
                else:
                    results[index] = flushed[-1] if flushed else results[index]
        return [(step.state, output) for step, output in zip(steps, results)]

    def _configured(self, state, config: StreamConfig):
        if state is None:
            return self.engine.new_stream(config)
        if state.config != config:
            return self.engine.configure(state, config)
        return state

    def _render_together(self, steps: list[Step]) -> list:
        """Outputs of `engine.render` over `steps`, in parts of at most `batch_cap` (faults: the module
        docstring)."""
        outputs: list = []
        start = 0
        while start < len(steps):
            part = steps[start:start + self.batch_cap]
            outputs += self._render_part(part)
            start += len(part)
        return outputs

    def _render_part(self, steps: list[Step]) -> list:
        """Outputs of one `engine.render` over `steps`; if it raises, the streams are put back first, then
        halves (out of memory) or each on its own (another error) again; DeviceFault for a device fault."""
        saved = [step.state.checkpoint() for step in steps]
        try:
            return self.engine.render([(step.state, step.frame, step.control) for step in steps])
        except (ValueError, RuntimeError) as error:
            for step, checkpoint in zip(steps, saved):
                step.state.restore(checkpoint)  # nothing of the failed call counts
            if is_device_fault(error):
                raise device_fault(error) from error
            if len(steps) == 1:
                if is_out_of_memory(error):
                    return [RuntimeError("the GPU ran out of memory rendering this frame alone; "
                                         "try a smaller size or fewer steps")]
                return [error]
            if is_out_of_memory(error):  # halved, until it fits
                self.batch_cap = max(1, min(self.batch_cap, len(steps)) // 2)
                return self._render_together(steps)
        return [output for step in steps for output in self._render_part([step])]


def local_renderer(engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                   worker: str = "local", base: StreamConfig | None = None,
                   max_batch: int = MAX_BATCH, released_memory: int | None = None) -> InProcessRenderer:
    """The in-process renderer around `engine`: the one function both the app
    (`python app.py`) and every Ray replica use to make theirs.

    max_sessions: a cap on sessions (None: none).  On a CUDA device with a
    `base` config the cap is also bounded by the memory one stream of `base`
    takes (`memory_cap`), so a GPU never runs out for lack of admission.
    released_memory: a cap in bytes on the host memory that released
    (idle) sessions' streams hold; past it the oldest is freed, and its
    next frame starts a fresh stream with FREED_NOTICE (None: no cap).
    """
    if base is not None and engine.device.type == "cuda" and not zero_gpu():  # ZeroGPU: no GPU here
        cap = memory_cap(engine, base)
        log.info("memory allows %d sessions on %s", cap, engine.device)
        max_sessions = cap if max_sessions is None else min(max_sessions, cap)
    return InProcessRenderer(engine, max_sessions=max_sessions, idle_timeout=idle_timeout, worker=worker,
                             max_batch=max_batch, released_memory=released_memory)


def state_nbytes(state) -> int:
    """Bytes of a stream's tensors (bank, frames in flight, noise, prompt, schedule); a state of another
    engine (the echo engine's) says its own (`nbytes()`)."""
    if hasattr(state, "nbytes"):
        return state.nbytes()
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
