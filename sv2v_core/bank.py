"""The feature bank of one stream (paper §4): what past frames left behind.

For every transformer block (a "layer", named by its module path) and every
denoising-step slot, the bank keeps the self-attention keys "k" and values
"v" of past frames, and, in the fusion blocks, the block outputs "o" as they
were *before* fusion (the paper's T_t = {K_t, V_t, O_t}; the fused O'_t is
what the frame uses, not what it leaves behind).

The bank lives in fixed-size buffers, one per layer and feature, shaped
(slots, capacity · tokens, channels) where `capacity` is the number of
frames the bank can hold (a DyMe bank: one; a queue: its size).  They are
allocated when the first frame is stored and updated in place after that;
`stored` says how many frames' worth of tokens at the front are real.  So a
bank's shapes never change while its stream runs, whatever it holds, which
is what a captured graph needs (`serving`): a partly filled or empty bank is
read through a mask over the tokens not yet stored.

A UNet call sees the bank through a `BankView`: it reads the rows of the slots
in its batch and, when the frame is due to update the bank, records the
current frame's features.  After each frame the engine commits the frame
(`commit_banks`, for all the streams of a call at once), which updates the
bank every `merge_every` frames (the first frame after a start or reset is
always stored) through the update policy of its mode (`UPDATE_POLICIES`, one
function each):

- "queue": keep the last `size` stored frames (FIFO), tokens concatenated;
- "dyme": merge the stored and the new tokens back into one frame's worth
  (`merging.bipartite_match` on the keys; k, v and o follow it);
- "none": keep nothing.

DyMe draws a fresh random split at every merge (paper §4.3), from the bank's
own seeded CPU generator, which gives one seed per merge; the split itself is
drawn on the tensors' device from that seed, one block of uniform numbers
for all layers.  So a stream is reproducible on a given device, and its
splits depend on its seed and its own merges only, never on which other
streams share its UNet calls.  The merges of all the banks and layers of a
commit whose token counts are equal run as one batched match and merge.

A bank is plain data (tensors, numbers, dicts, a CPU generator): it can be
moved between devices and pickled.  It belongs to a stream, never to the
model, so one loaded model serves any number of independent streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .config import BANK_MODES, BankConfig
from .merging import bipartite_match, random_order

SEED_RANGE = 2**62
FEATURES = ("k", "v", "o")
_BLOCK_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


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


def layer_order(layers) -> list[str]:
    """`layers` in the order a UNet forward runs them (down, mid, up blocks;
    numbered parts by number).  The bank's layers, the serving graphs'
    inputs and DyMe's draws all follow it."""
    def key(layer: str):
        parts = layer.split(".")
        return (_BLOCK_RANK.get(parts[0], 3),
                tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts))

    return sorted(layers, key=key)


class KeysValues(NamedTuple):
    """Banked keys and values for extended self-attention, (B, M, C) each;
    `keep` (B, M) bool marks the tokens that exist (None: all of them)."""

    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor | None = None


class FusionInputs(NamedTuple):
    """Banked block outputs (B, M, C) for feature fusion, which of them exist
    (`keep`, (B, M) bool, None: all), and α and the threshold: numbers, or
    per batch row tensors (B, 1, 1) and (B, 1)."""

    o: torch.Tensor
    keep: torch.Tensor | None
    alpha: float | torch.Tensor
    threshold: float | torch.Tensor


class FeatureBank:
    def __init__(self, config: BankConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # layer -> feature name -> (slots, capacity · tokens, channels); allocated at the first store
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.stored = 0   # frames held at the front of the buffers
        self.frames = 0   # frames committed since the bank was last emptied
        self.merges = 0
        self._pending: dict[str, dict[str, list[torch.Tensor]]] = {}  # recorded during the current frame

    @property
    def capacity(self) -> int:
        """Frames the buffers hold: a queue's size; one for DyMe (its size is always one)."""
        return self.config.size

    # -- reading and recording (during UNet calls) ------------------------
    @property
    def layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the bank holds per layer and feature: the stored tokens,
        (slots, tokens, channels), as views of the buffers."""
        if not self.stored:
            return {}
        return {layer: {name: buffer[:, :self.stored * (buffer.shape[1] // self.capacity)]
                        for name, buffer in features.items()}
                for layer, features in self.buffers.items()}

    def read(self, layer: str, name: str) -> torch.Tensor | None:
        buffer = self.buffers.get(layer, {}).get(name) if self.stored else None
        return None if buffer is None else buffer[:, :self.stored * (buffer.shape[1] // self.capacity)]

    def buffer(self, layer: str, name: str) -> torch.Tensor | None:
        """The whole fixed-size buffer of a feature (stored tokens first), or None before the first store."""
        return self.buffers.get(layer, {}).get(name)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        if self.config.mode != "none":
            self._pending.setdefault(layer, {}).setdefault(name, []).append(features.detach())

    def fuses(self, layer: str) -> bool:
        return fusion_block(layer) in self.config.fusion_blocks

    def due(self) -> bool:
        """Whether the next committed frame updates the bank; only then is
        there anything worth recording during its UNet calls."""
        return self.config.mode != "none" and self.frames % self.config.merge_every == 0

    # -- updating (after each frame) --------------------------------------
    def commit(self) -> None:
        """Count the frame just rendered and, when it was due, take the
        features recorded for it (`commit_banks` for one bank)."""
        commit_banks([self])

    def _take(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """Count the frame; the features it leaves behind if it was due, in layer order."""
        pending, self._pending = self._pending, {}
        if self.config.mode == "none":
            return None
        due = self.due()
        self.frames += 1
        if not due or not pending:
            return None
        return {layer: {name: torch.cat(pending[layer][name]) for name in FEATURES if name in pending[layer]}
                for layer in layer_order(pending)}

    def _fits(self, new: dict[str, dict[str, torch.Tensor]]) -> bool:
        """Whether the buffers are laid out for frames like `new`."""
        if list(self.buffers) != list(new):
            return False
        return all(list(self.buffers[layer]) == list(features)
                   and all(self._slot(self.buffers[layer][name], 0).shape == t.shape
                           and self.buffers[layer][name].dtype == t.dtype
                           and self.buffers[layer][name].device == t.device for name, t in features.items())
                   for layer, features in new.items())

    def _slot(self, buffer: torch.Tensor, frame: int) -> torch.Tensor:
        """The tokens of stored frame `frame` in `buffer` (a view)."""
        tokens = buffer.shape[1] // self.capacity
        return buffer[:, frame * tokens:(frame + 1) * tokens]

    def _store_first(self, new: dict[str, dict[str, torch.Tensor]]) -> None:
        if not self._fits(new):
            self.buffers = {
                layer: {name: t.new_zeros(t.shape[0], self.capacity * t.shape[1], t.shape[2])
                        for name, t in features.items()}
                for layer, features in new.items()}
        for layer, features in new.items():
            for name, t in features.items():
                self._slot(self.buffers[layer][name], 0).copy_(t)
        self.stored = 1

    def split_draws(self, device: torch.device, slots: int, tokens: Sequence[int]) -> list[torch.Tensor]:
        """This merge's uniform draws, one (slots, 2N) block per layer (2N =
        `tokens[i]`), from a fresh seed given by the bank's own generator:
        every merge gets a new split, and a stream's splits depend only on its
        seed and its own merges so far."""
        seed = int(torch.randint(SEED_RANGE, (1,), generator=self.generator))
        generator = torch.Generator(device=device).manual_seed(seed)
        uniform = torch.rand(slots, sum(tokens), generator=generator, device=device)
        return list(uniform.split(list(tokens), dim=1))

    def discard_pending(self) -> None:
        """Forget what a UNet call that failed midway recorded (the bank itself is unchanged)."""
        self._pending.clear()

    def reset(self) -> None:
        """Forget every past frame (and free the buffers); the random splits start over from the seed."""
        self.buffers = {}
        self._pending.clear()
        self.generator.manual_seed(self.seed)
        self.stored = 0
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
        """What an eager UNet call that reads this bank depends on besides its
        inputs (which features are read, their token counts, the fusion
        settings).  Streams with equal signatures can share one eager call;
        the serving graphs need far less (`serving.ServingBackend.batch_key`)."""
        config = self.config
        if not config.enabled:
            return ()
        stored = tuple((layer, tuple((name, t.shape[1]) for name, t in features.items()))
                       for layer, features in self.layers.items())
        return (config.extended_attention, config.feature_fusion, config.fusion_alpha, config.fusion_threshold,
                config.fusion_blocks, stored)

    def tokens(self, layer: str) -> int:
        k = self.read(layer, "k")
        return 0 if k is None else k.shape[1]

    def nbytes(self) -> int:
        """Bytes the bank's buffers occupy (allocated for its capacity at the first store)."""
        return sum(t.numel() * t.element_size() for features in self.buffers.values() for t in features.values())

    def to(self, device: torch.device | str) -> None:
        self.buffers = {layer: {name: t.to(device) for name, t in features.items()}
                        for layer, features in self.buffers.items()}


# ---------------------------------------------------------------- update policies
#
# How a bank that already holds frames takes a due frame's features: one
# function per `BankConfig.mode`, given every (bank, new features) pair of a
# commit whose bank uses that mode (so it may batch them), updating each
# bank's buffers in place.  The first frame after a reset is stored before
# any policy runs; "none" keeps nothing and never gets here.  A new policy is
# one function here, its name in `config.BANK_MODES`, and its test.

Update = Sequence[tuple["FeatureBank", dict[str, dict[str, torch.Tensor]]]]


def queue_update(jobs: Update) -> None:
    """FIFO of `size` frames: the new frame goes behind the stored ones; once
    full, the oldest goes (tokens shift forward in place)."""
    for bank, new in jobs:
        for layer, features in new.items():
            for name, t in features.items():
                buffer = bank.buffers[layer][name]
                if bank.stored == bank.capacity:
                    buffer[:, :-t.shape[1]].copy_(buffer[:, t.shape[1]:].clone())
                bank._slot(buffer, min(bank.stored, bank.capacity - 1)).copy_(t)
        bank.stored = min(bank.stored + 1, bank.capacity)


# Whether DyMe batches the merges of banks and layers of equal shapes, per device type.  On a GPU it
# turns hundreds of small kernel launches into a few; on a CPU, where the work is arithmetic, the
# stacked blocks miss the caches (measured on the tiny model at 256²: 55 ms batched, 40 ms one by one).
BATCHED_MERGES = {"cuda": True, "cpu": False}


def dyme_update(jobs: Update) -> None:
    """Merge each bank's new frame into its one stored frame (paper §4.3),
    in place: per layer, the 2N stored and new tokens are split at random
    (the bank's own draws), every src token joins its most cosine-similar
    dst token (on the keys), each dst becomes the mean of its group; k, v
    and o follow the same assignment.  Pairs of equal shapes, across banks
    and layers, run as one batched match and merge (where `BATCHED_MERGES`
    says so for the device; else one by one, with the same results)."""
    new_of = {id(bank): new for bank, new in jobs}
    groups: dict[tuple, list[tuple[FeatureBank, str, torch.Tensor]]] = {}  # (shapes, None or one pair) -> pairs
    for bank, new in jobs:
        layers = list(new)
        k = new[layers[0]]["k"]
        draws = bank.split_draws(k.device, k.shape[0], [2 * new[layer]["k"].shape[1] for layer in layers])
        batched = BATCHED_MERGES.get(k.device.type, True)
        for layer, uniform in zip(layers, draws):
            shape = tuple((name, tuple(t.shape), t.dtype) for name, t in new[layer].items())
            alone = None if batched else (id(bank), layer)
            groups.setdefault((shape, alone), []).append((bank, layer, uniform))
        bank.merges += 1
    for (shape, _), members in groups.items():
        order = random_order(torch.cat([uniform for _, _, uniform in members]))
        match = bipartite_match(_stored_and_new(members, new_of, "k"), order)
        for name, _, _ in shape:
            merged = match.merge(_stored_and_new(members, new_of, name)).chunk(len(members))
            for (bank, layer, _), part in zip(members, merged):
                bank._slot(bank.buffers[layer][name], 0).copy_(part)


UPDATE_POLICIES = {"queue": queue_update, "dyme": dyme_update}
assert set(UPDATE_POLICIES) | {"none"} == set(BANK_MODES), "every bank mode needs its update policy"


def commit_banks(banks: Sequence[FeatureBank]) -> None:
    """Commit the frame each bank's stream has just rendered (see
    `FeatureBank.commit`), all the banks of a call at once: the first frame
    after a reset is copied in, and each policy updates the banks of its
    mode together (DyMe batches its merges)."""
    due: dict[str, list] = {}
    for bank in banks:
        new = bank._take()
        if new is None:
            continue
        if not bank.stored or not bank._fits(new):
            bank._store_first(new)
        else:
            due.setdefault(bank.config.mode, []).append((bank, new))
    for mode, jobs in due.items():
        UPDATE_POLICIES[mode](jobs)


def _stored_and_new(members, new_of, name: str) -> torch.Tensor:
    """(pairs · slots, 2N, C): each pair's stored tokens, then its new ones, stacked."""
    return torch.cat([torch.cat([bank.read(layer, name), new_of[id(bank)][layer][name]], dim=1)
                      for bank, layer, _ in members])


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

    def extended_keys_values(self, layer: str) -> KeysValues | None:
        """Banked (k, v) rows for extended self-attention, or None."""
        config = self.bank.config
        if not (config.enabled and config.extended_attention):
            return None
        k, v = self.bank.read(layer, "k"), self.bank.read(layer, "v")
        if k is None or v is None:
            return None
        index = as_index(self.slots)
        return KeysValues(k[index], v[index])

    def fusion_features(self, layer: str) -> torch.Tensor | None:
        """Banked block outputs to fuse with, or None where this layer doesn't fuse."""
        config = self.bank.config
        if not (config.enabled and config.feature_fusion and self.bank.fuses(layer)):
            return None
        o = self.bank.read(layer, "o")
        return None if o is None else o[as_index(self.slots)]

    def fusion_inputs(self, layer: str) -> FusionInputs | None:
        o = self.fusion_features(layer)
        return None if o is None else FusionInputs(o, None, *self.fusion)

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
    """What one eager UNet call reads and records for every stream in its
    batch; the attention processors and fusion hooks see only this.

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

    def extended_keys_values(self, layer: str) -> KeysValues | None:
        pairs = [view.extended_keys_values(layer) for view in self.views]
        if all(pair is None for pair in pairs):
            return None
        return KeysValues(self._stack([None if p is None else p.k for p in pairs]),
                          self._stack([None if p is None else p.v for p in pairs]))

    def fusion_features(self, layer: str) -> torch.Tensor | None:
        return self._stack([view.fusion_features(layer) for view in self.views])

    def fusion_inputs(self, layer: str) -> FusionInputs | None:
        o = self.fusion_features(layer)
        return None if o is None else FusionInputs(o, None, *self.fusion)

    def records(self, layer: str, name: str) -> bool:
        return any(view.records(layer, name) for view in self.views)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        own = features[-self.rows:] if self.copies > 1 else features
        start = 0
        for view in self.views:
            end = start + len(view.slots)
            view.record(layer, name, own[start:end] if len(self.views) > 1 else own)
            start = end
