"""What crosses the process boundary per ZeroGPU call, and as little as it can.

On ZeroGPU the model work runs in a worker process (`spaces.GPU`, ui.gpu):
its arguments and results are pickled, changes to its arguments are lost,
and the worker persists between calls until the platform replaces it.  So
the streams stay in the worker (`WorkerStreams`, owned by the renderer
object that the worker holds a copy of), keyed by a stream key with a
version number (the calls the stream has had), and a call carries only
each stream's frame, settings and key and version (`Call`); it brings back
the render and the stream's frame count (`Answer`).

The main process keeps, per stream, a `HeldStream`: its key and version, a
checkpoint (the stream's full state as of some version, on the CPU; None:
a fresh stream) and the calls made since.  Every CHECKPOINT_EVERY calls a
stream's answer also brings its full state back, which becomes the new
checkpoint.  A worker that does not hold a stream at the version asked for
(a new worker, or one that let it go) answers MISS; the same call goes
again with the checkpoint and the calls since, which the worker runs first,
unshown.  So a lost worker costs at most a replay of CHECKPOINT_EVERY − 1
frames, and any call may meet a new worker.

A video's translation goes through the same GPU function, VIDEO_CHUNK
frames a call (`VideoChunk`), as a held stream of its own: a chunk carries
its frames in and brings their images out, and the stream (with where the
translation stands) comes back only every CHECKPOINT_EVERY chunks; a new
worker is sent the checkpoint and the chunks since, which it translates
again unshown.  The worker lets the stream go with the last chunk.

`gpu_seconds` is the duration each call asks ZeroGPU for: it grows with the
UNet calls the work needs (frames × steps), instead of the platform's
60-second default that a visitor's quota must cover.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.engine import Translation

CHECKPOINT_EVERY = 8   # a stream's full state comes back to the main process every this many calls
VIDEO_CHUNK = 8        # video frames per GPU call
HELD_STREAMS = 64      # streams the worker keeps at most (the least recently used go first)
# Seconds asked of ZeroGPU per call: a floor for the call itself, then per UNet pass (a frame's step)
# a bound well above what an SD1.5 UNet pass at 512² takes on the GPU, and a cap.
BASE_SECONDS = 5.0
SECONDS_PER_PASS = 0.25
MAX_SECONDS = 120


class _Miss:
    """The worker does not hold the stream at the version asked for."""

    def __repr__(self) -> str:
        return "MISS"

    def __reduce__(self):
        return "MISS"


MISS = _Miss()


@dataclass
class HeldWork:
    """Work on a stream the worker holds: the stream's key and version (calls it has had), whether
    its full state should come back, and, when the worker must rebuild the stream (`restore`), the
    checkpoint (None: a fresh stream) and the work done since."""

    key: str
    version: int
    want_state: bool = field(default=False, kw_only=True)
    restore: bool = field(default=False, kw_only=True)
    checkpoint: object = field(default=None, kw_only=True)
    since: tuple = field(default=(), kw_only=True)

    def light(self):
        """This work as it is kept to run again: without a checkpoint or work of its own."""
        return replace(self, want_state=False, restore=False, checkpoint=None, since=())


@dataclass
class Call(HeldWork):
    """One stream's part of a GPU call: the renderer's step (a ui.local_renderer.Step without its
    state: the worker puts in the one it holds)."""

    step: object


@dataclass
class Answer:
    """A stream's result: its render (an Output, or the exception of that frame), the inputs it has
    had, and its full state (on the CPU) when the call asked for it."""

    output: object
    frames_in: int
    state: object = None


@dataclass
class VideoChunk(HeldWork):
    """A chunk of a video's translation: its settings and frames (`end`: the video ends with them);
    its checkpoint is a `VideoStream`."""

    config: StreamConfig
    frames: list
    end: bool


@dataclass
class VideoStream:
    """A video's stream in the worker: its state and where its translation stands."""

    state: object
    progress: Translation = field(default_factory=Translation)


@dataclass
class VideoAnswer:
    """A chunk's images, and the video's stream (on the CPU) when the chunk asked for it."""

    images: list
    state: VideoStream | None = None


class HeldStream:
    """The main process's handle on a stream the GPU worker holds.

    It stands where the renderer keeps a stream's state: `frames_in` (as of
    its last answer), `reset_bank()` (the next call empties the bank) and
    `to()` (nothing to move: the worker has the tensors)."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        self.version = 0
        self.checkpoint = None  # the state at `version − len(since)`; None: fresh
        self.since: list[Call] = []
        self.frames_in = 0
        self.cut_next = False

    def reset_bank(self) -> None:
        self.cut_next = True

    def to(self, device) -> "HeldStream":
        return self

    def call(self, step) -> Call:
        """The call for a renderer Step on this stream."""
        cut, self.cut_next = step.cut or self.cut_next, False
        return Call(self.key, self.version, replace(step, state=None, cut=cut),
                    want_state=self._checkpoint_due())

    def chunk(self, config: StreamConfig, frames: list) -> VideoChunk:
        """The call for a video's next chunk (the last one when it is short of VIDEO_CHUNK frames)."""
        return VideoChunk(self.key, self.version, config, frames, end=len(frames) < VIDEO_CHUNK,
                          want_state=self._checkpoint_due())

    def restoring(self, work: HeldWork) -> HeldWork:
        """`work` with what rebuilds the stream in a worker that does not hold it."""
        return replace(work, restore=True, checkpoint=self.checkpoint, since=tuple(self.since))

    def took(self, work: HeldWork, answer: Answer | VideoAnswer) -> None:
        self.version += 1
        if isinstance(answer, Answer):
            self.frames_in = answer.frames_in
        if answer.state is not None:
            self.checkpoint, self.since = answer.state, []
        else:
            self.since.append(work.light())

    def _checkpoint_due(self) -> bool:
        return len(self.since) + 1 >= CHECKPOINT_EVERY


def gpu_seconds(work) -> int:
    """The seconds a GPU call asks for: BASE_SECONDS, and SECONDS_PER_PASS per UNet pass of its
    frames (replays and restores included), at most MAX_SECONDS."""
    if isinstance(work, VideoChunk):
        frames = len(work.frames) + sum(len(done.frames) for done in work.since)
        passes = (frames + (work.config.steps if work.end else 0)) * work.config.steps
    else:
        passes = 0
        for call in work:
            step = call.step
            frames = 1 + len(step.replay) + sum(1 + len(done.step.replay) for done in call.since)
            passes += (frames + (step.config.steps if step.end else 0)) * step.config.steps
    return int(min(MAX_SECONDS, BASE_SECONDS + SECONDS_PER_PASS * passes))


class WorkerStreams:
    """The streams the GPU worker holds, by key: (version, state), the least recently used let go
    beyond `capacity`.  `run` is the body of the one GPU function."""

    def __init__(self, step_fn: Callable[[list], list], engine, capacity: int = HELD_STREAMS) -> None:
        self._step_fn = step_fn  # the renderer's batch on the device: Steps -> [(state, output)]
        self._engine = engine
        self._capacity = capacity
        self._held: OrderedDict[str, tuple[int, object]] = OrderedDict()

    def run(self, work):
        if isinstance(work, VideoChunk):
            return self._video(work)
        return self._steps(work)

    def _steps(self, calls: Sequence[Call]) -> list[Answer | _Miss]:
        answers: list[Answer | _Miss] = [MISS] * len(calls)
        found: list[tuple[int, object]] = []
        for index, call in enumerate(calls):
            state = self._stream_for(call, self._rebuilt, fresh=lambda: None)
            if state is not MISS:
                found.append((index, state))
        steps = [replace(calls[i].step, state=state) for i, state in found]
        for (index, _), (state, output) in zip(found, self._step_fn(steps) if steps else []):
            call = calls[index]
            self._keep(call.key, call.version + 1, state)
            answers[index] = Answer(output, 0 if state is None else state.frames_in,
                                    _on_cpu(state) if call.want_state and state is not None else None)
        return answers

    def _stream_for(self, work: HeldWork, rebuilt: Callable, fresh: Callable):
        """The stream `work` goes on: `rebuilt(work)` for a restore, the one held at its version, a
        `fresh()` one at version 0; MISS when the worker does not hold it."""
        held = self._held.get(work.key)
        if work.restore:
            return rebuilt(work)
        if held is not None and held[0] == work.version:
            return held[1]
        if work.version == 0:
            return fresh()
        return MISS

    def _rebuilt(self, call: Call) -> object:
        """The stream as of `call.version`: its checkpoint, then the calls since, run again unshown."""
        state = None if call.checkpoint is None else copy.deepcopy(call.checkpoint)
        for done in call.since:
            (state, _), = self._step_fn([replace(done.step, state=state)])
        return state

    def _keep(self, key: str, version: int, state) -> None:
        self._held[key] = (version, state)
        self._held.move_to_end(key)
        while len(self._held) > self._capacity:
            self._held.popitem(last=False)

    def _video(self, chunk: VideoChunk) -> VideoAnswer | _Miss:
        stream = self._stream_for(chunk, self._rebuilt_video,
                                  fresh=lambda: VideoStream(self._engine.new_stream(chunk.config)))
        self._held.pop(chunk.key, None)  # kept again below unless the video ends or fails
        if stream is MISS:
            return MISS
        images = self._engine.translate_chunk(stream.state, stream.progress, chunk.frames, chunk.end)
        if chunk.end:  # the video is done: let its stream go
            return VideoAnswer(images)
        self._keep(chunk.key, chunk.version + 1, stream)
        if not chunk.want_state:
            return VideoAnswer(images)
        return VideoAnswer(images, VideoStream(_on_cpu(stream.state), copy.deepcopy(stream.progress)))

    def _rebuilt_video(self, chunk: VideoChunk) -> VideoStream:
        """The video's stream as of `chunk.version`: its checkpoint, then the chunks since, translated
        again unshown."""
        if chunk.checkpoint is None:
            stream = VideoStream(self._engine.new_stream(chunk.config))
        else:
            stream = copy.deepcopy(chunk.checkpoint)
        for done in chunk.since:
            self._engine.translate_chunk(stream.state, stream.progress, done.frames, done.end)
        return stream


def _on_cpu(state):
    """A copy of `state` on the CPU, to send back (the worker goes on with its own)."""
    return copy.deepcopy(state).to("cpu")


class Crossing:
    """The main process's side: renderer Steps in, (HeldStream, output) pairs out, through the one
    GPU function `gpu` (WorkerStreams.run in the worker); and a video's translation, chunk by chunk."""

    def __init__(self, gpu: Callable) -> None:
        self._gpu = gpu

    def steps(self, steps: Sequence) -> list[tuple[HeldStream, object]]:
        handles = [step.state if isinstance(step.state, HeldStream) else HeldStream() for step in steps]
        calls = [handle.call(step) for handle, step in zip(handles, steps)]
        answers = list(self._gpu(calls))
        missed = [index for index, answer in enumerate(answers) if answer is MISS]
        if missed:  # a new worker: these streams go again, with what rebuilds them
            again = self._gpu([handles[index].restoring(calls[index]) for index in missed])
            for index, answer in zip(missed, again):
                answers[index] = _taken(answer)
        for handle, call, answer in zip(handles, calls, answers):
            handle.took(call, answer)
        return [(handle, answer.output) for handle, answer in zip(handles, answers)]

    def translation(self, config: StreamConfig, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The images of a video's translation, VIDEO_CHUNK frames per GPU call."""
        frames, handle = iter(frames), HeldStream()
        while True:
            chunk = handle.chunk(config, list(itertools.islice(frames, VIDEO_CHUNK)))
            answer = self._gpu(chunk)
            if answer is MISS:  # a new worker: the chunk goes again, with what rebuilds the stream
                answer = _taken(self._gpu(handle.restoring(chunk)))
            handle.took(chunk, answer)
            yield from answer.images
            if chunk.end:
                return


def _taken(answer):
    """An answer to work sent with all that rebuilds its stream, which a worker cannot miss."""
    if answer is MISS:
        raise RuntimeError("the GPU worker did not take a stream it was sent in full")
    return answer
