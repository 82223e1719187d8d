"""What a ControlNet costs per frame: the same frames rendered without and with it.

    python -m tools.controlnet_cost                       # built-in model + built-in ControlNet, 256², CPU
    python -m tools.controlnet_cost --model sd15-random --controlnet sd15-random --size 256 --frames 3

One engine with the ControlNet renders the same moving synthetic drawing
(`bench.frames.synthetic_frames`) in two streams: conditioning off (scale 0: the
ControlNet never runs; only the control image, about 1 ms at 256², is still
derived) and on (scale 1.0, "lines" control images), through
`StreamV2V.__call__` (control image, encode, ControlNet + UNet calls, bank,
decode: what a user gets), in stream-batch and latency mode, DyMe bank on.  Rows take turns in rounds
(the order rotating each round), each round timing --frames frames per row
after --warmup untimed ones in a fresh stream, so slow spells of a shared
machine hit both rows alike.  Per row: median ms per frame (wall clock and
the process's CPU time); per round the ratio with/without, reported as
min / median / max over rounds.

`--controlnet sd15-random` derives an SD1.5-sized ControlNet from the
sd15-random UNet (`ControlNetModel.from_unet`, random weights): time does not
depend on the weights, so it gives the real architecture's ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import ControlNetModel

from sv2v_core import BankConfig, StreamConfig, StreamV2V, load_components
from bench.frames import synthetic_frames


def engine(model: str, controlnet: str) -> StreamV2V:
    if controlnet != "sd15-random":
        return StreamV2V(load_components(model, controlnet=controlnet))
    components = load_components(model)
    components.controlnet = ControlNetModel.from_unet(components.unet).eval().requires_grad_(False)
    return StreamV2V(components)


def time_frames(engine: StreamV2V, config: StreamConfig, frames, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each timed frame, in a fresh stream after `warmup` frames."""
    state = engine.new_stream(config)
    walls, cpus = [], []
    for index, frame in enumerate(frames):
        wall, cpu = time.perf_counter(), time.process_time()
        engine(state, frame)
        if index >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--controlnet", default="tiny", help="tiny, sd15-random (derived, random) or an id/path")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["stream", "latency"])
    parser.add_argument("--frames", type=int, default=8, help="timed frames per row and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time means something)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    conditioned = engine(args.model, args.controlnet)
    rows = {"without ControlNet": 0.0, "with ControlNet": 1.0}
    frames = synthetic_frames(args.warmup + args.frames, args.size)
    print(f"{args.model} + ControlNet {args.controlnet}, {args.size}², {args.steps} steps, DyMe bank, "
          f"{args.rounds} rounds × {args.frames} frames, {args.threads} thread(s)")
    print("| mode | without (ms, wall / CPU) | with (ms, wall / CPU) | ratio wall, min / median / max | "
          "ratio CPU, median |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in args.modes:
        config = StreamConfig(prompt="a watercolor painting", width=args.size, height=args.size, steps=args.steps,
                              mode=mode, bank=BankConfig(mode="dyme"), similarity_skip=None, scene_cut=None)
        times = {name: ([], []) for name in rows}
        ratios, cpu_ratios = [], []
        names = list(rows)
        for round_ in range(args.rounds):
            medians = {}
            for name in names[round_ % 2:] + names[:round_ % 2]:  # alternate which row goes first
                walls, cpus = time_frames(conditioned, config.replace(control_scale=rows[name]), frames, args.warmup)
                times[name][0].extend(walls)
                times[name][1].extend(cpus)
                medians[name] = statistics.median(walls), statistics.median(cpus)
            ratios.append(medians["with ControlNet"][0] / medians["without ControlNet"][0])
            cpu_ratios.append(medians["with ControlNet"][1] / medians["without ControlNet"][1])
        cells = [f"{1000 * statistics.median(w):.0f} / {1000 * statistics.median(c):.0f}" for w, c in times.values()]
        print(f"| {mode} | {cells[0]} | {cells[1]} | {min(ratios):.2f} / {statistics.median(ratios):.2f} / "
              f"{max(ratios):.2f} | {statistics.median(cpu_ratios):.2f} |", flush=True)
    conditioned.close()


if __name__ == "__main__":
    main()
