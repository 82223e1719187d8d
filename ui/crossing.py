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

A video's translation goes through the same GPU function, chunk by chunk
(`VideoChunk`): its stream crosses both ways with every chunk, which its
VIDEO_CHUNK frames share.

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
class Call:
    """One stream's part of a GPU call: its key and version (calls it has had), the renderer's step
    (a ui.local_renderer.Step without its state: the worker puts in the one it holds), and, when the
    worker must rebuild the stream (`restore`), the checkpoint (None: a fresh stream) and the calls
    made since."""

    key: str
    version: int
    step: object
    want_state: bool = False
    restore: bool = False
    checkpoint: object = None
    since: tuple = ()

    def light(self) -> "Call":
        """This call as it is kept to run again: without a checkpoint or calls of its own."""
        return replace(self, want_state=False, restore=False, checkpoint=None, since=())


@dataclass
class Answer:
    """A stream's result: its render (an Output, or the exception of that frame), the inputs it has
    had, and its full state (on the CPU) when the call asked for it."""

    output: object
    frames_in: int
    state: object = None


@dataclass
class VideoChunk:
    """Frames of a video's translation, with its stream (None: not started) and progress."""

    config: StreamConfig
    frames: list
    end: bool
    state: object = None
    progress: Translation = field(default_factory=Translation)


@dataclass
class VideoAnswer:
    images: list
    state: object
    progress: Translation


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
                    want_state=len(self.since) + 1 >= CHECKPOINT_EVERY)

    def restoring(self, call: Call) -> Call:
        return replace(call, restore=True, checkpoint=self.checkpoint, since=tuple(self.since))

    def took(self, call: Call, answer: Answer) -> None:
        self.version += 1
        self.frames_in = answer.frames_in
        if answer.state is not None:
            self.checkpoint, self.since = answer.state, []
        else:
            self.since.append(call.light())


def gpu_seconds(work) -> int:
    """The seconds a GPU call asks for: BASE_SECONDS, and SECONDS_PER_PASS per UNet pass of its
    frames (replays and restores included), at most MAX_SECONDS."""
    if isinstance(work, VideoChunk):
        passes = (len(work.frames) + (work.config.steps if work.end else 0)) * work.config.steps
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
            held = self._held.get(call.key)
            if call.restore:
                state = self._rebuilt(call)
            elif held is not None and held[0] == call.version:
                state = held[1]
            elif call.version == 0:
                state = None
            else:
                continue
            found.append((index, state))
        steps = [replace(calls[i].step, state=state) for i, state in found]
        for (index, _), (state, output) in zip(found, self._step_fn(steps) if steps else []):
            call = calls[index]
            self._keep(call.key, call.version + 1, state)
            answers[index] = Answer(output, 0 if state is None else state.frames_in,
                                    _on_cpu(state) if call.want_state and state is not None else None)
        return answers

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

    def _video(self, chunk: VideoChunk) -> VideoAnswer:
        state = chunk.state if chunk.state is not None else self._engine.new_stream(chunk.config)
        images = self._engine.translate_chunk(state, chunk.progress, chunk.frames, chunk.end)
        return VideoAnswer(images, state.to("cpu"), chunk.progress)


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
                if answer is MISS:
                    raise RuntimeError("the GPU worker did not take a stream it was sent in full")
                answers[index] = answer
        for handle, call, answer in zip(handles, calls, answers):
            handle.took(call, answer)
        return [(handle, answer.output) for handle, answer in zip(handles, answers)]

    def translation(self, config: StreamConfig, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The images of a video's translation, VIDEO_CHUNK frames per GPU call."""
        frames = iter(frames)
        state, progress = None, Translation()
        while True:
            chunk = list(itertools.islice(frames, VIDEO_CHUNK))
            end = len(chunk) < VIDEO_CHUNK
            answer = self._gpu(VideoChunk(config, chunk, end, state, progress))
            state, progress = answer.state, answer.progress
            yield from answer.images
            if end:
                return
