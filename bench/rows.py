"""The rows the engine benchmark renders: our engine, one bank configuration each (the peer: bench.peer).

A row is called with a uint8 frame and returns the uint8 image on the host;
`start` gives it a fresh stream, `stop` drops it, `instrumented(timer)`
times its stages through the engine's timing seam (bench.profile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sv2v_core.config import BankConfig, StreamConfig

from .profile import timed_stages

if TYPE_CHECKING:
    from .profile import StageTimer

ROWS = {
    "none": ("no bank", BankConfig(mode="none")),
    "queue1": ("queue(1)", BankConfig(mode="queue", size=1)),
    "queue2": ("queue(2)", BankConfig(mode="queue", size=2)),
    "queue4": ("queue(4)", BankConfig(mode="queue", size=4)),
    "dyme1": ("DyMe(1)", BankConfig(mode="dyme", size=1)),
}
PROMPT = "a watercolor painting"
STRENGTH = 0.4


def default_warmup(bank: BankConfig, device: torch.device, compiled: bool) -> int:
    """Frames until the bank has its steady size (and merged once), plus device warm-up."""
    fill = {"none": 1, "queue": bank.merge_every * (bank.size - 1) + 2, "dyme": bank.merge_every + 2}[bank.mode]
    return max(fill, 10 if device.type == "cuda" else 1, 3 if compiled else 0)


def stream_config(size: int, steps: int, mode: str, bank: BankConfig) -> StreamConfig:
    # Every frame is rendered: no similarity skip, no scene-cut bank reset.
    return StreamConfig(prompt=PROMPT, width=size, height=size, strength=STRENGTH, steps=steps, mode=mode,
                        bank=bank, similarity_skip=None, scene_cut=None)


class EngineRow:
    """One of our bank rows: the shared engine and this row's own stream.

    A row is called with a uint8 frame and returns the uint8 image on the
    host; `start` gives it a fresh stream, `stop` drops it."""

    def __init__(self, engine, key: str, size: int, steps: int, mode: str, warmup: int | None = None) -> None:
        self.key = key
        self.label, self.bank = ROWS[key]
        self.engine, self.steps, self.mode = engine, steps, mode
        self.config = stream_config(size, steps, mode, self.bank)
        self.warmup = default_warmup(self.bank, engine.device, engine.backend is not None) if warmup is None else warmup
        self.state = None

    def start(self) -> None:
        self.state = self.engine.new_stream(self.config)

    def stop(self) -> None:
        self.state = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.engine(self.state, frame).image

    def bank_bytes(self) -> int:
        return self.state.bank.nbytes()

    def bank_tokens(self) -> dict[str, int]:
        return {layer: self.state.bank.tokens(layer) for layer in self.state.bank.layers}

    def instrumented(self, timer: "StageTimer"):
        return timed_stages(self.engine, timer)
