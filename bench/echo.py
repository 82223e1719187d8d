"""A stand-in engine that returns its input, taking the time a GPU would.

`EchoEngine` has the public interface of `sv2v_core.StreamV2V` (new_stream,
configure, prepare, batch_key, render, __call__, flush, translate, warm_up,
size_multiple, close) but no model: a frame's render is the frame itself
(resized to the stream's size), after sleeping what the denoising would
cost.  The latency benchmark (bench.live) uses it to measure everything around
the model: with 0 ms it shows the app's own overhead, with 15 or 40 ms per
frame it plays a fast or a slower GPU.  The load test (bench.loadtest) uses its
batch cost: 8 ms per call + 3 ms per frame, a common estimate of an H100
running SD1.5 at 512².  Tests use it because its render shows exactly what
was drawn.

Cost model.  A `render` call with n frames of one group (equal `batch_key`:
size, steps, mode) costs `call_ms` + n × `frame_ms` in latency mode (the
frames' `steps` UNet calls, slept at once), and
`stream_cost` times that in stream mode, where one UNet call of batch
`steps` admits each frame.  The default `stream_cost` 0.5 is an assumption,
not a measurement: that a large GPU runs one batch-4 call of SD1.5 at 512²
in about half the time of four batch-1 calls (8 ms + 3 ms per image gives
0.45).  Groups with different keys are separate calls, as in the real
engine.  Stream mode also lags like the real engine: a call returns the
frame admitted steps − 1 calls earlier, and `flush` repeats the newest frame
until it has come out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from sv2v_core import images
from sv2v_core.config import StreamConfig
from sv2v_core.stream import Output


@dataclass(frozen=True)
class EchoComponents:
    """What the app reads of an engine's components: its name."""

    name: str
    builtin: bool = True


class EchoState:
    """One stream of the echo engine: the frames in flight and a counter."""

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.frames_in = 0
        self.in_flight: deque[tuple[int, np.ndarray]] = deque()  # (input index, image), oldest first
        self.last_output: Output | None = None
        self.bank_resets = 0
        self.device = None  # where `to` last sent it (nothing: where the engine keeps it)

    def reset_bank(self) -> None:
        self.bank_resets += 1

    def reset(self) -> None:
        self.in_flight.clear()
        self.last_output = None

    def checkpoint(self) -> tuple:
        """The stream's position before a render call (`restore` it if the call fails)."""
        return self.frames_in, list(self.in_flight), self.last_output

    def restore(self, saved: tuple) -> None:
        self.frames_in, in_flight, self.last_output = saved
        self.in_flight = deque(in_flight)

    def nbytes(self) -> int:
        """Bytes of the frames it holds (in flight, and its last render)."""
        held = [image for _, image in self.in_flight] + ([self.last_output.image] if self.last_output else [])
        return sum(image.nbytes for image in held)

    def to(self, device) -> "EchoState":
        self.device = str(device)  # nothing to move; tests read where it was sent
        return self


class EchoEngine:
    """Returns each frame as its own render after `call_ms` + n × `frame_ms` per call (see the module docstring)."""

    size_multiple = 8

    def __init__(self, frame_ms: float = 0.0, stream_cost: float = 0.5, *, call_ms: float = 0.0) -> None:
        if frame_ms < 0 or call_ms < 0 or not 0 < stream_cost <= 1:
            raise ValueError("frame_ms and call_ms must be >= 0 and stream_cost in (0, 1]")
        self.frame_ms = float(frame_ms)
        self.call_ms = float(call_ms)
        self.stream_cost = float(stream_cost)
        name = f"echo-{call_ms:g}+{frame_ms:g}ms" if call_ms else f"echo-{frame_ms:g}ms"
        self.components = EchoComponents(name)
        self._lock = threading.Lock()
        self._busy = 0.0
        self._sleeping_since: float | None = None
        self.calls = 0

    @property
    def busy_seconds(self) -> float:
        """Seconds spent in simulated UNet calls so far (the one running included)."""
        with self._lock:
            running = 0.0 if self._sleeping_since is None else time.monotonic() - self._sleeping_since
            return self._busy + running

    def close(self) -> None:
        pass

    def warm_up(self, configs, **options) -> list:
        """Nothing to prepare (the real engine's serving warm-up)."""
        return []

    def new_stream(self, config: StreamConfig) -> EchoState:
        return EchoState(config)

    def configure(self, state: EchoState, config: StreamConfig) -> EchoState:
        old = state.config
        state.config = config
        if (old.width, old.height, old.steps, old.mode) != (config.width, config.height, config.steps, config.mode):
            state.reset()
        return state

    def _unet(self, seconds: float) -> None:
        started = time.monotonic()
        with self._lock:
            self._sleeping_since = started
        if seconds > 0:
            time.sleep(seconds)
        with self._lock:
            self._busy += time.monotonic() - started
            self._sleeping_since = None
            self.calls += 1

    def prepare(self, state: EchoState, frame) -> np.ndarray:
        """`frame` as the stream's input (ImageError if unusable), like the real engine's."""
        return images.resize(images.to_rgb_array(frame), state.config.width, state.config.height)

    def batch_key(self, state: EchoState) -> tuple:
        config = state.config
        return config.width, config.height, config.steps, config.mode

    def _call_seconds(self, config: StreamConfig, frames: int) -> float:
        seconds = (self.call_ms + frames * self.frame_ms) / 1000.0
        return seconds * (self.stream_cost if config.mode == "stream" else 1.0)

    def __call__(self, state: EchoState, frame) -> Output:
        return self.render([(state, frame)])[0]

    def render(self, jobs) -> list[Output]:
        """One output per (state, frame[, control]) job; one simulated call per group of equal `batch_key`."""
        states = [job[0] for job in jobs]
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a stream renders one frame per call; give each stream once")
        prepared = [self.prepare(state, job[1]) for state, job in zip(states, jobs)]
        groups: dict[tuple, list[int]] = {}
        for position, state in enumerate(states):
            groups.setdefault(self.batch_key(state), []).append(position)
        outputs: list[Output] = [None] * len(jobs)  # type: ignore[list-item]
        for positions in groups.values():
            # One sleep for the group's UNet calls: each wake-up costs a GIL hand-over (up to 5 ms
            # while other threads run Python), which would make the stand-in dearer than its model.
            self._unet(self._call_seconds(states[positions[0]].config, len(positions)))
            for position in positions:
                outputs[position] = self._advance(states[position], prepared[position])
        return outputs

    def _advance(self, state: EchoState, image: np.ndarray) -> Output:
        index = state.frames_in
        state.frames_in += 1
        if state.config.mode == "latency":
            state.last_output = Output(image, index)
            return state.last_output
        steps = state.config.steps
        if not state.in_flight:  # warm start: every slot holds the first frame
            state.in_flight.extend([(index - 1, image)] * (steps - 1))
        state.in_flight.append((index, image))
        source, out = state.in_flight.popleft()
        state.last_output = Output(out, source)
        return state.last_output

    def flush(self, state: EchoState) -> list[Output]:
        outputs: list[Output] = []
        if state.config.mode == "latency" or state.last_output is None:
            return outputs
        newest_index, newest = state.in_flight[-1] if state.in_flight else (state.frames_in - 1, state.last_output.image)
        while state.last_output.source_index < newest_index:
            state.in_flight.append((newest_index, newest))
            self._unet(self._call_seconds(state.config, 1))
            source, out = state.in_flight.popleft()
            state.last_output = Output(out, source)
            outputs.append(state.last_output)
        return outputs

    def translate(self, state: EchoState, frames: Iterable) -> Iterator[np.ndarray]:
        """One render per input frame, in order (the lag does not matter for an echo)."""
        for frame in frames:
            self(state, frame)
            yield images.resize(images.to_rgb_array(frame), state.config.width, state.config.height)
