"""The app at the speed it serves: its engine, through the fast channel, against the GPU targets.

    python -m bench.appcheck                                                 # sd15-random at 512², the GPU
    python -m bench.appcheck --device cpu --model tiny --size 64 --seconds 2 # a dry run on a CPU

One process and one engine, loaded as `python app.py` loads it (sv2v_core.loader: compiled serving
graphs on CUDA by default, --compile as the app's), then for each row a fresh service and server
(ui.server: what the app runs) and simulated artists: Python clients of the fast channel
(bench.loadtest.Artist) on threads of this process, sending JPEGs encoded in advance with the page's
settings (the steps).  Before each row the service is warmed up as the app warms up before it serves
(`--warm page`, the default: every bucket of every setting the page offers; `--warm rows`: the
settings of the rows only, which is quicker where compiling is slow, and serves the rows the same),
and the time it took is reported.  Rows, in this order (the canvas's own first):

- one artist, latency mode, 4 steps; 8 artists batched, latency mode, 4 steps; one artist, latency
  mode, 1 step; one artist, stream mode, 4 steps and 1 step.
- One artist keeps one snapshot in flight: it sends the next when the render of the last has come,
  so a render's latency is the path and its frame, with no wait behind another snapshot of its own
  (a page times its second snapshot to arrive as the model frees up, which is the same).  The 8
  artists keep two in flight each, as the load test's do, so each snapshot waits for a tick.

Per row: renders/s per artist (the slowest), latency (snapshot sent -> its render received: p50,
p95), frame time (the model's time per render, its tick's: p50, p95, max), batch sizes, errors, and
the targets (`TARGETS`, the issue's for an H100 or H200 with sd15-random at 512² and DyMe), met or
missed.  Results are written after every row to OUT/appcheck.json and OUT/appcheck.md, so a run cut
short keeps the rows it finished.  The exit status is 1 when a row had errors or no renders, 0
otherwise (targets are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .channel_client import share_secret
from .live import app_device, builtin_engine
from .timing import frame_times, percentile

SETTLE_SECONDS = 1.0
WARMUP_SECONDS = 1.0  # each row's artists draw this long before the measurement
# (artists, mode, steps): the rows
ROWS = ((1, "latency", 4), (8, "latency", 4), (1, "latency", 1), (1, "stream", 4), (1, "stream", 1))
# The targets for an H100 or H200, sd15-random at 512², DyMe: (artists, mode, steps) -> bounds.
TARGETS = {
    (1, "latency", 4): dict(renders=20, latency_p50=70),
    (1, "stream", 4): dict(renders=40),
    (8, "latency", 4): dict(renders=8, latency_p95=250),
}
SPIKE = 1.5  # every row: frame time p95 at most this times its p50
TARGET_CONDITIONS = ("sd15-random", 512, "cuda")


@dataclass
class Row:
    artists: int
    mode: str
    steps: int
    seconds: float
    warm_up_s: float = 0.0
    renders_min: float = 0.0      # renders/s of the slowest artist
    renders_total: float = 0.0
    latency_p50: float = float("nan")
    latency_p95: float = float("nan")
    frame_ms: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    renders: int = 0


def warm_up(service, steps: list[int], how: str) -> float:
    """Warm the service up before a row (`how`: "page", as the app does; "rows": these steps only);
    the seconds it took, a background compile included."""
    started = time.monotonic()
    if how == "page":
        service.warm_up()
    else:
        service.renderer.warm_up([service.base.replace(steps=count) for count in steps])
    backend = getattr(service.renderer.engine, "backend", None)
    if hasattr(backend, "wait"):
        backend.wait()
    return time.monotonic() - started


def run_row(engine, size: int, artists: int, mode: str, steps: int, seconds: float, warm: str,
            row_steps: list[int]) -> Row:
    """`artists` simulated artists on a fresh app around `engine` for WARMUP_SECONDS + `seconds`."""
    from ui.presets import load_presets
    from ui.server import create_service, free_port, serve
    from ui.settings import Settings

    from .loadtest import Artist, measured, stop_all

    row = Row(artists, mode, steps, seconds)
    time.sleep(SETTLE_SECONDS)
    service = create_service(engine, size=size, render_mode=mode)
    try:
        row.warm_up_s = warm_up(service, row_steps, warm)
        presets = load_presets()
        app = serve(service, presets, port=free_port(), block=False)
        settings = Settings("", next(iter(presets)), 0.4, steps, 0, "dyme", True, True)
        drawing = [Artist(app.url, user, artists, size, check_colour=False, settings=settings,
                          depth=1 if artists == 1 else 2) for user in range(artists)]
        try:
            for artist in drawing:
                artist.thread.start()
            time.sleep(WARMUP_SECONDS)
            before, start = service.stats().batches, time.perf_counter()
            time.sleep(seconds)
            end, after = time.perf_counter(), service.stats().batches
        finally:
            stop_all(drawing)
            app.close()
    finally:
        service.close()
    rates, latencies, frames = measured(drawing, start, end)
    for artist in drawing:
        row.errors += artist.client.log.errors + ([artist.failure] if artist.failure else [])
    row.renders = len(latencies)
    row.renders_min, row.renders_total = min(rates), sum(rates)
    row.latency_p50, row.latency_p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    row.frame_ms = frame_times(frames)
    row.batches = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
    return row


def verdicts(row: Row) -> list[tuple[str, bool]]:
    """The targets of a row: (what was measured against what, met)."""
    checks = []
    target = TARGETS.get((row.artists, row.mode, row.steps), {})
    if "renders" in target:
        checks.append((f"renders/s {'each ' if row.artists > 1 else ''}{row.renders_min:.1f} >= {target['renders']}",
                       row.renders_min >= target["renders"]))
    for name in ("latency_p50", "latency_p95"):
        if name in target:
            value = getattr(row, name)
            checks.append((f"latency {name[-3:]} {value:.0f} ms <= {target[name]}", value <= target[name]))
    p50, p95 = row.frame_ms.get("p50", float("nan")), row.frame_ms.get("p95", float("nan"))
    checks.append((f"frame p95 {p95:.0f} ms <= {SPIKE} × p50 {p50:.0f} ms", p95 <= SPIKE * p50))
    return checks


def label(row: Row) -> str:
    return f"{row.artists} artist{'s' if row.artists > 1 else ''}, {row.mode}, {row.steps} step{'s' * (row.steps > 1)}"


def markdown(rows: list[Row], conditions: str, on_target: bool) -> str:
    lines = [conditions, "",
             "| row | warm-up s | renders/s (slowest artist) | total | latency p50 ms | p95 | frame ms p50 | p95 | max "
             "| batch sizes (ticks) | errors | targets |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for row in rows:
        frame = row.frame_ms
        batches = " ".join(f"{size}×{count}" for size, count in sorted(row.batches.items()))
        met = "; ".join(f"{text} {'ok' if good else 'MISSED'}" for text, good in verdicts(row))
        lines.append(f"| {label(row)} | {row.warm_up_s:.0f} | {row.renders_min:.1f} | {row.renders_total:.1f} | "
                     f"{row.latency_p50:.0f} | {row.latency_p95:.0f} | {frame.get('p50', float('nan')):.0f} | "
                     f"{frame.get('p95', float('nan')):.0f} | {frame.get('max', float('nan')):.0f} | {batches} | "
                     f"{len(row.errors)} | {met} |")
    if not on_target:
        lines += ["", "(Not the targets' conditions, " + f"{TARGET_CONDITIONS[0]} at {TARGET_CONDITIONS[1]}² on CUDA: "
                  "the targets are shown, not meant.)"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.appcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="a built-in model: sd15-random (default) or tiny")
    parser.add_argument("--size", type=int, default=512, help="render size (default 512)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the engine runs (default: as the app, CUDA where there is a GPU)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the app's --compile")
    parser.add_argument("--warm", choices=("page", "rows"), default="page",
                        help="warm up every setting the page offers (as the app) or the rows' settings only")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per row")
    parser.add_argument("--artists", type=int, default=8, help="artists of the batched row (default 8)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    share_secret()  # the app started below and the clients make their keys from it
    import torch

    from ui.server import model_threads

    args = parse_args(argv)
    device = app_device() if args.device == "auto" else args.device
    threads = model_threads(None, device)  # the app's own
    if threads:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    engine = builtin_engine(args.model, args.compile, device=device)
    loaded_s = time.monotonic() - started
    plan = [(args.artists if artists > 1 else 1, mode, steps) for artists, mode, steps in ROWS]
    name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else f"{os.cpu_count()} CPUs"
    conditions = (f"{time.strftime('%Y-%m-%d %H:%M')}, {name}, {args.model} at {args.size}², {engine.dtype}, "
                  f"{'compiled serving graphs' if engine.backend is not None else 'eager'} (--compile {args.compile}), "
                  f"--warm {args.warm}, {torch.get_num_threads()} model thread(s), engine loaded in {loaded_s:.0f} s; "
                  f"{args.seconds:g} s measured per row after {WARMUP_SECONDS:g} s; load average (1 min) "
                  f"{os.getloadavg()[0]:.1f} at the start")
    on_target = (args.model, args.size, engine.device.type) == TARGET_CONDITIONS
    rows: list[Row] = []
    try:
        for artists, mode, steps in plan:
            row_steps = sorted({steps for _, other, steps in plan if other == mode})
            row = run_row(engine, args.size, artists, mode, steps, args.seconds, args.warm, row_steps)
            rows.append(row)
            frame = row.frame_ms
            print(f"{label(row)}: warm-up {row.warm_up_s:.0f} s, {row.renders_min:.1f} renders/s (slowest), "
                  f"latency p50 {row.latency_p50:.0f} ms p95 {row.latency_p95:.0f} ms, frame p50/p95/max "
                  f"{frame.get('p50', 0):.0f}/{frame.get('p95', 0):.0f}/{frame.get('max', 0):.0f} ms, "
                  f"{len(row.errors)} errors; " + "; ".join(f"{text} {'ok' if good else 'MISSED'}"
                                                           for text, good in verdicts(row)), flush=True)
            (args.out / "appcheck.json").write_text(json.dumps(
                {"conditions": conditions, "on_target": on_target, "rows": [asdict(r) for r in rows]}, indent=2))
            (args.out / "appcheck.md").write_text(markdown(rows, conditions, on_target))
    finally:
        engine.close()
    print(markdown(rows, conditions, on_target))
    failed = [label(row) for row in rows if row.errors or not row.renders]
    if failed:
        print(f"error: rows with errors or no renders: {', '.join(failed)}", file=sys.stderr)
        for row in rows:
            for error in row.errors[:3]:
                print(f"  {label(row)}: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
