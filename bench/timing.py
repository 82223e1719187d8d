"""Timing the engine benchmark's rows: rotation, spread, ratios, memory; percentiles for every benchmark."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0-1) of `values`, nearest rank (nan for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def frame_times(values_ms: list[float]) -> dict[str, float]:
    """p50, p95 and max of frame times (ms): a spike every few frames shows in p95 and max."""
    return {"p50": percentile(values_ms, 0.5), "p95": percentile(values_ms, 0.95),
            "max": max(values_ms) if values_ms else float("nan")}


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) to finish what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: list, frames: list[np.ndarray], rounds: int, block: int, device: torch.device,
              clock=time.perf_counter) -> dict[str, list[float]]:
    """Each row's median frame time (seconds) in each of `rounds` rounds.

    Every row is warmed up alone (`row.warmup` untimed frames), then each
    round gives every row a block of `block` timed frames in turn, the order
    rotated by one row per round.  Each row gets its own run of `frames`
    (from the first on) and keeps its stream across blocks: what a row
    renders, and how many of its frames are timed, do not depend on the
    other rows.  The rows must be started."""
    given = {row.key: 0 for row in rows}

    def render(row) -> None:
        row(frames[given[row.key] % len(frames)])
        given[row.key] += 1

    for row in rows:
        for _ in range(row.warmup):
            render(row)
    medians: dict[str, list[float]] = {row.key: [] for row in rows}
    for round_index in range(rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            times = []
            for _ in range(block):
                sync(device)
                start = clock()
                render(row)
                sync(device)
                times.append(clock() - start)
            medians[row.key].append(float(np.median(times)))
    return medians


def model_bytes(components) -> int:
    """One model's weights and buffers (UNet, autoencoder, text encoder)."""
    return sum(t.numel() * t.element_size() for module in components.modules()
               for t in (*module.parameters(), *module.buffers()))


def row_memory(row, frames: list[np.ndarray], count: int, device: torch.device, weights: int) -> float:
    """CUDA: the row alone from a fresh stream for `count` frames: peak
    allocated minus what was allocated before (GiB), plus `weights` bytes."""
    row.stop()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    row.start()
    for index in range(count):
        row(frames[index % len(frames)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    row.stop()
    return (peak - before + weights) / 2**30


@dataclass
class Row:
    key: str
    label: str
    steps: int
    mode: str
    rounds: int
    block: int
    warmup: int
    round_ms: list[float]  # the row's median frame time in each round
    memory_gib: float | None
    memory_kind: str
    bank_mib: float
    bank_tokens: dict[str, int] = field(default_factory=dict)
    ms: float = 0.0  # median over rounds, and the spread
    ms_min: float = 0.0
    ms_max: float = 0.0
    fps: float = 0.0
    ratio_time: list[float] | None = None  # [median, min, max] over rounds, against the same round's no-bank block
    ratio_peer: list[float] | None = None  # the same against the peer's block
    ratio_memory: float | None = None

    def __post_init__(self) -> None:
        self.ms, self.ms_min, self.ms_max = spread(self.round_ms)
        self.fps = 1000.0 / self.ms


def spread(values: list[float]) -> list[float]:
    """[median, min, max]."""
    return [float(np.median(values)), float(min(values)), float(max(values))]


def add_ratios(rows: list[Row]) -> None:
    """Each row's time over the no-bank row's and the peer's, round by round
    (blocks run next to each other), within the same steps and mode; memory
    over the no-bank row's."""
    for row in rows:
        group = [r for r in rows if (r.steps, r.mode) == (row.steps, row.mode)]
        base = next((r for r in group if r.key == "none"), None)
        peer = next((r for r in group if r.key == "peer"), None)
        if base is not None:
            row.ratio_time = spread([a / b for a, b in zip(row.round_ms, base.round_ms, strict=True)])
            if row.memory_gib is not None and base.memory_gib:
                row.ratio_memory = row.memory_gib / base.memory_gib
        if peer is not None:
            row.ratio_peer = spread([a / b for a, b in zip(row.round_ms, peer.round_ms, strict=True)])


def bench_group(rows: list, frames: list[np.ndarray], rounds: int, block: int, device: torch.device,
                weights: int, reset_backend=None, clock=time.perf_counter) -> list[Row]:
    """Memory (CUDA: each row alone), then the timed rounds; one `Row` each."""
    memory = {}
    if device.type == "cuda":
        for row in rows:
            if reset_backend is not None:  # fresh graphs per row: no row's CUDA-graph pool counts in another's
                reset_backend()
            memory[row.key] = row_memory(row, frames, row.warmup + block, device, weights)
        if reset_backend is not None:
            reset_backend()
    memory_kind = ("peak allocated with the row alone, incl. one model's weights" if device.type == "cuda"
                   else "n/a on CPU (the process's memory cannot be split per row); see bank MiB")
    for row in rows:
        row.start()
    try:
        medians = time_rows(rows, frames, rounds, block, device, clock)
        return [Row(row.key, row.label, row.steps, row.mode, rounds, block, row.warmup,
                    [1000 * s for s in medians[row.key]], memory.get(row.key), memory_kind,
                    row.bank_bytes() / 2**20, row.bank_tokens())
                for row in rows]
    finally:
        for row in rows:
            row.stop()
