"""Per-stage profile of a frame: the engine's stages timed with the device synchronised around each."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .timing import sync


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
def instrumented(engine, state, timer: StageTimer):
    """Time the stages of `engine` on `state` by wrapping them (undone on exit)."""
    from sv2v_core import attention, bank, merging

    saved_module = [(attention, "fuse", attention.fuse), (bank, "random_bipartite_match", bank.random_bipartite_match)]
    saved_merge = merging.Match.merge
    engine._encode = timer.wrap("autoencoder encode", engine._encode)
    engine._decode = timer.wrap("autoencoder decode (+ to host)", engine._decode)
    engine._lcm_step = timer.wrap("UNet call (+ LCM step)", engine._lcm_step)
    state.bank.commit = timer.wrap("bank update (commit)", state.bank.commit)
    attention.fuse = timer.wrap("  feature fusion (cosine, argmax, lerp)", attention.fuse)
    bank.random_bipartite_match = timer.wrap("  DyMe match (cosine, argmax)", bank.random_bipartite_match)
    merging.Match.merge = timer.wrap("  DyMe merge (scatter-mean)", saved_merge)
    try:
        yield
    finally:
        for name in ("_encode", "_decode", "_lcm_step"):
            engine.__dict__.pop(name, None)
        state.bank.__dict__.pop("commit", None)
        for module, name, value in saved_module:
            setattr(module, name, value)
        merging.Match.merge = saved_merge


PROFILE_STAGES = ("frame (total)", "autoencoder encode", "UNet call (+ LCM step)",
                  "  feature fusion (cosine, argmax, lerp)", "bank update (commit)", "  DyMe match (cosine, argmax)",
                  "  DyMe merge (scatter-mean)", "autoencoder decode (+ to host)")
TOP_STAGES = ("autoencoder encode", "UNet call (+ LCM step)", "bank update (commit)", "autoencoder decode (+ to host)")


def profile_row(row, frames: list[np.ndarray], count: int, device: torch.device, clock=time.perf_counter) -> dict:
    """Per-stage time of `count` frames of `row` (alone, after its warm-up)."""
    row.start()
    try:
        for index in range(row.warmup):
            row(frames[index % len(frames)])
        timer = StageTimer(device, clock)
        with row.instrumented(timer):
            for index in range(row.warmup, row.warmup + count):
                with timer.stage("frame (total)"):
                    row(frames[index % len(frames)])
    finally:
        row.stop()
    per_frame = {name: 1000 * timer.total[name] / count for name in PROFILE_STAGES if name in timer.total}
    per_frame["host work (rest of the frame)"] = (per_frame["frame (total)"]
                                                  - sum(per_frame.get(n, 0.0) for n in TOP_STAGES))
    calls = {name: timer.count[name] / count for name in timer.count}
    per_call = {name: 1000 * timer.total[name] / timer.count[name] for name in timer.count}
    return {"row": row.key, "label": row.label, "steps": row.steps, "mode": row.mode, "frames": count,
            "ms_per_frame": per_frame, "calls_per_frame": calls, "ms_per_call": per_call}
