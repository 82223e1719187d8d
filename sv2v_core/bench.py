"""Speed and memory of the feature bank: the paper's Table 2, and the peer.

    python -m sv2v_core bench                              # full matrix on the best device
    python -m sv2v_core bench --device cuda --dtype float16 --compile --peer --steps 4 --modes stream --profile
    python -m sv2v_core bench --device cpu --model tiny --size 256 --steps 4 --rows none dyme1 --peer   # CPU ratios

For every LCM step count (--steps) and render mode (--modes: "stream" batch
or "latency"), every bank row (--rows: no bank, queue(1), queue(2),
queue(4), DyMe(1)) and, with --peer, the `streamdiffusion` package (no bank)
render the same moving synthetic frames.  A frame is timed from a uint8
H×W×3 array in to a uint8 array on the host out (for us
`StreamV2V.__call__`: preprocessing, encode, UNet calls, bank update,
decode, to host; for the peer the same stages of its pipeline), with the
device synchronised around every frame.  On CUDA a frame's time is wall
time; on a CPU it is by default the process's CPU time on one thread
(--clock, --threads): the frame's work, without the time it spends waiting
for a core that other jobs hold.

How the rows are timed, so that a row's figure depends neither on which
other rows share the run nor on modest outside load (a shared CPU):

- every row has its own stream (bank, frames in flight, noise) and its own
  sequence of input frames, and is warmed up alone until its bank has its
  steady size (--warmup);
- then --rounds rounds: in each, every row renders a block of --block
  frames in turn, the order rotating by one row per round; a row's state
  carries over from block to block, so its bank stays steady;
- a row's figure for a round is the median frame time of its block; the
  table gives the median over rounds with the min and max (the spread);
- ratios (to the no-bank row, to the peer) are taken round by round between
  blocks run next to each other, and given as median (min–max) over rounds.

Memory (CUDA only): each row alone, from a fresh stream, before the timed
rounds: peak allocated during the row minus what was allocated before it,
plus one model's weights.  On a CPU the process's memory cannot be split
per row (the allocator keeps what earlier rows freed), so only the bank's
own size is given.

--peer adds the `streamdiffusion` package (PyPI 0.1.1) built from the same
components (its own copy of the UNet, with diffusers' attention processors;
the same autoencoder and prompt), size, timesteps and dtype, where it
imports; otherwise the reason is printed.  --profile times each stage of a
frame (UNet call, feature fusion, bank match and merge, autoencoder encode
and decode, host work) for the no-bank and DyMe rows and the peer.

Results go to --output (default bench_results/) as bench.json and bench.md.
Absolute times mean something only on a GPU; on a CPU compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RENDER_MODES, BankConfig, StreamConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROWS = {
    "none": ("no bank", BankConfig(mode="none")),
    "queue1": ("queue(1)", BankConfig(mode="queue", size=1)),
    "queue2": ("queue(2)", BankConfig(mode="queue", size=2)),
    "queue4": ("queue(4)", BankConfig(mode="queue", size=4)),
    "dyme1": ("DyMe(1)", BankConfig(mode="dyme", size=1)),
}
PROMPT = "a watercolor painting"
STRENGTH = 0.4
PAPER_TABLE2 = {  # A100, 512², 4 steps, stream batch: ms per frame, GiB (nvidia-smi)
    "none": (60, 3.68), "queue1": (70, 4.03), "queue2": (79, 4.17), "queue4": (100, 4.77), "dyme1": (75, 4.07),
}


# ---------------------------------------------------------------- input frames


def synthetic_frames(count: int, size: int) -> list[np.ndarray]:
    """A drawing that keeps changing: a gradient background, a disc moving
    along a circle and a stroke that grows, so consecutive frames differ by a
    little (no frame is skipped as identical, none looks like a scene cut)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    background = np.stack([200 + 40 * xx, 190 + 50 * yy, 230 - 30 * xx], axis=-1)
    frames = []
    for index in range(count):
        image = background.copy()
        angle = 2 * np.pi * index / 60
        cx, cy = 0.5 + 0.25 * np.cos(angle), 0.5 + 0.25 * np.sin(angle)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.015] = (40, 80, 200)
        length = 0.1 + 0.8 * ((index % 90) / 90)
        image[(np.abs(yy - 0.3) < 0.012) & (xx > 0.05) & (xx < 0.05 + length)] = (20, 20, 20)
        frames.append(image.clip(0, 255).astype(np.uint8))
    return frames


# ---------------------------------------------------------------- the rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        return instrumented(self.engine, self.state, timer)


class PeerRow:
    """The `streamdiffusion` package (no bank) as a row: the stages of its
    `__call__` (preprocessing, encode, denoising, decode) under `no_grad` as
    there, then the same conversion to a uint8 image on the host as ours.
    (Its `__call__` itself times the frame with CUDA events, which need CUDA.)"""

    key = "peer"
    label = "peer no bank (streamdiffusion)"

    def __init__(self, components, size: int, steps: int, mode: str, dtype: torch.dtype, warmup: int,
                 compile_mode: str | None = None) -> None:
        self.components, self.size, self.steps, self.mode = components, size, steps, mode
        self.dtype, self.compile_mode, self.warmup = dtype, compile_mode, warmup
        self.stream = None

    def start(self) -> None:
        self.stream = make_peer(self.components, self.size, self.steps, self.mode, self.dtype, self.compile_mode)

    def stop(self) -> None:
        self.stream = None

    @torch.no_grad()
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.decode(self.stream.predict_x0_batch(self.encode(frame)))

    def encode(self, frame: np.ndarray) -> torch.Tensor:
        from PIL import Image

        stream = self.stream
        pixels = stream.image_processor.preprocess(Image.fromarray(frame), stream.height, stream.width)
        return stream.encode_image(pixels.to(device=stream.device, dtype=stream.dtype))

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        pixels = self.stream.decode_image(latent)
        pixels = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()

    def bank_bytes(self) -> int:
        return 0

    def bank_tokens(self) -> dict[str, int]:
        return {}

    @contextlib.contextmanager
    def instrumented(self, timer: "StageTimer"):
        """Time its stages under the same names as ours (undone on exit)."""
        self.encode = timer.wrap("autoencoder encode", self.encode)
        self.decode = timer.wrap("autoencoder decode (+ to host)", self.decode)
        self.stream.unet_step = timer.wrap("UNet call (+ LCM step)", self.stream.unet_step)
        try:
            yield
        finally:
            for name in ("encode", "decode"):
                self.__dict__.pop(name, None)
            self.stream.__dict__.pop("unet_step", None)


# ---------------------------------------------------------------- the peer


def peer_problem() -> str | None:
    """Why the peer cannot run here, or None."""
    try:
        import streamdiffusion  # noqa: F401
        from streamdiffusion import StreamDiffusion  # noqa: F401
    except (ImportError, AttributeError, TypeError) as err:  # missing, or built for another diffusers
        return (f"the peer `streamdiffusion` is not usable here ({type(err).__name__}: {err}); "
                "install it with: pip install --no-deps streamdiffusion")
    return None


def peer_components(components):
    """The peer's components: its own copy of the UNet (ours carries the bank's
    processors and hooks; the peer runs diffusers' own), the rest shared.
    Make them before the engine patches the UNet."""
    from .attention import BankAttnProcessor

    if any(isinstance(p, BankAttnProcessor) for p in components.unet.attn_processors.values()):
        raise ValueError("the UNet already carries the bank's processors: make the peer's components "
                         "before StreamV2V patches it")
    return dataclasses.replace(components, unet=copy.deepcopy(components.unet))


def make_peer(components, size: int, steps: int, mode: str, dtype: torch.dtype, compile_mode: str | None = None):
    """StreamDiffusion (PyPI 0.1.1) on the given components, no bank, no
    guidance, the same timesteps; batch denoising in "stream" mode."""
    from diffusers import StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion

    from .engine import LCM_ORIGINAL_STEPS, lcm_timesteps

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    train = components.scheduler.config.num_train_timesteps
    stride = train // LCM_ORIGINAL_STEPS
    t_index_list = [(train - 1 - t) // stride for t in lcm_timesteps(STRENGTH, steps, train)]
    stream = StreamDiffusion(pipe, t_index_list=t_index_list, torch_dtype=dtype, width=size, height=size,
                             use_denoising_batch=mode == "stream", cfg_type="none")
    stream.prepare(PROMPT, num_inference_steps=LCM_ORIGINAL_STEPS, guidance_scale=1.0)
    if compile_mode is not None:
        stream.unet = torch.compile(stream.unet, mode=compile_mode, dynamic=False)
    return stream


# ---------------------------------------------------------------- timing


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
                _sync(device)
                start = clock()
                render(row)
                _sync(device)
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


# ---------------------------------------------------------------- profile


class StageTimer:
    """Accumulates wall time per stage, synchronising the device around each."""

    def __init__(self, device: torch.device, clock=time.perf_counter) -> None:
        self.device, self.clock = device, clock
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        _sync(self.device)
        start = self.clock()
        try:
            yield
        finally:
            _sync(self.device)
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
    from . import attention, bank, merging

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


# ---------------------------------------------------------------- output


def _fmt(value, pattern="{:.1f}", none="n/a") -> str:
    return none if value is None else pattern.format(value)


def _spread(values: list[float] | None, pattern: str = "{:.3f}") -> str:
    """'median (min–max)' or n/a."""
    if values is None:
        return "n/a"
    median, low, high = (pattern.format(v) for v in values)
    return f"{median} ({low}–{high})"


CLOCKS = {
    "wall": "wall time, the device synchronised before and after",
    "cpu": "this process's CPU time (one thread: the frame's work, without the time spent waiting for a core)",
}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# StreamV2V Canvas benchmark",
        "",
        f"{env['device_name']} · model {env['model']} · {env['size']}×{env['size']} · {env['dtype']} · "
        f"{env['accel']}",
        "",
    ]
    if env.get("builtin_note"):
        lines += [env["builtin_note"], ""]
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["steps"], row["mode"]), []).append(row)
    first = result["rows"][0] if result["rows"] else None
    for (steps, mode), rows in groups.items():
        lines += [
            f"## {steps}-step LCM, {'stream batch' if mode == 'stream' else 'latency mode'}",
            "",
            "| row | ms per frame: median (min–max) | fps | time / no bank | time / peer | memory (GiB) | "
            "bank (MiB) | memory / no bank |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            lines.append(
                f"| {row['label']} | {_spread([row['ms'], row['ms_min'], row['ms_max']], '{:.1f}')} | "
                f"{row['fps']:.2f} | {_spread(row['ratio_time'])} | {_spread(row['ratio_peer'])} | "
                f"{_fmt(row['memory_gib'], '{:.3f}')} | {row['bank_mib']:.1f} | {_fmt(row['ratio_memory'], '{:.3f}')} |"
            )
        lines.append("")
    if first is not None:
        lines += [
            f"Timing: every row warmed up alone, then {first['rounds']} rounds of {first['block']} frames per row "
            "in rotating order, each row with its own stream; a row's figure per round is the median frame time "
            "of its block; the table gives the median over rounds and (min–max). Time ratios are taken round by "
            "round against the no-bank row's or the peer's block of the same round: median (min–max). "
            f"Frame time: {CLOCKS.get(env.get('clock'), 'wall time')}. Memory: {first['memory_kind']}.",
            "",
        ]
    load = env.get("load_average")
    if load:
        lines += [f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
                  f"on {env.get('cpu_count')} CPUs; {env.get('threads')} torch threads.", ""]
    if result.get("peer_note"):
        lines += [f"Peer: {result['peer_note']}", ""]
    if result.get("targets"):
        lines += ["## Targets (issue 4: H100, 512², 4 steps, DyMe, stream batch)", "",
                  "| target | value: median (min–max) | met |", "| --- | ---: | --- |"]
        for target in result["targets"]:
            met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
            value = target["value"]
            text = _spread(value) if isinstance(value, list) else _fmt(value, "{:.3f}")
            lines.append(f"| {target['name']} | {text} | {met} |")
        lines.append("")
    for profile in result.get("profiles", []):
        lines += [f"## Profile: {profile['label']}, {profile['steps']}-step, {profile['mode']} "
                  f"({profile['frames']} frames, device synchronised around each stage)", "",
                  "| stage | ms per frame | calls per frame | ms per call |", "| --- | ---: | ---: | ---: |"]
        for name, ms in profile["ms_per_frame"].items():
            calls = profile["calls_per_frame"].get(name)
            per_call = profile["ms_per_call"].get(name)
            lines.append(f"| {name} | {ms:.2f} | {_fmt(calls, '{:.2f}', '')} | {_fmt(per_call, '{:.2f}', '')} |")
        lines.append("")
    lines += ["Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def targets(rows: list[Row], device: torch.device) -> list[dict]:
    find = lambda key: next((r for r in rows if r.key == key and r.steps == 4 and r.mode == "stream"), None)  # noqa: E731
    none, dyme, peer = find("none"), find("dyme1"), find("peer")
    on_gpu = device.type == "cuda"
    out = []

    def add(name, value, ok):
        out.append({"name": name, "value": value, "met": ok if on_gpu else None})

    if dyme:
        add("DyMe fps ≥ 60", dyme.fps, dyme.fps >= 60)
    if dyme and none:
        add("DyMe / no-bank time ≤ 1.10", dyme.ratio_time, dyme.ratio_time[0] <= 1.10)
        if dyme.ratio_memory is not None:
            add("DyMe / no-bank memory ≤ 1.10", dyme.ratio_memory, dyme.ratio_memory <= 1.10)
    if none and peer:
        add("our no-bank / peer no-bank time ≤ 1.00", none.ratio_peer, none.ratio_peer[0] <= 1.0)
    if dyme and peer:
        add("our DyMe / peer no-bank time ≤ 1.10", dyme.ratio_peer, dyme.ratio_peer[0] <= 1.10)
    return out


# ---------------------------------------------------------------- command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sd15-random",
                   help="sd15-random (SD1.5 architecture, random weights: the default), tiny, a Hugging Face id or path")
    p.add_argument("--vae", default=None, help="TAESD id or path for real weights")
    p.add_argument("--lora", default=None, help="LCM-LoRA id or path for real weights")
    p.add_argument("--size", type=_positive, default=512, help="square render size (default 512)")
    p.add_argument("--steps", type=_positive, nargs="+", default=[4, 1], help="LCM step counts (default: 4 1)")
    p.add_argument("--modes", nargs="+", default=list(RENDER_MODES), choices=RENDER_MODES,
                   help="stream batch and/or latency mode (default: both)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="bank rows (default: all)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="rounds of timed blocks; each row's spread is over these (default 10 on CUDA, 7 on CPU)")
    p.add_argument("--block", type=_positive, default=None,
                   help="timed frames per row per round (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed frames per row (default: until the bank is full, at least 10 on CUDA)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default 1 on CPU: with more, one core busy elsewhere stalls every "
                        "parallel op of a frame; measured up to 18× slower frames on 2 cores. CUDA: torch's choice)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="what a frame's time is: wall (elapsed) or cpu (this process's CPU time: on one thread, the "
                        "frame's work without the time spent waiting for a core that other jobs hold). "
                        "Default: cpu on a CPU, wall on CUDA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (bank as explicit inputs)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (default reduce-overhead: CUDA graphs)")
    p.add_argument("--xformers", default="auto", choices=("auto", "on", "off"),
                   help="auto: where importable on CUDA and not compiling; on: required")
    p.add_argument("--no-channels-last", action="store_true", help="keep the default memory format")
    p.add_argument("--tensorrt", action="store_true", help="run the UNet through TensorRT (needs `tensorrt`)")
    p.add_argument("--peer", action="store_true", help="also run the StreamDiffusion package (no bank), if installed")
    p.add_argument("--profile", action="store_true", help="time each stage of a frame (no bank, DyMe and the peer)")
    p.add_argument("--profile-frames", type=_positive, default=None, help="frames per profile (default 20 CUDA, 4 CPU: one DyMe merge period)")
    p.add_argument("--output", default="bench_results", help="folder for bench.json and bench.md")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every option that differs from its default)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["python -m sv2v_core bench"]
    for name, value in vars(args).items():
        if name not in defaults or value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(flag + " " + " ".join(str(v) for v in value))
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _resolve(args) -> tuple[torch.device, torch.dtype]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    dtype = (torch.float16 if device == "cuda" else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    return torch.device(device), dtype


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def run(args: argparse.Namespace) -> int:
    """The benchmark; torch's CPU thread count is set for it and restored after."""
    threads = args.threads or (1 if _resolve(args)[0].type == "cpu" else None)
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(saved)


def _run(args: argparse.Namespace) -> int:
    from .accel import accelerate, compiled_backend
    from .engine import StreamV2V
    from .models import load_components

    device, dtype = _resolve(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))  # noqa: E731
    cuda = device.type == "cuda"
    rounds = args.rounds or (10 if cuda else 7)
    block = args.block or (10 if cuda else 3)
    profile_count = args.profile_frames or (20 if cuda else 4)
    clock_name = args.clock if args.clock != "auto" else ("wall" if cuda else "cpu")
    if clock_name == "cpu" and cuda:
        raise ValueError("--clock cpu counts this process's CPU time, not the GPU's: use --clock wall on CUDA")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    load_before = _load_average()
    peer_note = None
    if args.peer:
        peer_note = peer_problem()
        if peer_note:
            print(f"peer: not run: {peer_note}", file=sys.stderr)
    if args.tensorrt:
        from .onnx_export import require_tensorrt

        require_tensorrt()  # says plainly why not, before loading anything

    say(f"loading {args.model} on {device} ({str(dtype).replace('torch.', '')}) ...")
    components = load_components(args.model, vae=args.vae, lora=args.lora, device=device, dtype=dtype)
    peer_parts = peer_components(components) if args.peer and not peer_note else None
    engine = StreamV2V(components)
    xformers = {"auto": "auto", "on": True, "off": False}[args.xformers]
    report = accelerate(engine, dtype=dtype, channels_last=not args.no_channels_last, compile=args.compile,
                        compile_mode=args.compile_mode, xformers=xformers)
    if peer_parts is not None:  # the same dtype, memory format and attention kernel as ours
        layout = torch.channels_last if report.channels_last else torch.contiguous_format
        torch.nn.Module.to(peer_parts.unet, dtype=engine.dtype, memory_format=layout)  # (diffusers' own .to warns)
        if report.attention.startswith("xformers"):
            peer_parts.unet.enable_xformers_memory_efficient_attention()
    if args.tensorrt:
        from .onnx_export import TensorRTBackend

        engine.backend = TensorRTBackend(engine, Path(args.output) / "trt_cache",
                                         fp16=dtype == torch.float16)
        report.compiled = "TensorRT (ONNX export of the UNet with the bank as inputs)"
    say(f"fast path: {report}")

    def reset_backend():  # fresh compiled graphs (and CUDA-graph pools)
        torch._dynamo.reset()
        engine.backend = compiled_backend(engine, mode=args.compile_mode)

    frames = synthetic_frames(64, args.size)
    weights = model_bytes(components)
    compile_mode = args.compile_mode if args.compile else None
    rows: list[Row] = []
    profiles = []
    for steps in args.steps:
        for mode in args.modes:
            group = [EngineRow(engine, key, args.size, steps, mode, args.warmup) for key in args.rows]
            if peer_parts is not None:
                warmup = default_warmup(ROWS["none"][1], device, args.compile) if args.warmup is None else args.warmup
                group.append(PeerRow(peer_parts, args.size, steps, mode, dtype, warmup, compile_mode))
            say(f"{steps}-step {mode}: {', '.join(row.label for row in group)}: "
                f"{rounds} rounds × {block} frames per row ...")
            measured = bench_group(group, frames, rounds, block, device, weights,
                                   reset_backend if args.compile else None, clock)
            for row in measured:
                say(f"  {row.label}: median {row.ms:.1f} ms ({row.ms_min:.1f}–{row.ms_max:.1f}), "
                    f"{row.fps:.2f} fps, memory {_fmt(row.memory_gib, '{:.3f}')} GiB, bank {row.bank_mib:.1f} MiB")
            rows += measured
            if args.profile:
                chosen = [row for row in group if row.key in ("none", "dyme1", "peer")] or group[:1]
                for row in chosen:
                    say(f"{steps}-step {mode}: profiling {row.label} ...")
                    profiles.append(profile_row(row, frames, profile_count, device, clock))
    add_ratios(rows)
    if peer_parts is not None:
        peer_note = ("streamdiffusion 0.1.1 (PyPI, installed with --no-deps) on the same components (its own copy "
                     "of the UNet with diffusers' attention processors), cfg_type none, same timesteps, dtype and "
                     "size; the stages of its __call__, from a uint8 array in to a uint8 array on the host out")
        if args.tensorrt:
            peer_note += "; its UNet runs in PyTorch, not TensorRT"

    builtin_note = None
    if args.model == "sd15-random":
        builtin_note = "sd15-random: SD1.5's architecture with random weights: speed and memory only, no pictures."
    elif args.model == "tiny":
        builtin_note = "tiny: the built-in offline model, far smaller than SD1.5: compare ratios, not absolute times."
    load_after = _load_average()
    result = {
        "command": command_line(args),
        "environment": {
            "device": str(device), "device_name": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "model": args.model, "size": args.size, "accel": str(report).split("\n")[0], "accel_notes": report.notes,
            "torch": torch.__version__, "python": platform.python_version(), "builtin_note": builtin_note,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "clock": clock_name,
            "load_average": None if load_before is None or load_after is None else [load_before, load_after],
        },
        "rows": [row.__dict__ for row in rows],
        "targets": targets(rows, device),
        "profiles": profiles,
        "peer_note": peer_note,
        "paper_table2_a100": PAPER_TABLE2,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    (out / "bench.md").write_text(table)
    print(table)
    say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sv2v_core.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
