"""Latency benchmark of the live path: a real app, a real browser drawing.

    python -m bench.live                                   # echo 0 / 15 / 40 ms at 512², built-in model at 256²
    python -m bench.live --cases echo:15 --modes latency stream --repeat 3
    python -m bench.live --cases echo:0 --channels ws gradio
    python -m bench.live --codecs                          # snapshot formats: encode in Chromium, decode, size

For every row (a case × render mode × channel, repeated `--repeat` times) it
starts the app in this process with a fresh service and server (ui.server,
the same code `python app.py` runs), opens the page in a fresh headless
Chromium (Debian's /usr/bin/chromium; nothing is downloaded), draws one
continuous stroke with synthetic pointer events at the display's frame rate
(requestAnimationFrame), and measures over `--seconds` after one second of
warm-up:

- latency: snapshot taken -> its render drawn on the page (p50, p95);
- frame time: the model's time for each render (p50, p95, max: a spike
  every few frames, such as the bank update's, shows in p95 and max);
- renders/s: renders drawn per second of the window;
- model busy: the fraction of wall time the (simulated) model worked;
- overhead breakdown, medians in ms: page encode, transfer (both ways),
  server decode, wait (mailbox), model, server encode, display (render
  received -> drawn); overhead = latency - model;
- final: after the stroke ends, whether the last snapshot's render was
  drawn (the end-of-stroke flush).

Cases: `echo:MS` is bench.echo.EchoEngine (the input comes back as the render
after MS per frame: 0 shows the path's own cost, 15 a fast GPU, 40 a slower
one) at 512²; `tiny:SIZE` is the built-in model.  Its renders/s are compared
with what the engine can do at all: it is also run alone in the same mode on
similar frames right before and right after its row, on the thread that
renders for the app (the mean is the reference), and once more while the
browser draws the same stroke on a bare canvas (no app), to tell the path's
cost from the browser's.  The app is measured as it ships: its engine is
loaded as `python app.py` loads it (sv2v_core.loader, with --compile as the
app's; a compiled engine is warmed up, the background compile included,
before a row is measured, and the warm-up's time is reported), and the
app's model threads are the app's default (ui.server.model_threads: all
cores but one on a CPU, the browser drawing here needs one) unless
--torch-threads says otherwise; the engine alone uses the same.  Rows
never share a server or a browser, so a row does not depend on which
others run with it.

Results go to OUT/live.json and OUT/live.md (default bench_results/).
CPU timings on a shared machine are noisy: run with --repeat 3 and read the
spread (min-max) that the table shows next to each median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .channel_client import share_secret
from .echo import EchoEngine
from .timing import frame_times, percentile
from ui.presets import load_presets
from ui.server import create_service, free_port, model_threads, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
WARMUP_SECONDS = 1.0
SETTLE_SECONDS = 1.0
FINAL_TIMEOUT = 30.0
BREAKDOWN = ("encode", "transfer", "decode", "wait", "model", "serverEncode", "display")
MODEL_CASES = {"tiny": 256, "sd15-random": 512}  # built-in models and their default render size
TARGETS = {  # the targets for this machine: (renders/s at least, busy at least, p50 at most, overhead p50 at most)
    "echo:0": dict(renders=30, overhead=20),
    "echo:15": dict(renders=25, busy=0.80, p50=45),
    "echo:40": dict(busy=0.90, p50=90),
}

# A bare canvas that draws what DRAW_JS moves over it (on the visible canvas and a hidden
# layer, as the app's canvas does), for the engine-beside-a-drawing-browser reference.
BARE_CANVAS = """<canvas class='sv2v-canvas' width=512 height=512 style='width:512px;height:512px'></canvas>
<script>
const view = document.querySelector('canvas'), layer = document.createElement('canvas');
layer.width = layer.height = 512;
const contexts = [view.getContext('2d'), layer.getContext('2d')];
contexts[0].fillStyle = '#fff'; contexts[0].fillRect(0, 0, 512, 512);
for (const c of contexts) { c.lineWidth = 14; c.lineCap = 'round'; c.strokeStyle = '#1d3f8c'; }
let last = null;
view.addEventListener('pointermove', (e) => {
  const p = [e.offsetX, e.offsetY];
  if (last) for (const c of contexts) { c.beginPath(); c.moveTo(...last); c.lineTo(...p); c.stroke(); }
  last = p;
});
</script>"""

# Draws one continuous stroke (a Lissajous curve) with one pointer move per animation frame.
DRAW_JS = """() => {
  const c = document.querySelector('canvas.sv2v-canvas');
  const ev = (type, x, y) => {
    const box = c.getBoundingClientRect();
    c.dispatchEvent(new PointerEvent(type, {pointerId: 1, pointerType: 'mouse', button: 0, buttons: 1,
      clientX: box.left + x * box.width / 512, clientY: box.top + y * box.height / 512, bubbles: true}));
  };
  const t0 = performance.now();
  window.sv2vDrawing = {moves: 0, stop: false, done: false};
  ev('pointerdown', 256, 256);
  const frame = () => {
    const t = (performance.now() - t0) / 1000;
    if (window.sv2vDrawing.stop) { ev('pointerup', 256, 256); window.sv2vDrawing.done = true; return; }
    ev('pointermove', 256 + 200 * Math.sin(t * 2.1), 256 + 200 * Math.sin(t * 3.3));
    window.sv2vDrawing.moves += 1;
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}"""


@dataclass
class Row:
    case: str
    mode: str
    channel: str
    seconds: float
    renders: int = 0
    renders_per_s: float = 0.0
    latency_p50: float = float("nan")
    latency_p95: float = float("nan")
    frame_ms: dict = field(default_factory=dict)  # the model's time per render: p50, p95, max
    overhead_p50: float = float("nan")
    model_busy: float = float("nan")
    dropped: int = 0
    final_shown: bool = False
    snapshots: int = 0
    breakdown: dict = field(default_factory=dict)
    engine_alone_fps: float | None = None
    engine_alone_runs: list = field(default_factory=list)
    engine_beside_drawing_fps: float | None = None
    server_cpu: float = float("nan")
    browser_cpu: float = float("nan")
    warm_up_s: float = 0.0  # the service's warm-up (and a background compile) before the row


def _browser_cpu_seconds() -> float:
    """CPU seconds used so far by the Chromium processes this process started (nan without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def _drawing_frames(size: int, count: int) -> list[np.ndarray]:
    """A stroke growing over a white canvas, like the page's snapshots."""
    frames, canvas = [], np.full((size, size, 3), 255, np.uint8)
    for i in range(count):
        x = int(size * (0.2 + 0.6 * i / max(1, count - 1)))
        canvas[size // 3: size // 3 + size // 16, max(0, x - size // 20): x] = (30, 60, 160)
        frames.append(canvas.copy())
    return frames


def engine_alone_fps(engine, size: int, mode: str, frames: int = 12, warmup: int = 3) -> float:
    """Frames per second of the engine rendering a drawing by itself (no app, no browser)."""
    from ui.settings import make_config
    from sv2v_core.config import StreamConfig

    base = StreamConfig(width=size, height=size, mode=mode, similarity_skip=None)
    config = make_config(base, prompt="", strength=0.4, steps=4, seed=0, bank="dyme", ea=True, ff=True)
    state = engine.new_stream(config)
    pictures = _drawing_frames(size, frames + warmup)
    for picture in pictures[:warmup]:
        engine(state, picture)
    started = time.perf_counter()
    for picture in pictures[warmup:]:
        engine(state, picture)
    return frames / (time.perf_counter() - started)


def make_engine(case: str, models: dict, compile: str = "auto"):
    """(engine, render size) of a case: echo:MS, or MODEL:SIZE for a built-in model (tiny, sd15-random).

    A built-in model loads as the app loads it: on CUDA when there is a GPU
    (sd15-random in float16; tiny in float32 everywhere), else on the CPU,
    with the serving choice `compile` (the app's --compile).
    """
    kind, _, value = case.partition(":")
    if kind == "echo":
        return EchoEngine(float(value or 0)), 512
    if kind in MODEL_CASES:
        if kind not in models:
            models[kind] = builtin_engine(kind, compile)
        return models[kind], int(value or MODEL_CASES[kind])
    raise SystemExit(f"error: unknown case {case!r} (use echo:MS, tiny:SIZE or sd15-random:SIZE)")


def builtin_engine(name: str, compile: str = "auto", device: str = "auto"):
    """A built-in model's engine, loaded as the app loads it (sv2v_core.loader): on CUDA where there is
    a GPU (sd15-random in float16, tiny in float32), else on the CPU (or on `device`), made for serving
    with `compile`."""
    from sv2v_core.loader import EngineOptions, load_engine

    return load_engine(EngineOptions(model=name, serving=True, compile=compile, device=device)).engine


def app_device() -> str:
    """Where the app renders on this machine ("cuda" or "cpu"), as `python app.py` decides."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def warmed_up(service) -> float:
    """Warm the service up as the app does before serving, and wait for a background compile too (so a
    row measures the engine as it serves once warm); the seconds it took."""
    started = time.monotonic()
    service.warm_up()
    backend = getattr(service.renderer.engine, "backend", None)
    if hasattr(backend, "wait"):
        backend.wait()
    return time.monotonic() - started


def _gpu_name(models: dict) -> str:
    devices = {engine.device for engine in models.values() if engine.device.type == "cuda"}
    if not devices:
        return ""
    import torch

    return ", " + ", ".join(torch.cuda.get_device_name(device) for device in devices)


def is_model(case: str) -> bool:
    return case.partition(":")[0] in MODEL_CASES


def run_python_row(case: str, mode: str, seconds: float, models: dict, compile: str = "auto") -> Row:
    """A row without a browser: a Python client on the fast channel keeps one snapshot rendering
    and one waiting, from frames encoded in advance (so it measures the server path alone)."""
    import io

    from PIL import Image

    from ui import wire
    from .channel_client import ChannelClient

    engine, size = make_engine(case, models, compile)
    row = Row(case, mode, "python", seconds)
    alone = is_model(case)
    time.sleep(SETTLE_SECONDS)
    service = create_service(engine, size=size, render_mode=mode)
    row.warm_up_s = warmed_up(service)
    measure_alone = lambda: service.renderer.call(lambda: engine_alone_fps(engine, size, mode)).result()  # noqa: E731
    if alone:
        row.engine_alone_runs.append(measure_alone())
    pictures = []
    for frame in _drawing_frames(size, 64):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=int(wire.SNAPSHOT_QUALITY * 100))
        pictures.append(buffer.getvalue())
    app = serve(service, load_presets(), port=free_port(), block=False)
    busy = lambda: engine.busy_seconds if isinstance(engine, EchoEngine) else service.stats().busy_seconds  # noqa: E731
    try:
        with ChannelClient(app.url, "bench", pictures) as client:
            client.start()
            start_busy, start_wall, start_cpu = busy(), time.monotonic(), time.process_time()
            while time.monotonic() - start_wall < seconds:
                client.step()
            end_busy, end_wall = busy(), time.monotonic()
            row.server_cpu = (time.process_time() - start_cpu) / (end_wall - start_wall)
            row.final_shown = True
    finally:
        app.close()
    latencies = [render.latency_ms for render in client.log.renders]
    models = [render.model_ms for render in client.log.renders]
    try:
        if alone:
            row.engine_alone_runs.append(measure_alone())
            row.engine_alone_fps = statistics.mean(row.engine_alone_runs)
    finally:
        service.close()
    wall = end_wall - start_wall
    row.renders, row.renders_per_s = len(latencies), len(latencies) / wall
    row.model_busy = (end_busy - start_busy) / wall
    row.latency_p50, row.latency_p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    row.frame_ms = frame_times(models)
    row.overhead_p50 = percentile([lat - model for lat, model in zip(latencies, models)], 0.5)
    row.breakdown["model"] = statistics.median(models) if models else None
    return row


def run_row(playwright, case: str, mode: str, channel: str, seconds: float, models: dict,
            compile: str = "auto") -> Row:
    from playwright.sync_api import TimeoutError as PageTimeout

    engine, size = make_engine(case, models, compile)
    row = Row(case, mode, channel, seconds)
    alone = is_model(case)
    time.sleep(SETTLE_SECONDS)  # the previous row's browser may still be exiting
    service = create_service(engine, size=size, render_mode=mode)
    row.warm_up_s = warmed_up(service)
    # Alone, but on the thread that renders for the app (torch's thread pool is per calling thread).
    measure_alone = lambda: service.renderer.call(lambda: engine_alone_fps(engine, size, mode)).result()  # noqa: E731
    if alone:
        row.engine_alone_runs.append(measure_alone())
    app = serve(service, load_presets(), port=free_port(), block=False)
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(app.url + ("?channel=gradio" if channel == "gradio" else ""))
        page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=120_000)
        page.wait_for_function("(c) => window.sv2vStats && window.sv2vStats.channel === c", arg=channel,
                               timeout=30_000)
        page.evaluate(DRAW_JS)
        time.sleep(WARMUP_SECONDS)
        busy = lambda: engine.busy_seconds if isinstance(engine, EchoEngine) else service.stats().busy_seconds  # noqa: E731
        start_page, start_busy, start_wall = page.evaluate("performance.now()"), busy(), time.monotonic()
        start_dropped, start_cpu = service.stats().dropped, time.process_time()
        start_browser = _browser_cpu_seconds()
        time.sleep(seconds)
        end_page, end_busy, end_wall = page.evaluate("performance.now()"), busy(), time.monotonic()
        row.server_cpu = (time.process_time() - start_cpu) / (end_wall - start_wall)
        row.browser_cpu = (_browser_cpu_seconds() - start_browser) / (end_wall - start_wall)
        row.dropped = service.stats().dropped - start_dropped
        page.evaluate("() => { window.sv2vDrawing.stop = true; }")
        page.wait_for_function("() => window.sv2vDrawing.done")
        row.snapshots = int(page.evaluate("() => Number(document.querySelector('canvas.sv2v-canvas').dataset.seq)"))
        try:
            page.wait_for_function("(n) => window.sv2vStats.shownSeq >= n", arg=row.snapshots,
                                   timeout=FINAL_TIMEOUT * 1000)
            row.final_shown = True
        except PageTimeout:
            row.final_shown = False
        samples = [s for s in page.evaluate("() => window.sv2vStats.samples") if start_page <= s["t"] <= end_page]
        page.close()
        if alone:
            row.engine_beside_drawing_fps = _beside_drawing(browser, measure_alone)
    finally:
        browser.close()
        app.close()
    try:
        if alone:
            time.sleep(SETTLE_SECONDS)
            row.engine_alone_runs.append(measure_alone())
            row.engine_alone_fps = statistics.mean(row.engine_alone_runs)
    finally:
        service.close()
    wall = end_wall - start_wall
    row.renders = len(samples)
    row.renders_per_s = len(samples) / wall
    row.model_busy = (end_busy - start_busy) / wall
    latencies = [s["latency"] for s in samples]
    row.latency_p50, row.latency_p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    row.frame_ms = frame_times([s["model"] for s in samples if isinstance(s.get("model"), (int, float))])
    overheads = [s["latency"] - s["model"] for s in samples if s.get("model") is not None]
    row.overhead_p50 = percentile(overheads, 0.5)
    for name in BREAKDOWN:
        values = [s[name] for s in samples if isinstance(s.get(name), (int, float))]
        row.breakdown[name] = statistics.median(values) if values else None
    return row


def _beside_drawing(browser, measure) -> float:
    """`measure()` while the browser draws the benchmark's stroke on a bare canvas."""
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    try:
        page.set_content(BARE_CANVAS)
        page.evaluate(DRAW_JS)
        return measure()
    finally:
        page.close()


# -- snapshot codecs ---------------------------------------------------------------
CODECS_JS = """async ([image, type, quality, side, n]) => {
  const c = document.createElement('canvas'); c.width = 512; c.height = 512;
  const x = c.getContext('2d');
  const img = new Image(); img.src = image; await img.decode();
  x.drawImage(img, 0, 0, 512, 512);
  x.strokeStyle = '#1d3f8c'; x.lineWidth = 14; x.lineCap = 'round';
  const small = document.createElement('canvas'); small.width = side; small.height = side;
  const times = [], sizes = [];
  let last = null;
  for (let i = 0; i < n; i++) {
    x.beginPath(); x.moveTo(100 + i * 3, 100); x.lineTo(130 + i * 3, 160 + (i % 7) * 5); x.stroke();
    const t0 = performance.now();
    let target = c;
    if (side !== 512) { small.getContext('2d').drawImage(c, 0, 0, side, side); target = small; }
    last = target.toDataURL(type, quality);
    times.push(performance.now() - t0); sizes.push(last.length * 3 / 4);
  }
  times.sort((a, b) => a - b); sizes.sort((a, b) => a - b);
  return {encode: times[n >> 1], size: sizes[n >> 1], last};
}"""


def measure_codecs(playwright, picture: Path) -> list[dict]:
    """Encode time in Chromium, bytes, and PIL decode time of a drawing over `picture`."""
    import base64
    import io

    from PIL import Image

    source = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode("ascii")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    rows = []
    try:
        page = browser.new_page()
        for side in (512, 256):
            for kind, quality in (("image/png", None), ("image/jpeg", 0.75), ("image/jpeg", 0.85),
                                  ("image/jpeg", 0.92), ("image/webp", 0.8)):
                result = page.evaluate(CODECS_JS, [source, kind, quality, side, 30])
                data = base64.b64decode(result["last"].split(",", 1)[1])
                decode = []
                for _ in range(20):
                    started = time.perf_counter()
                    with Image.open(io.BytesIO(data)) as image:
                        image.load()
                    decode.append((time.perf_counter() - started) * 1000)
                rows.append(dict(side=side, format=kind.split("/")[1], quality=quality, encode_ms=result["encode"],
                                 kilobytes=result["size"] / 1024, decode_ms=statistics.median(decode)))
    finally:
        browser.close()
    return rows


# -- reporting ----------------------------------------------------------------------
def _spread(values: list[float], digits: int = 0, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None and v == v]
    if not values:
        return "–"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def markdown(rows: list[Row]) -> str:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.case, row.mode, row.channel), []).append(row)
    lines = [
        "| case | mode | channel | renders/s | latency p50 | p95 | frame ms p50 | p95 | max | overhead p50 | "
        "model busy | final | encode | transfer | decode | wait | model | server encode | display | "
        "engine alone fps | engine beside the drawing browser fps |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for (case, mode, channel), group in groups.items():
        parts = [case, mode, channel, _spread([r.renders_per_s for r in group], 1),
                 _spread([r.latency_p50 for r in group]), _spread([r.latency_p95 for r in group]),
                 *(_spread([r.frame_ms.get(name) for r in group]) for name in ("p50", "p95", "max")),
                 _spread([r.overhead_p50 for r in group]), _spread([r.model_busy for r in group], 0, 100) + " %",
                 "yes" if all(r.final_shown for r in group) else "NO"]
        parts += [_spread([r.breakdown.get(name) for r in group], 1) for name in BREAKDOWN]
        for name in ("engine_alone_fps", "engine_beside_drawing_fps"):
            values = [getattr(r, name) for r in group if getattr(r, name)]
            parts.append(_spread(values, 2) if values else "")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def codecs_markdown(rows: list[dict]) -> str:
    lines = ["| side | format | quality | Chromium encode ms | KB | PIL decode ms |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['format']} | {r['quality'] or ''} | {r['encode_ms']:.1f} | "
                     f"{r['kilobytes']:.1f} | {r['decode_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def check_targets(rows: list[Row]) -> list[str]:
    """Lines saying which of the issue's targets the medians meet."""
    lines = []
    for case, target in TARGETS.items():
        group = [r for r in rows if r.case == case and r.mode == "latency" and r.channel == "ws"]
        if not group:
            continue
        med = lambda name: statistics.median(getattr(r, name) for r in group)  # noqa: E731
        checks = []
        if "renders" in target:
            checks.append((f"renders/s {med('renders_per_s'):.1f} >= {target['renders']}", med("renders_per_s") >= target["renders"]))
        if "busy" in target:
            checks.append((f"busy {med('model_busy'):.0%} >= {target['busy']:.0%}", med("model_busy") >= target["busy"]))
        if "p50" in target:
            checks.append((f"p50 {med('latency_p50'):.0f} ms <= {target['p50']}", med("latency_p50") <= target["p50"]))
        if "overhead" in target:
            checks.append((f"overhead p50 {med('overhead_p50'):.0f} ms <= {target['overhead']}", med("overhead_p50") <= target["overhead"]))
        lines.append(f"{case}: " + "; ".join(f"{text} {'ok' if good else 'MISSED'}" for text, good in checks))
    for case in sorted({r.case for r in rows if is_model(r.case)}):
        for mode in sorted({r.mode for r in rows if r.case == case}):
            group = [r for r in rows if r.case == case and r.mode == mode and r.channel == "ws"]
            if group:
                ratio = statistics.median(r.renders_per_s / r.engine_alone_fps for r in group)
                beside = statistics.median(r.renders_per_s / r.engine_beside_drawing_fps for r in group)
                lines.append(f"{case} {mode}: renders/s / engine alone = {ratio:.2f} "
                             f"({'ok' if ratio >= 0.9 else 'MISSED'}: within 10 %); "
                             f"/ engine beside the drawing browser = {beside:.2f}")
            python = [r for r in rows if r.case == case and r.mode == mode and r.channel == "python"]
            if python:
                ratio = statistics.median(r.renders_per_s / r.engine_alone_fps for r in python)
                lines.append(f"{case} {mode}, Python client (no browser): renders/s / engine alone = {ratio:.2f}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["echo:0", "echo:15", "echo:40", "tiny:256"],
                        help="echo:MS (echo engine, MS per frame, 512²) or MODEL:SIZE, a built-in model: tiny (on the CPU) or "
                             "sd15-random (SD1.5's size, random weights; on CUDA in float16 where there is a GPU)")
    parser.add_argument("--modes", nargs="+", choices=("latency", "stream"), default=["latency"])
    parser.add_argument("--channels", nargs="+", choices=("ws", "gradio", "python"), default=["ws"],
                        help="ws: the page on the fast channel; gradio: the page forced onto Gradio's events; "
                             "python: no browser, a Python client on the fast channel (the server path alone)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured drawing time per row")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row (the table shows median and spread)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--codecs", action="store_true", help="measure snapshot formats instead")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for the model, in the app and alone alike (default: the app's own, "
                             "ui.server.model_threads; 0: torch's choice)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="the app's --compile for the built-in models' engine (default auto, as the app)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    share_secret()  # the app started below and the clients make their keys from it
    args = parse_args(argv)
    browser = args.codecs or any(channel != "python" for channel in args.channels)
    if browser and not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is not installed (apt-get install chromium)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    threads = model_threads(None, app_device(), args.torch_threads)  # the app's own, on loopback as here
    if threads:
        import torch

        torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        playwright = None
        if browser:
            from playwright.sync_api import sync_playwright

            playwright = stack.enter_context(sync_playwright())
        if args.codecs:
            rows = measure_codecs(playwright, Path(__file__).resolve().parent.parent / "docs" / "screenshot.png")
            (args.out / "codecs.json").write_text(json.dumps(rows, indent=2))
            table = codecs_markdown(rows)
            (args.out / "codecs.md").write_text(table)
            print(table)
            return 0
        models: dict = {}
        rows: list[Row] = []
        load_before = os.getloadavg()
        for _ in range(args.repeat):
            for case in args.cases:
                for mode in args.modes:
                    for channel in args.channels:
                        if channel == "python":
                            row = run_python_row(case, mode, args.seconds, models, args.compile)
                        else:
                            row = run_row(playwright, case, mode, channel, args.seconds, models, args.compile)
                        rows.append(row)
                        frame = row.frame_ms
                        print(f"{case} {mode} {channel}: {row.renders_per_s:.1f} renders/s, p50 {row.latency_p50:.0f} ms,"
                              f" p95 {row.latency_p95:.0f} ms, frame p50/p95/max {frame.get('p50', 0):.0f}/"
                              f"{frame.get('p95', 0):.0f}/{frame.get('max', 0):.0f} ms, warm-up {row.warm_up_s:.1f} s,"
                              f" busy {row.model_busy:.0%}, final {row.final_shown},"
                              f" CPU cores: app {row.server_cpu:.2f}, browser {row.browser_cpu:.2f}"
                              + (f", engine alone {row.engine_alone_fps:.2f} fps" if row.engine_alone_fps else "")
                              + (f", beside the drawing browser {row.engine_beside_drawing_fps:.2f} fps"
                                 if row.engine_beside_drawing_fps else ""), flush=True)
    import torch

    conditions = (f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs{_gpu_name(models)}, load average (1 min) "
                  f"{load_before[0]:.1f} before and {os.getloadavg()[0]:.1f} after; {torch.get_num_threads()} model "
                  f"thread(s), --compile {args.compile}; "
                  f"{args.seconds:g} s measured per row, {args.repeat} run(s) each (median, and min–max)")
    table = markdown(rows)
    verdicts = check_targets(rows)
    (args.out / "live.json").write_text(json.dumps({"conditions": conditions, "rows": [asdict(r) for r in rows]},
                                                   indent=2))
    (args.out / "live.md").write_text(f"{conditions}\n\n{table}\n" + "\n".join(f"- {line}" for line in verdicts) + "\n")
    print(conditions)
    print(table)
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
