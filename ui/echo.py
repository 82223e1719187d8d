"""A stand-in engine that returns its input, taking the time a GPU would.

`EchoEngine` has the public interface of `sv2v_core.StreamV2V` (new_stream,
configure, __call__, flush, translate, size_multiple, close) but no model: a
frame's render is the frame itself (resized to the stream's size), after
sleeping what the denoising would cost.  The latency benchmark (ui.bench)
uses it to measure everything around the model: with 0 ms it shows the
app's own overhead, with 15 or 40 ms per frame it plays a fast or a slower
GPU.  Tests use it because its render shows exactly what was drawn.

Cost model.  `frame_ms` is one frame in latency mode: `steps` UNet calls of
batch 1, frame_ms / steps each.  In stream mode one UNet call of batch
`steps` admits a frame; it costs `stream_cost` × frame_ms.  The default 0.5
is an assumption, not a measurement: that a large GPU runs one batch-4 call
of SD1.5 at 512² in about half the time of four batch-1 calls (a cost of
8 ms + 3 ms per image, a common H100 estimate, gives 0.45).  Stream mode also lags like the real engine: a call
returns the frame admitted steps − 1 calls earlier, and `flush` repeats the
newest frame until it has come out.
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

    def reset_bank(self) -> None:
        self.bank_resets += 1

    def reset(self) -> None:
        self.in_flight.clear()
        self.last_output = None

    def to(self, device) -> "EchoState":
        return self


class EchoEngine:
    """Returns each frame as its own render after `frame_ms` (see the module docstring)."""

    size_multiple = 8

    def __init__(self, frame_ms: float = 0.0, stream_cost: float = 0.5) -> None:
        if frame_ms < 0 or not 0 < stream_cost <= 1:
            raise ValueError("frame_ms must be >= 0 and stream_cost in (0, 1]")
        self.frame_ms = float(frame_ms)
        self.stream_cost = float(stream_cost)
        self.components = EchoComponents(f"echo-{frame_ms:g}ms")
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

    def __call__(self, state: EchoState, frame) -> Output:
        config = state.config
        image = images.resize(images.to_rgb_array(frame), config.width, config.height)
        index = state.frames_in
        state.frames_in += 1
        if config.mode == "latency":
            for _ in range(config.steps):
                self._unet(self.frame_ms / 1000.0 / config.steps)
            state.last_output = Output(image, index)
            return state.last_output
        return self._stream_call(state, index, image)

    def _stream_call(self, state: EchoState, index: int, image: np.ndarray) -> Output:
        steps = state.config.steps
        if not state.in_flight:  # warm start: every slot holds the first frame
            state.in_flight.extend([(index - 1, image)] * (steps - 1))
        state.in_flight.append((index, image))
        self._unet(self.frame_ms / 1000.0 * self.stream_cost)
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
            self._unet(self.frame_ms / 1000.0 * self.stream_cost)
            source, out = state.in_flight.popleft()
            state.last_output = Output(out, source)
            outputs.append(state.last_output)
        return outputs

    def translate(self, state: EchoState, frames: Iterable) -> Iterator[np.ndarray]:
        """One render per input frame, in order (the lag does not matter for an echo)."""
        for frame in frames:
            self(state, frame)
            yield images.resize(images.to_rgb_array(frame), state.config.width, state.config.height)
