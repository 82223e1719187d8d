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
calls.  Should that call raise anyway (say, out of GPU memory for the
batch), each of its frames is rendered again on its own, so the culprit
gets its error and the others their renders.  Stream mode's end-of-stroke
flush runs per stream afterwards.

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
from .renderer import RendererBusy, RenderStats, SessionLost, StepReply, StepRequest
from .scheduler import RenderScheduler

T = TypeVar("T")

log = logging.getLogger("sv2v.renderer")

# Frames per tick by default; more sessions than this take turns (see docs/performance.md for the choice).
MAX_BATCH = 8
# Of a GPU's free memory after the model is loaded, what the sessions may use;
# the rest is for the activations of a render and the allocator's slack.
SESSION_MEMORY_SHARE = 0.8


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
    own, so a bad frame fails only itself; the rest render in one `engine.render` call, each again on its
    own should that call raise (say, out of memory for the batch).  Room:
    at most `max_sessions` sessions hold a stream (None: no limit); when
    full, a session unused for longer than `idle_timeout` seconds is
    reclaimed for a newcomer, an active one never is.
    """

    def __init__(self, engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                 worker: str = "local", clock: Callable[[], float] = time.monotonic,
                 max_batch: int = MAX_BATCH) -> None:
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
            self._worker_streams = WorkerStreams(self._step_on_device, Step, engine)  # the worker's copy is used
            self._crossing = Crossing(on_gpu(self._worker_streams.run, duration=gpu_seconds))
            self._on_device = self._crossing.steps
            self._translate_on_device = self._translation_in_chunks
        else:
            self._on_device = self._step_on_device
            self._translate_on_device = self._translation
        # Snapshots are decoded when the scheduler takes them, several at once on these threads.
        self._decoder = ThreadPoolExecutor(max_workers=max(1, min(max_batch, os.cpu_count() or 1)),
                                           thread_name_prefix="sv2v-decode")
        self.scheduler = RenderScheduler(self._run_batch, max_batch=max_batch)

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
            for state in (stream.state, stream.compare_state) if stream is not None else ():
                if state is not None:
                    state.to("cpu")  # the engine moves it back with its next frame

        self.scheduler.call(release)

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
        self._decoder.shutdown(wait=True)
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
        started = time.monotonic()
        outcomes = self._on_device([entry[2] for entry in ready]) if ready else []
        seconds = time.monotonic() - started
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
                results[index] = StepReply(output.image, output.source_index, state.frames_in - 1, output.skipped,
                                           seconds, stream.epoch, self.worker, decode_seconds)
        for index, image in compared.items():  # a failed comparison fails its step: the page asked for both
            if isinstance(results[index], StepReply):
                results[index] = image if isinstance(image, Exception) else \
                    dataclasses.replace(results[index], compare_image=image)
        return results

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
                results[index] = error                   # replay: this frame only
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


def local_renderer(engine, *, max_sessions: int | None = None, idle_timeout: float = 1800.0,
                   worker: str = "local", base: StreamConfig | None = None,
                   max_batch: int = MAX_BATCH) -> InProcessRenderer:
    """The in-process renderer around `engine`: the one function both the app
    (`python app.py`) and every Ray replica use to make theirs.

    max_sessions: a cap on sessions (None: none).  On a CUDA device with a
    `base` config the cap is also bounded by the memory one stream of `base`
    takes (`memory_cap`), so a GPU never runs out for lack of admission.
    """
    if base is not None and engine.device.type == "cuda" and not zero_gpu():  # ZeroGPU: no GPU here
        cap = memory_cap(engine, base)
        log.info("memory allows %d sessions on %s", cap, engine.device)
        max_sessions = cap if max_sessions is None else min(max_sessions, cap)
    return InProcessRenderer(engine, max_sessions=max_sessions, idle_timeout=idle_timeout, worker=worker,
                             max_batch=max_batch)


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
