"""Speed and memory of the feature bank: the paper's Table 2, and the peer.

    python -m bench.engine                              # full matrix on the best device
    python -m bench.engine --device cuda --dtype float16 --compile --peer --steps 4 --modes stream --profile
    python -m bench.engine --device cpu --model tiny --size 256 --steps 4 --rows none dyme1 --peer   # CPU ratios

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
frame through the engine's timing seam (autoencoder encode, UNet calls,
bank update, autoencoder decode, and the host work left) for the no-bank
and DyMe rows and the peer.

Results go to --output (default bench_results/) as bench.json and bench.md.
Absolute times mean something only on a GPU; on a CPU compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sv2v_core.config import RENDER_MODES
from sv2v_core.loader import DEVICES, DTYPES, EngineOptions, load, resolve_device, resolve_dtype

from .frames import synthetic_frames
from .peer import PeerRow, peer_components, peer_problem
from .profile import profile_row
from .report import PAPER_TABLE2, fmt, markdown, targets
from .rows import ROWS, EngineRow, default_warmup
from .timing import Row, add_ratios, bench_group, model_bytes



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
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="default: float16 on CUDA, float32 on CPU and for the built-in tiny (sv2v_core.loader)")
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
    parts = ["python -m bench.engine"]
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
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device, args.model)


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
    from sv2v_core.accel import accelerate, compiled_backend
    from sv2v_core.engine import StreamV2V

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
        from sv2v_core.onnx_export import require_tensorrt

        require_tensorrt()  # says plainly why not, before loading anything

    say(f"loading {args.model} on {device} ({str(dtype).replace('torch.', '')}) ...")
    options = EngineOptions(model=args.model, vae=args.vae, lora=args.lora, device=device, dtype=dtype)
    components = load(options).components  # not the engine yet: the peer copies the UNet before it is patched
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
        from sv2v_core.onnx_export import TensorRTBackend

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
                    f"{row.fps:.2f} fps, memory {fmt(row.memory_gib, '{:.3f}')} GiB, bank {row.bank_mib:.1f} MiB")
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
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
