"""What the Ray hop costs, and how long a session takes to recover from a killed replica.

    python -m bench.raybench                                  # built-in model, 64², 1 replica, 1 and 2 sessions
    python -m bench.raybench --size 256 --frames 40 --repeat 3
    python -m bench.raybench --address auto --model SimianLuo/LCM_Dreamshaper_v7 --size 512   # a GPU cluster

Each row streams `--frames` frames per session (after `--warmup`), every
session on its own thread with one frame in flight (the page's flow
control), first through the in-process renderer (the engine in this
process) and then through the Ray renderer (CanvasWorker replicas), with
the same model, size and frames; rows take turns, one at a time, `--repeat`
times.  Latency is submit -> reply per frame; frames/s is per session.
Without `--address` a local Ray instance is started with fake GPUs (one per
replica) and the replicas render on the CPU, one torch thread each, as the
in-process renderer here does.

Recovery: with the Ray rows done, `--sessions` sessions stream on the
replicas, the replica of the first one is killed, and the time from the
kill to that session's next render (a warm start on another replica, new
epoch) is printed, with the latency of frames in flight at that moment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np


def moving_frames(count: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(150, 250, (size, size, 3)).astype(np.uint8)
    frames = []
    for index in range(count):
        frame = base.copy()
        x = (index * max(1, size // 32)) % (size // 2)
        frame[size // 4:size // 2, x:x + size // 4] = 40
        frames.append(frame)
    return frames


def stream(renderer, sessions: int, frames: int, warmup: int, config, tag: str) -> tuple[list[float], list[float]]:
    """(latencies in ms, frames/s per session) of `sessions` sessions streaming at once."""
    from ui.renderer import StepRequest

    latencies: list[float] = []
    rates: list[float] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        session_id = f"{tag}-{index}"
        inputs = moving_frames(warmup + frames, config.width, index)
        renderer.open(session_id)
        for frame in inputs[:warmup]:
            renderer.step(session_id, StepRequest(frame, config)).result()
        mine = []
        started = time.perf_counter()
        for frame in inputs[warmup:]:
            sent = time.perf_counter()
            renderer.step(session_id, StepRequest(frame, config)).result()
            mine.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
        renderer.close(session_id)
        with lock:
            latencies.extend(mine)
            rates.append(frames / elapsed)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, rates


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def recovery(renderer, sessions: int, config) -> dict:
    """Kill the first session's replica mid-stream; seconds to its next render, and that render's latency."""
    import ray

    from ui.ray_renderer import APP_NAME
    from ui.renderer import StepRequest

    ids = [f"recover-{index}" for index in range(sessions)]
    inputs = {s: moving_frames(8, config.width, 10 + i) for i, s in enumerate(ids)}
    for session_id in ids:
        renderer.open(session_id)
        renderer.step(session_id, StepRequest(inputs[session_id][0], config)).result()
    victim = renderer.owner(ids[0])
    before = renderer.step(ids[0], StepRequest(inputs[ids[0]][1], config)).result()
    killed = time.perf_counter()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#CanvasWorker#{victim}", namespace="serve"), no_restart=True)
    reply = renderer.step(ids[0], StepRequest(inputs[ids[0]][2], config)).result()
    recovered = time.perf_counter() - killed
    after_ms = []
    for frame in inputs[ids[0]][3:]:
        sent = time.perf_counter()
        renderer.step(ids[0], StepRequest(frame, config)).result()
        after_ms.append((time.perf_counter() - sent) * 1000)
    for session_id in ids:
        renderer.close(session_id)
    return {"seconds": recovered, "new_epoch": reply.epoch != before.epoch, "moved": reply.worker != victim,
            "after_ms": statistics.median(after_ms)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=None, help="a Ray cluster (default: start a local one, fake GPUs)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-recovery", dest="recovery", action="store_false")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from sv2v_core.config import StreamConfig

    from ui.ray_renderer import WorkerOptions, deploy
    from ui.local_renderer import local_renderer

    torch.set_num_threads(1)
    config = StreamConfig(width=args.size, height=args.size, mode="latency", similarity_skip=None)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=2 * args.replicas + 2, num_gpus=args.replicas + 1, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    ray_renderer = deploy(WorkerOptions(model=args.model, base=config, max_sessions=max(args.sessions) + 1,
                                        torch_threads=None if args.address else 1), replicas=args.replicas)
    from ui.ray_renderer import load_worker_engine

    engine = load_worker_engine(WorkerOptions(model=args.model, base=config))
    local = local_renderer(engine)
    local.warm_up([config])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load average (1 min) {os.getloadavg()[0]:.1f}; model {args.model}, "
          f"{args.size}², latency mode, {args.replicas} replica(s), this process on {device}; "
          f"{args.frames} frames per session after {args.warmup}, {args.repeat} run(s) each, median (min–max)")
    print("| renderer | sessions | latency p50 ms | p95 ms | frames/s per session |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for sessions in args.sessions:
        rows: dict[str, list[tuple[float, float, float]]] = {"in-process": [], "ray": []}
        for run in range(args.repeat):
            for name, renderer in (("in-process", local), ("ray", ray_renderer)):
                latencies, rates = stream(renderer, sessions, args.frames, args.warmup, config, f"{name}-{run}")
                rows[name].append((percentile(latencies, 50), percentile(latencies, 95), statistics.mean(rates)))
        for name, runs in rows.items():
            cells = []
            for column in range(3):
                values = [run[column] for run in runs]
                cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
            print(f"| {name} | {sessions} | " + " | ".join(cells) + " |")
        hop = [r[0] - l[0] for r, l in zip(rows["ray"], rows["in-process"])]
        print(f"\nRay hop, {sessions} session(s): p50 latency + {statistics.median(hop):.1f} ms "
              f"({min(hop):.1f}–{max(hop):.1f}) over in-process\n")
    if args.recovery:
        if args.replicas < 2:
            print("recovery: needs --replicas 2 or more (the session moves to another replica)")
        else:
            result = recovery(ray_renderer, min(args.sessions[-1], args.replicas * 2), config)
            print(f"recovery after a replica is killed: {result['seconds'] * 1000:.0f} ms to the session's next render "
                  f"(moved: {result['moved']}, new epoch: {result['new_epoch']}); "
                  f"then {result['after_ms']:.1f} ms per frame (p50)")
    local.shutdown()
    ray_renderer.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
