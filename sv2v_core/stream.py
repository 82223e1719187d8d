"""One stream's mutable state: everything a user's session owns.

The engine (one per loaded model) is stateless between calls; all that
changes while a stream runs lives here: the feature bank, the latents of
frames still in flight in the stream batch (and, with a ControlNet, their
control images), the fixed per-slot noise, the prompt embeddings, and the
bookkeeping for the similarity filter.  A state is
plain tensors and numbers, so it can be moved to the CPU between calls
(ZeroGPU) and pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bank import FeatureBank
from .config import StreamConfig


@dataclass
class Output:
    """One rendered frame.

    image: uint8 (height, width, 3).
    source_index: the input (0-based count of frames given to the stream)
        it renders; in stream mode it lags the newest input by steps − 1.
        The warm-start renders that come out before the first input has
        passed every step carry the index before it (−1 for a new stream).
    skipped: the input was near-identical to the last rendered one, so the
        previous render was re-emitted without running the model.
    """

    image: np.ndarray
    source_index: int
    skipped: bool = False


class StreamState:
    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.bank = FeatureBank(config.bank, config.seed)
        self.noise: torch.Tensor | None = None   # (steps, 4, h, w), fixed per slot
        self.schedule: dict[str, torch.Tensor] = {}  # timesteps and per-slot coefficients
        self.in_flight: torch.Tensor | None = None   # (steps − 1, 4, h, w), stream mode
        self.in_flight_sources: list[int] = []  # source index per in-flight slot, newest first
        # with a ControlNet: each in-flight slot's own frame's control image, uint8 (steps − 1, 3, H, W)
        self.in_flight_control: torch.Tensor | None = None
        self.prompt_embeds: torch.Tensor | None = None
        self.negative_embeds: torch.Tensor | None = None
        self.frames_in = 0                      # inputs given to the stream
        self.last_latent: torch.Tensor | None = None   # encoded newest input (for flush)
        self.last_control: torch.Tensor | None = None  # its control image (with a ControlNet)
        self.last_thumb: np.ndarray | None = None      # of the last rendered input
        self.last_fed = -1                      # index of the newest input given to the model
        self.last_output: Output | None = None
        self.bank_since = 0                     # first input whose features may enter the bank

    def caught_up(self) -> bool:
        """True once the newest input given to the model has been rendered."""
        return self.last_output is None or self.last_output.source_index >= self.last_fed

    def oldest_in_flight(self) -> int:
        """The oldest input whose render may still change."""
        return min(self.in_flight_sources, default=self.frames_in)

    def bank_takes(self, sources: list[int]) -> bool:
        """Whether a UNet call whose batch rows render the inputs `sources` may
        leave features in the bank: only if every row renders an input fed
        since the bank was last emptied.  In stream mode that excludes the
        warm-start copies of a new stream and, after a reset (scene cut,
        prompt change), the frames still in flight from before it; they go on
        rendering (no frame is lost, no glitch) but leave nothing behind."""
        return min(sources) >= self.bank_since

    def reset_bank(self) -> None:
        """Forget past frames: no feature of an input given so far will enter
        the bank again.  The stream itself goes on."""
        self.bank.reset()
        self.bank_since = self.frames_in

    def reset(self) -> None:
        """Start over: empty bank, nothing in flight; the next frame warm-starts."""
        self.reset_bank()
        self.in_flight = None
        self.in_flight_sources = []
        self.in_flight_control = None
        self.last_thumb = None
        self.last_output = None

    # What a render call changes, kept so a call that fails midway can be undone (`checkpoint`/`restore`).
    _CHECKPOINTED = ("frames_in", "in_flight", "in_flight_sources", "in_flight_control", "last_latent",
                     "last_control", "last_thumb", "last_fed", "last_output", "bank_since")

    def checkpoint(self) -> dict:
        """The stream's position before a render call: `restore` puts it back if the call fails.

        Cheap: references to tensors the engine replaces rather than changes,
        and the bank's counters and buffers by reference.  A call that fails
        after its bank update (the decode) keeps that frame's features in the
        bank's buffers, whose retry then records them once more; its counts
        (`frames_in`, the bank's frames) are restored all the same.
        """
        saved = {name: getattr(self, name) for name in self._CHECKPOINTED}
        saved["in_flight_sources"] = list(self.in_flight_sources)
        bank = self.bank
        saved["bank"] = (dict(bank.buffers), bank.stored, bank.frames, bank.merges, bank.generator.get_state())
        return saved

    def restore(self, saved: dict) -> None:
        """Back to a `checkpoint`: the inputs counted since are uncounted, what the bank recorded is dropped."""
        for name in self._CHECKPOINTED:
            setattr(self, name, saved[name])
        self.in_flight_sources = list(saved["in_flight_sources"])
        bank = self.bank
        buffers, bank.stored, bank.frames, bank.merges, generator = saved["bank"]
        bank.buffers = dict(buffers)
        bank.generator.set_state(generator)
        bank.discard_pending()

    def to(self, device: torch.device | str) -> "StreamState":
        """Move every tensor to `device` (e.g. "cpu" between ZeroGPU calls)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self.noise = move(self.noise)
        self.in_flight = move(self.in_flight)
        self.prompt_embeds = move(self.prompt_embeds)
        self.negative_embeds = move(self.negative_embeds)
        self.last_latent = move(self.last_latent)
        self.in_flight_control = move(self.in_flight_control)
        self.last_control = move(self.last_control)
        self.schedule = {name: t.to(device) for name, t in self.schedule.items()}
        self.bank.to(device)
        return self
