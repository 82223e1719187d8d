"""Per-stage profile of a frame: the engine's stages, through its timing seam (`StreamV2V.stages`), timed
with the device synchronised around each."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .timing import sync

# What each of the engine's stages (sv2v_core.engine.STAGES) is called in a profile.
STAGE_LABELS = {"encode": "autoencoder encode", "controlnet": "ControlNet", "unet": "UNet call",
                "bank update": "bank update", "decode": "autoencoder decode (+ to host)"}
FRAME = "frame (total)"
REST = "host work (rest of the frame)"


class StageTimer:
    """Accumulates wall time per stage, synchronising the device around each."""

    def __init__(self, device: torch.device, clock=time.perf_counter) -> None:
        self.device, self.clock = device, clock
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        sync(self.device)
        start = self.clock()
        try:
            yield
        finally:
            sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + self.clock() - start
            self.count[name] = self.count.get(name, 0) + 1

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)

        return timed


@contextlib.contextmanager
def timed_stages(engine, timer: StageTimer):
    """Time `engine`'s stages with `timer` through its `stages` seam (the seam is restored on exit)."""
    previous = engine.stages
    engine.stages = lambda name: timer.stage(STAGE_LABELS.get(name, name))
    try:
        yield
    finally:
        engine.stages = previous


def profile_row(row, frames: list[np.ndarray], count: int, device: torch.device, clock=time.perf_counter) -> dict:
    """Per-stage time of `count` frames of `row` (alone, after its warm-up); what the stages leave out of
    a frame is its host work (preparing the frame, the LCM step's arithmetic, the rest)."""
    row.start()
    try:
        for index in range(row.warmup):
            row(frames[index % len(frames)])
        timer = StageTimer(device, clock)
        with row.instrumented(timer):
            for index in range(row.warmup, row.warmup + count):
                with timer.stage(FRAME):
                    row(frames[index % len(frames)])
    finally:
        row.stop()
    names = [FRAME] + [name for name in timer.total if name != FRAME]
    per_frame = {name: 1000 * timer.total[name] / count for name in names}
    per_frame[REST] = per_frame[FRAME] - sum(ms for name, ms in per_frame.items() if name != FRAME)
    calls = {name: timer.count[name] / count for name in timer.count}
    per_call = {name: 1000 * timer.total[name] / timer.count[name] for name in timer.count}
    return {"row": row.key, "label": row.label, "steps": row.steps, "mode": row.mode, "frames": count,
            "ms_per_frame": per_frame, "calls_per_frame": calls, "ms_per_call": per_call}
