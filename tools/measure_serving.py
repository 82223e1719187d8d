"""Frame times of one stream through the engine as served: eager (no backend),
the serving functions run eagerly, and the serving functions compiled
(torch.compile, inductor; CUDA graphs on CUDA), per render mode.

    python tools/measure_serving.py --model tiny --size 256 --threads 1            # the CPU question (item 5)
    python tools/measure_serving.py --model sd15-random --device cuda --dtype float16 --size 512

For each variant and mode: the warm-up (compile and capture) time, then
--frames frames of a moving synthetic drawing, DyMe bank with its default
update every 4 frames: frame time p50 / p95 / max (the bank update's spike
shows in p95 and max), and the stages of a frame (`StreamV2V.stages`):
encode, UNet calls, bank update, decode, p50 and max per frame.

On a CPU the clock is by default the process's CPU time (with --threads 1:
the frame's work, not the time it waits for a core that other jobs hold, as
in sv2v_core.bench); on CUDA wall time, with the device synchronised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from sv2v_core import StreamConfig, StreamV2V, load_components
from bench.frames import synthetic_frames
from sv2v_core.serving import serving_backend

VARIANTS = ("eager", "serving-eager", "serving-compiled")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stages:
    """`StreamV2V.stages`: per-frame totals of each stage."""

    def __init__(self, device, clock) -> None:
        self.device, self.clock, self.frame, self.frames = device, clock, {}, []

    @contextlib.contextmanager
    def __call__(self, name):
        _sync(self.device)
        start = self.clock()
        yield
        _sync(self.device)
        self.frame[name] = self.frame.get(name, 0.0) + self.clock() - start

    def next_frame(self) -> None:
        self.frames.append(self.frame)
        self.frame = {}


def summary(values_ms) -> dict:
    values = np.asarray(values_ms)
    return {"p50": round(float(np.median(values)), 2), "p95": round(float(np.percentile(values, 95)), 2),
            "max": round(float(values.max()), 2)}


def measure(engine, config: StreamConfig, frames, count: int, clock) -> dict:
    device = engine.device
    state = engine.new_stream(config)
    for frame in frames[:8]:  # fill the bank, merge once; first frames of each shape
        engine(state, frame)
    stages = Stages(device, clock)
    engine.stages = stages
    times = []
    try:
        for index in range(8, 8 + count):
            _sync(device)
            start = clock()
            engine(state, frames[index % len(frames)])
            _sync(device)
            times.append(1000 * (clock() - start))
            stages.next_frame()
    finally:
        engine.stages = None
    names = sorted({name for frame in stages.frames for name in frame})
    per_stage = {name: summary([1000 * frame.get(name, 0.0) for frame in stages.frames]) for name in names}
    return {"frame_ms": summary(times), "stages_ms": per_stage}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--modes", nargs="+", default=["latency", "stream"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None,
                        help="wall time, or the process's CPU time (default: cpu on a CPU, wall on CUDA)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    components = load_components(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    engine = StreamV2V(components)
    frames = synthetic_frames(120, args.size)
    clock_name = args.clock or ("cpu" if args.device == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    results = {"clock": clock_name, "model": args.model, "device": args.device, "dtype": args.dtype, "size": args.size,
               "steps": args.steps, "threads": torch.get_num_threads(), "runs": []}
    for variant in args.variants:
        engine.backend = None if variant == "eager" else serving_backend(engine, compile=variant == "serving-compiled",
                                                                         buckets=(1,))
        for mode in args.modes:
            config = StreamConfig(prompt="a watercolor painting", width=args.size, height=args.size,
                                  steps=args.steps, mode=mode, similarity_skip=None, scene_cut=None)
            start = time.perf_counter()
            engine.warm_up([config])
            warm = time.perf_counter() - start
            run = {"variant": variant, "mode": mode, "warm_up_s": round(warm, 1),
                   **measure(engine, config, frames, args.frames, clock)}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
        torch._dynamo.reset()
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
