"""Speed and memory of the feature bank: the paper's Table 2, and the peer.

    python -m sv2v_core bench                              # full matrix on the best device
    python -m sv2v_core bench --device cuda --dtype float16 --compile --peer --steps 4 --modes stream --profile
    python -m sv2v_core bench --device cpu --model tiny --size 256 --frames 8   # CPU smoke / ratios

For every LCM step count (--steps) and render mode (--modes: "stream" batch
or "latency"), every bank row (--rows: no bank, queue(1), queue(2),
queue(4), DyMe(1)) renders the same moving synthetic frames through
`StreamV2V.__call__` (encode, UNet calls, bank update, decode to a uint8
image on the host: what a user of the engine gets).  Per row:

- frames per second and per-frame latency (median, p95) over --frames
  timed frames, after --warmup untimed ones (by default enough for the bank
  to reach its steady size, and ≥10 on CUDA); the device is synchronised
  around every frame;
- peak device memory (CUDA: torch.cuda.max_memory_allocated over the row,
  model weights included; CPU: the growth of the process's resident memory,
  sampled after every frame, or n/a) and the bank's own size;
- each as a ratio to the "no bank" row of the same run, steps and mode.

--peer adds the `streamdiffusion` package (PyPI, no bank) built from the same
in-memory components, size, steps and dtype ("peer no bank" row), where it
imports; otherwise the reason is printed.  --profile times each stage of a
frame (UNet call, feature fusion, bank match and merge, autoencoder encode
and decode, host work) with the device synchronised around each stage.

Results go to --output (default bench_results/) as bench.json and bench.md.
Absolute times mean something only on a GPU; on a CPU compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
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
PEER_LABEL = "peer no bank (streamdiffusion)"
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


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Memory:
    """Peak memory over a row: CUDA's allocator peak, or sampled CPU RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = self.base_rss = None
        try:
            import psutil

            self.process = psutil.Process()
        except ImportError:
            self.process = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.process is not None:
            self.base_rss = self.peak_rss = self.process.memory_info().rss

    def sample(self) -> None:
        if self.device.type != "cuda" and self.process is not None:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def result(self) -> tuple[float | None, str]:
        """(GiB, what it is)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30, "peak allocated (incl. weights)"
        if self.process is None:
            return None, "n/a (psutil missing)"
        return (self.peak_rss - self.base_rss) / 2**30, "RSS growth over the row (sampled per frame)"


@dataclass
class Row:
    key: str
    label: str
    steps: int
    mode: str
    frames: int
    warmup: int
    fps: float
    latency_median_ms: float
    latency_p95_ms: float
    memory_gib: float | None
    memory_kind: str
    bank_mib: float
    bank_tokens: dict[str, int] = field(default_factory=dict)
    ratio_time: float | None = None
    ratio_memory: float | None = None
    note: str = ""


def _summary(key, label, steps, mode, times, warmup, memory: tuple[float | None, str], bank_bytes=0, tokens=None,
             note="") -> Row:
    times_ms = np.asarray(times) * 1000
    gib, kind = memory
    return Row(key, label, steps, mode, len(times), warmup, fps=len(times) / max(sum(times), 1e-12),
               latency_median_ms=float(np.median(times_ms)), latency_p95_ms=float(np.percentile(times_ms, 95)),
               memory_gib=gib, memory_kind=kind, bank_mib=bank_bytes / 2**20, bank_tokens=tokens or {}, note=note)


def default_warmup(bank: BankConfig, device: torch.device, compiled: bool) -> int:
    """Frames until the bank has its steady size (and merged once), plus device warm-up."""
    fill = {"none": 1, "queue": bank.merge_every * (bank.size - 1) + 2, "dyme": bank.merge_every + 2}[bank.mode]
    return max(fill, 10 if device.type == "cuda" else 1, 3 if compiled else 0)


def stream_config(size: int, steps: int, mode: str, bank: BankConfig) -> StreamConfig:
    # Every frame is rendered: no similarity skip, no scene-cut bank reset.
    return StreamConfig(prompt=PROMPT, width=size, height=size, strength=STRENGTH, steps=steps, mode=mode,
                        bank=bank, similarity_skip=None, scene_cut=None)


def bench_row(engine, key: str, size: int, steps: int, mode: str, frames: list[np.ndarray], count: int,
              warmup: int | None, *, reset_backend=None) -> Row:
    label, bank = ROWS[key]
    device = engine.device
    if reset_backend is not None:
        reset_backend()
    warmup = default_warmup(bank, device, engine.backend is not None) if warmup is None else warmup
    memory = _Memory(device)
    memory.start()
    state = engine.new_stream(stream_config(size, steps, mode, bank))
    for index in range(warmup):
        engine(state, frames[index % len(frames)])
        memory.sample()
    times = []
    for index in range(warmup, warmup + count):
        frame = frames[index % len(frames)]
        _sync(device)
        start = time.perf_counter()
        engine(state, frame)
        _sync(device)
        times.append(time.perf_counter() - start)
        memory.sample()
    tokens = {layer: state.bank.tokens(layer) for layer in state.bank.layers}
    row = _summary(key, label, steps, mode, times, warmup, memory.result(), state.bank.nbytes(), tokens)
    del state
    return row


def bench_rows_interleaved(engine, keys: list[str], size: int, steps: int, mode: str, frames: list[np.ndarray],
                           count: int, warmup: int | None) -> list[Row]:
    """All rows at once, one frame of each in turn (in rotating order), so a
    machine whose load changes (a shared CPU) slows every row alike.  Memory
    cannot be told apart per row this way: only the bank's size is given."""
    device = engine.device
    states = {key: engine.new_stream(stream_config(size, steps, mode, ROWS[key][1])) for key in keys}
    warmups = {key: default_warmup(ROWS[key][1], device, engine.backend is not None) if warmup is None else warmup
               for key in keys}
    for key, state in states.items():
        for index in range(warmups[key]):
            engine(state, frames[index % len(frames)])
    times: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(count):
        shift = index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            frame = frames[(warmups[key] + index) % len(frames)]
            _sync(device)
            start = time.perf_counter()
            engine(states[key], frame)
            _sync(device)
            times[key].append(time.perf_counter() - start)
    rows = []
    for key, state in states.items():
        row = _summary(key, ROWS[key][0], steps, mode, times[key], warmups[key],
                       (None, "n/a (rows interleaved; see bank MiB)"), state.bank.nbytes(),
                       {layer: state.bank.tokens(layer) for layer in state.bank.layers},
                       note="interleaved with the other rows")
        rows.append(row)
    return rows


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


def make_peer(components, size: int, steps: int, mode: str, dtype: torch.dtype, compile_mode: str | None = None):
    """StreamDiffusion (PyPI 0.1.1) on the same in-memory components, no bank,
    no guidance, the same timesteps; batch denoising in "stream" mode."""
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


def peer_frame(stream, frame: np.ndarray) -> np.ndarray:
    """One frame through the peer, to a uint8 image on the host (as our engine returns).
    On CUDA through its own `__call__`; its `__call__` times itself with CUDA
    events, so on a CPU the same stages are called one by one."""
    from PIL import Image

    image = Image.fromarray(frame)
    if stream.device.type == "cuda":
        out = stream(image)
    else:
        x = stream.image_processor.preprocess(image, stream.height, stream.width).to(stream.device, stream.dtype)
        out = stream.decode_image(stream.predict_x0_batch(stream.encode_image(x)))
    pixels = ((out[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def bench_peer(components, size, steps, mode, dtype, frames, count, warmup, compile_mode=None) -> Row:
    device = components.unet.device
    warmup = max(10 if device.type == "cuda" else 1, 3 if compile_mode else 0) if warmup is None else warmup
    memory = _Memory(device)
    memory.start()
    stream = make_peer(components, size, steps, mode, dtype, compile_mode)
    for index in range(warmup):
        peer_frame(stream, frames[index % len(frames)])
        memory.sample()
    times = []
    for index in range(warmup, warmup + count):
        _sync(device)
        start = time.perf_counter()
        peer_frame(stream, frames[index % len(frames)])
        _sync(device)
        times.append(time.perf_counter() - start)
        memory.sample()
    how = "its __call__" if device.type == "cuda" else "its stages called directly (its __call__ needs CUDA)"
    return _summary("peer", PEER_LABEL, steps, mode, times, warmup, memory.result(),
                    note=f"streamdiffusion 0.1.1, {how}")


# ---------------------------------------------------------------- profile


class StageTimer:
    """Accumulates wall time per stage, synchronising the device around each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.depth = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start
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


def profile_row(engine, key: str, size: int, steps: int, mode: str, frames, count: int, warmup: int | None) -> dict:
    label, bank = ROWS[key]
    device = engine.device
    warmup = default_warmup(bank, device, engine.backend is not None) if warmup is None else warmup
    state = engine.new_stream(stream_config(size, steps, mode, bank))
    for index in range(warmup):
        engine(state, frames[index % len(frames)])
    timer = StageTimer(device)
    with instrumented(engine, state, timer):
        for index in range(warmup, warmup + count):
            with timer.stage("frame (total)"):
                engine(state, frames[index % len(frames)])
    order = ("frame (total)", "autoencoder encode", "UNet call (+ LCM step)", "  feature fusion (cosine, argmax, lerp)",
             "bank update (commit)", "  DyMe match (cosine, argmax)", "  DyMe merge (scatter-mean)",
             "autoencoder decode (+ to host)")
    per_frame = {name: 1000 * timer.total[name] / count for name in order if name in timer.total}
    top = ("autoencoder encode", "UNet call (+ LCM step)", "bank update (commit)", "autoencoder decode (+ to host)")
    per_frame["host work (rest of the frame)"] = per_frame["frame (total)"] - sum(per_frame.get(n, 0.0) for n in top)
    calls = {name: timer.count[name] / count for name in timer.count}
    per_call = {name: 1000 * timer.total[name] / timer.count[name] for name in timer.count}
    return {"row": key, "label": label, "steps": steps, "mode": mode, "frames": count,
            "ms_per_frame": per_frame, "calls_per_frame": calls, "ms_per_call": per_call,
            "compiled": engine.backend is not None}


# ---------------------------------------------------------------- output


def _fmt(value, pattern="{:.1f}", none="n/a") -> str:
    return none if value is None else pattern.format(value)


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
    memory_kind = result["rows"][0]["memory_kind"] if result["rows"] else ""
    for (steps, mode), rows in groups.items():
        lines += [
            f"## {steps}-step LCM, {'stream batch' if mode == 'stream' else 'latency mode'}",
            "",
            "| bank | fps | latency median (ms) | latency p95 (ms) | memory (GiB) | bank (MiB) | time / no bank | memory / no bank |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            lines.append(
                f"| {row['label']} | {row['fps']:.2f} | {row['latency_median_ms']:.1f} | {row['latency_p95_ms']:.1f} | "
                f"{_fmt(row['memory_gib'], '{:.3f}')} | {row['bank_mib']:.1f} | {_fmt(row['ratio_time'], '{:.3f}')} | "
                f"{_fmt(row['ratio_memory'], '{:.3f}')} |"
            )
        lines.append("")
    lines += [f"Memory: {memory_kind}. Time ratio: median latency / the no-bank row's, same run.", ""]
    if result.get("peer_note"):
        lines += [f"Peer: {result['peer_note']}", ""]
    if result.get("targets"):
        lines += ["## Targets (issue 4: H100, 512², 4 steps, DyMe, stream batch)", "",
                  "| target | value | met |", "| --- | ---: | --- |"]
        for target in result["targets"]:
            met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
            lines.append(f"| {target['name']} | {_fmt(target['value'], '{:.3f}')} | {met} |")
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


def add_ratios(rows: list[Row]) -> None:
    """Each row's median latency and memory over the no-bank row of the same steps and mode."""
    for row in rows:
        base = next((r for r in rows if r.key == "none" and (r.steps, r.mode) == (row.steps, row.mode)), None)
        if base is None:
            continue
        row.ratio_time = row.latency_median_ms / base.latency_median_ms
        if row.memory_gib is not None and base.memory_gib:
            row.ratio_memory = row.memory_gib / base.memory_gib


def targets(rows: list[Row], device: torch.device) -> list[dict]:
    find = lambda key: next((r for r in rows if r.key == key and r.steps == 4 and r.mode == "stream"), None)  # noqa: E731
    none, dyme, peer = find("none"), find("dyme1"), find("peer")
    on_gpu = device.type == "cuda"
    out = []

    def add(name, value, ok):
        out.append({"name": name, "value": value, "met": (ok if on_gpu else None) if value is not None else None})

    if dyme:
        add("DyMe fps ≥ 60", dyme.fps, dyme.fps >= 60)
    if dyme and none:
        add("DyMe / no-bank time ≤ 1.10", dyme.ratio_time, dyme.ratio_time <= 1.10)
        if dyme.ratio_memory is not None:
            add("DyMe / no-bank memory ≤ 1.10", dyme.ratio_memory, dyme.ratio_memory <= 1.10)
    if none and peer:
        value = none.latency_median_ms / peer.latency_median_ms
        add("our no-bank / peer no-bank time ≤ 1.00", value, value <= 1.0)
    if dyme and peer:
        value = dyme.latency_median_ms / peer.latency_median_ms
        add("our DyMe / peer no-bank time ≤ 1.10", value, value <= 1.10)
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
    p.add_argument("--frames", type=_positive, default=None, help="timed frames per row (default 100 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed frames per row (default: until the bank is full, at least 10 on CUDA)")
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
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the rows one frame each in turn (default: on for CPU, where other load is common; "
                        "no per-row memory then)")
    p.add_argument("--peer", action="store_true", help="also run the StreamDiffusion package (no bank), if installed")
    p.add_argument("--profile", action="store_true", help="time each stage of a frame (no bank and DyMe rows)")
    p.add_argument("--profile-frames", type=_positive, default=None, help="frames per profile (default 20 CUDA, 3 CPU)")
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


def run(args: argparse.Namespace) -> int:
    from .accel import accelerate, compiled_backend
    from .engine import StreamV2V
    from .models import load_components

    device, dtype = _resolve(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))  # noqa: E731
    count = args.frames or (100 if device.type == "cuda" else 5)
    interleave = args.interleave if args.interleave is not None else device.type == "cpu"
    if interleave and args.compile:
        raise ValueError("--interleave and --compile don't mix (compiled rows get fresh graphs one after another)")
    profile_count = args.profile_frames or (20 if device.type == "cuda" else 3)
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
    engine = StreamV2V(components)
    xformers = {"auto": "auto", "on": True, "off": False}[args.xformers]
    report = accelerate(engine, dtype=dtype, channels_last=not args.no_channels_last, compile=args.compile,
                        compile_mode=args.compile_mode, xformers=xformers)
    if args.tensorrt:
        from .onnx_export import TensorRTBackend

        engine.backend = TensorRTBackend(engine, Path(args.output) / "trt_cache",
                                         fp16=dtype == torch.float16)
        report.compiled = "TensorRT (ONNX export of the UNet with the bank as inputs)"
    say(f"fast path: {report}")

    def reset_backend():
        if args.compile:  # fresh graphs per row, so one row's CUDA-graph pools don't count in the next
            torch._dynamo.reset()
            engine.backend = compiled_backend(engine, mode=args.compile_mode)

    longest = count + max(64, 4 * 4 + 12)
    frames = synthetic_frames(longest, args.size)
    rows: list[Row] = []
    profiles = []
    for steps in args.steps:
        for mode in args.modes:
            if interleave:
                say(f"{steps}-step {mode}: {', '.join(ROWS[k][0] for k in args.rows)} (interleaved) ...")
                group = bench_rows_interleaved(engine, args.rows, args.size, steps, mode, frames, count, args.warmup)
            else:
                group = []
                for key in args.rows:
                    say(f"{steps}-step {mode}: {ROWS[key][0]} ...")
                    group.append(bench_row(engine, key, args.size, steps, mode, frames, count, args.warmup,
                                           reset_backend=reset_backend if args.compile else None))
            for row in group:
                say(f"  {row.label}: {row.fps:.2f} fps, median {row.latency_median_ms:.1f} ms, "
                    f"p95 {row.latency_p95_ms:.1f} ms, memory {_fmt(row.memory_gib, '{:.3f}')} GiB, "
                    f"bank {row.bank_mib:.1f} MiB")
            rows += group
            if args.profile:
                for key in [k for k in ("none", "dyme1") if k in args.rows] or args.rows[:1]:
                    say(f"{steps}-step {mode}: profiling {ROWS[key][0]} ...")
                    profiles.append(profile_row(engine, key, args.size, steps, mode, frames, profile_count,
                                                args.warmup))

    if args.peer and not peer_note:
        engine.close()  # the peer runs the plain UNet: diffusers' own attention processors
        engine.backend = None
        for steps in args.steps:
            for mode in args.modes:
                say(f"{steps}-step {mode}: {PEER_LABEL} ...")
                try:
                    rows.append(bench_peer(components, args.size, steps, mode, dtype, frames, count, args.warmup,
                                           args.compile_mode if args.compile else None))
                except (RuntimeError, TypeError, ValueError, AttributeError) as err:  # the table says why
                    peer_note = f"the peer failed: {type(err).__name__}: {err}"
                    print(f"peer: {peer_note}", file=sys.stderr)
                    break
        if not peer_note:
            peer_note = ("streamdiffusion 0.1.1 (PyPI, installed with --no-deps) on the same in-memory components, "
                         "cfg_type none, same timesteps, dtype and size; diffusers' own attention processors")
    add_ratios(rows)

    builtin_note = None
    if args.model == "sd15-random":
        builtin_note = "sd15-random: SD1.5's architecture with random weights: speed and memory only, no pictures."
    elif args.model == "tiny":
        builtin_note = "tiny: the built-in offline model, far smaller than SD1.5: compare ratios, not absolute times."
    result = {
        "command": command_line(args),
        "environment": {
            "device": str(device), "device_name": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "model": args.model, "size": args.size, "accel": str(report).split("\n")[0], "accel_notes": report.notes,
            "torch": torch.__version__, "python": platform.python_version(), "builtin_note": builtin_note,
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
