"""Fault injection: an engine wrapper that fails the way a server's GPU does, on purpose.

`FaultyEngine` wraps an engine (the echo engine, the built-in tiny model)
and passes every call through, except that its `render` (the batched UNet
calls) can, per `Faults`:

- raise in the UNet call of one chosen session's stream (the streams whose
  prompt contains `Faults.prompt`): for its frame number `once_at`, or for
  every `every`-th of its frames.  The frame number is the stream's count
  of inputs before the call, so a retry of the same frame fails the same
  way, as a real bad input would;
- raise an out-of-memory error (`torch.OutOfMemoryError`) for any call of
  more than `oom_above` streams;
- raise a device fault ("CUDA error: an illegal memory access") on the
  chosen session's frame `device_fault_at`;
- stall the chosen session's frame `stall_at` for `stall_seconds`.

An injected error is raised after the wrapped call has run: the streams
have counted their inputs then, as they have when a real call fails late,
so a renderer that does not put them back counts those inputs twice.

It counts what it injected (`injected`, by kind).  Tests (tests/test_faults.py)
and the drill (bench.drill) use it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

INJECTED = "injected fault in the UNet call"


@dataclass
class Faults:
    """What to inject (None: that fault never happens); see the module docstring."""

    prompt: str = "FAULTY"
    once_at: int | None = None
    every: int | None = None
    oom_above: int | None = None
    device_fault_at: int | None = None
    stall_at: int | None = None
    stall_seconds: float = 0.0


class FaultyEngine:
    """`engine`, with the faults of `faults` injected into its `render` calls."""

    def __init__(self, engine, faults: Faults | None = None) -> None:
        self.engine = engine
        self.faults = faults or Faults()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._frames: dict[int, tuple[int, int]] = {}  # id(state) -> (id of its last frame, its number)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def _number(self, state, image) -> int:
        """The number of `image` among the frames that came to `state` (a retry keeps its number)."""
        last, number = self._frames.get(id(state), (None, -1))
        if id(image) != last:
            number += 1
        self._frames[id(state)] = (id(image), number)
        return number

    def render(self, jobs):
        """The wrapped engine's renders, or the fault due.  A fault is raised after the wrapped call has
        run, so the streams have counted their inputs by then, as a real call that fails late has."""
        faults = self.faults
        fault: Exception | None = None
        if faults.oom_above is not None and len(jobs) > faults.oom_above:
            fault = torch.OutOfMemoryError(f"CUDA out of memory (injected: a batch of {len(jobs)} > "
                                           f"{faults.oom_above})")
            self._count("out of memory")
        for state, image, *_ in jobs:
            if fault is not None or faults.prompt not in state.config.prompt:
                continue
            frame = self._number(state, image)
            if frame == faults.device_fault_at:
                fault = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
                self._count("device fault")
            elif frame == faults.once_at or (faults.every and (frame + 1) % faults.every == 0):
                fault = RuntimeError(f"{INJECTED} (frame {frame} of the faulty session)")
                self._count("error")
            elif frame == faults.stall_at:
                self._count("stall")
                time.sleep(faults.stall_seconds)
        outputs = self.engine.render(jobs)
        if fault is not None:
            raise fault
        return outputs
