"""The feature bank of one stream (paper §4): what past frames left behind.

For every transformer block (a "layer", named by its module path) and every
denoising-step slot, the bank keeps the self-attention keys "k" and values
"v" of past frames, and, in the fusion blocks, the block outputs "o" as they
were *before* fusion (the paper's T_t = {K_t, V_t, O_t}; the fused O'_t is
what the frame uses, not what it leaves behind).  Tensors are stored as
(slots, tokens, channels).

A UNet call sees the bank through a `BankView`: it reads the rows of the slots
in its batch and, when the frame is due to update the bank, records the
current frame's features.  After each frame the engine calls `commit`, which
updates the bank every `merge_every` frames (the first frame after a start or
reset is always stored):

- "queue": keep the last `size` stored frames (FIFO), tokens concatenated;
- "dyme": merge the stored and the new tokens back into one frame's worth
  (`merging.random_bipartite_match` on the keys; k, v and o follow it);
- "none": keep nothing.

DyMe's random splits come from the bank's own seeded CPU generator, which
draws one seed per merge; the split itself is drawn on the tensors' device
from that seed.  So a stream is reproducible on a given device, its state
stays plain (picklable, movable between devices), and no index tensor is
copied from the host per layer.

The bank belongs to a stream, never to the model, so one loaded model serves
any number of independent streams.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .config import BankConfig
from .merging import random_bipartite_match

SEED_RANGE = 2**62


def as_index(slots) -> slice | list[int]:
    """`slots` as a slice where they are consecutive: indexing with it gives a
    view (no copy, no host-to-device index transfer); else as a list."""
    slots = list(slots)
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return slots


def fusion_block(layer: str) -> str:
    """The top-level UNet block a layer belongs to: "mid_block" or e.g. "up_blocks.1"."""
    parts = layer.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


class FeatureBank:
    def __init__(self, config: BankConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, dict[str, torch.Tensor]] = {}
        self.frames = 0   # frames committed since the bank was last emptied
        self.merges = 0
        self._pending: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

    # -- reading and recording (during UNet calls) ------------------------
    def read(self, layer: str, name: str) -> torch.Tensor | None:
        stored = self.layers.get(layer)
        return None if stored is None else stored.get(name)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        if self.config.mode != "none":
            self._pending[layer][name].append(features.detach())

    def fuses(self, layer: str) -> bool:
        return fusion_block(layer) in self.config.fusion_blocks

    def due(self) -> bool:
        """Whether the next committed frame updates the bank; only then is
        there anything worth recording during its UNet calls."""
        return self.config.mode != "none" and self.frames % self.config.merge_every == 0

    # -- updating (after each frame) --------------------------------------
    def commit(self) -> None:
        """Count the frame just rendered and, when it was due, take the
        features recorded for it."""
        pending, self._pending = self._pending, defaultdict(lambda: defaultdict(list))
        if self.config.mode == "none":
            return
        due = self.due()
        self.frames += 1
        if not due or not pending:
            return
        generator = None
        for layer, recorded in pending.items():
            new = {name: torch.cat(parts) for name, parts in recorded.items()}
            old = self.layers.get(layer)
            if old is None or old.keys() != new.keys():
                self.layers[layer] = new
            elif self.config.mode == "queue":
                keep = self.config.size * new["k"].shape[1]
                self.layers[layer] = {n: torch.cat([old[n], new[n]], dim=1)[:, -keep:] for n in new}
            else:
                if generator is None:
                    generator = self.split_generator(new["k"].device)
                match = random_bipartite_match(torch.cat([old["k"], new["k"]], dim=1), generator)
                self.layers[layer] = {n: match.merge(torch.cat([old[n], new[n]], dim=1)) for n in new}
        self.merges += generator is not None

    def split_generator(self, device: torch.device) -> torch.Generator:
        """A generator on `device` for one merge's random splits, seeded from the bank's own stream of seeds."""
        seed = int(torch.randint(SEED_RANGE, (1,), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def discard_pending(self) -> None:
        """Forget what a UNet call that failed midway recorded (the bank itself is unchanged)."""
        self._pending.clear()

    def reset(self) -> None:
        """Forget every past frame; the random splits start over from the seed."""
        self.layers.clear()
        self._pending.clear()
        self.generator.manual_seed(self.seed)
        self.frames = 0
        self.merges = 0

    def reconfigure(self, config: BankConfig) -> None:
        """Switch settings; the stored frames go when their meaning changes."""
        if (config.mode, config.size, config.fusion_blocks) != (
            self.config.mode, self.config.size, self.config.fusion_blocks
        ):
            self.reset()
        self.config = config

    # -- bookkeeping ------------------------------------------------------
    def signature(self) -> tuple:
        """What a UNet call that reads this bank depends on besides its inputs
        (which features are read, their token counts, the fusion settings).
        Streams with equal signatures can share one UNet call."""
        config = self.config
        if not config.enabled:
            return ()
        stored = tuple((layer, tuple((name, t.shape[1]) for name, t in features.items()))
                       for layer, features in self.layers.items())
        return (config.extended_attention, config.feature_fusion, config.fusion_alpha, config.fusion_threshold,
                config.fusion_blocks, stored)

    def tokens(self, layer: str) -> int:
        stored = self.layers.get(layer)
        return 0 if stored is None else stored["k"].shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for stored in self.layers.values() for t in stored.values())

    def to(self, device: torch.device | str) -> None:
        for layer, stored in self.layers.items():
            self.layers[layer] = {name: t.to(device) for name, t in stored.items()}


@dataclass
class BankView:
    """What one stream's rows of a UNet call read from and record into its bank.

    slots: the bank slot of each of the stream's batch rows, in batch order
        (row i runs the denoising step `slots[i]` and reads that slot's rows).
    recording: whether this call's features are kept (the frame is due to
        update the bank); when False nothing is recorded.
    """

    bank: FeatureBank
    slots: list[int]
    recording: bool = True

    @property
    def fusion(self) -> tuple[float, float]:
        """(α, threshold) of feature fusion."""
        return self.bank.config.fusion_alpha, self.bank.config.fusion_threshold

    def extended_keys_values(self, layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Banked (k, v) rows for extended self-attention, or None."""
        config = self.bank.config
        if not (config.enabled and config.extended_attention):
            return None
        k, v = self.bank.read(layer, "k"), self.bank.read(layer, "v")
        if k is None or v is None:
            return None
        index = as_index(self.slots)
        return k[index], v[index]

    def fusion_features(self, layer: str) -> torch.Tensor | None:
        """Banked block outputs to fuse with, or None where this layer doesn't fuse."""
        config = self.bank.config
        if not (config.enabled and config.feature_fusion and self.bank.fuses(layer)):
            return None
        o = self.bank.read(layer, "o")
        return None if o is None else o[as_index(self.slots)]

    def records(self, layer: str, name: str) -> bool:
        """Whether this call keeps the feature `name` of `layer`."""
        if not self.recording or self.bank.config.mode == "none":
            return False
        return name != "o" or self.bank.fuses(layer)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        if self.records(layer, name):
            self.bank.record(layer, name, features)


@dataclass
class BatchView:
    """What one UNet call reads and records for every stream in its batch;
    the attention processors and fusion hooks see only this.

    views: one `BankView` per stream, in batch order: stream i owns the next
        len(views[i].slots) rows and reads and records only its own bank.
    copies: the batch is `copies` repeats of those rows (2 under
        classifier-free guidance: unconditional first); every copy reads the
        same banked rows and only the last (conditional) copy is recorded.

    Banked rows of several streams are concatenated along the batch, so the
    streams of one call must hold banks of the same shapes and fusion
    settings (equal `FeatureBank.signature()`; the engine groups them so).
    """

    views: list[BankView]
    copies: int = 1

    @property
    def rows(self) -> int:
        return sum(len(view.slots) for view in self.views)

    @property
    def fusion(self) -> tuple[float, float]:
        return self.views[0].fusion

    def _stack(self, parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if all(part is None for part in parts):
            return None
        if any(part is None for part in parts):
            raise ValueError("streams whose banks differ in shape cannot share a UNet call "
                             "(group them by FeatureBank.signature())")
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        return rows.repeat(self.copies, 1, 1) if self.copies > 1 else rows

    def extended_keys_values(self, layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        pairs = [view.extended_keys_values(layer) for view in self.views]
        if all(pair is None for pair in pairs):
            return None
        return (self._stack([None if p is None else p[0] for p in pairs]),
                self._stack([None if p is None else p[1] for p in pairs]))

    def fusion_features(self, layer: str) -> torch.Tensor | None:
        return self._stack([view.fusion_features(layer) for view in self.views])

    def records(self, layer: str, name: str) -> bool:
        return any(view.records(layer, name) for view in self.views)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        own = features[-self.rows:] if self.copies > 1 else features
        start = 0
        for view in self.views:
            end = start + len(view.slots)
            view.record(layer, name, own[start:end] if len(self.views) > 1 else own)
            start = end
