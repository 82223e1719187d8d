"""Load test: many simulated artists drawing at once over the real app.

    python -m bench.loadtest                          # the default rows (below), about 4 minutes
    python -m bench.loadtest --users 8 --seconds 20   # one size of crowd
    python -m bench.loadtest --soak 30                # 30 minutes of 8 artists coming and going

Each row starts a fresh app server in a child process (ui.server's
`create_service` and `serve`, what `python app.py` runs; its engine chosen
here and loaded as the app loads it, with the app's --compile and its
default model threads unless --torch-threads says otherwise; a compiled
engine finishes its warm-up, a background compile included, before the
server says it is ready) and N simulated artists in this process: Python clients of the fast
channel (bench.channel_client), each sending its own drawing, a stroke in its
own colour, from JPEGs encoded in advance, as fast as the page's flow
control lets it (two snapshots unanswered; with `--page-rate HZ`, also at
most HZ snapshots a second, as a page drawing on a display of HZ frames per
second sends at most one per frame).  After a warm-up it measures,
over `--seconds`:

- renders/s per artist (min, median) and in total; fairness = slowest
  artist's renders/s / fastest's;
- latency, snapshot sent -> its render received (p50, p95, all artists);
- frame time: the model's time for each render, its tick's (p50, p95, max,
  all artists: a spike every few frames shows in p95 and max);
- batch sizes the scheduler used (ticks by frames per tick);
- the server process's memory (RSS, MiB: median and max);
- errors, and isolation: every echo render is checked to show its own
  artist's colour (any other artist's colour is counted as a leak).

Engines:
- `echo:A+B`: bench.echo.EchoEngine, the snapshot comes back as the render
  after A ms per call + B ms per frame in the call (default 8+3: an H100 at
  512²), at 512²;
- `tiny`: the built-in model at `--tiny-size` (128) on this CPU;
- `sd15-random[:SIZE]`: SD1.5's full-size architecture with random weights
  (512²), on CUDA in float16 where there is a GPU: the real cost of a
  frame, for a GPU host.

Default rows: echo 8+3 with 1, 2, 4, 8, 16 artists batched (up to
`--max-batch` frames per tick), echo 8+3 with 8 artists one frame per tick
(the same cost model without batching), and the built-in model with 4
artists batched and one at a time, alternating, `--repeat` times.  Rows
never share a server, so a row does not depend on which others run with it.

Soak (`--soak MINUTES`): 8 artists (`--users`) for MINUTES; each draws for
`--session-seconds`, exports its recording through the API (gradio_client,
`/export`, a time-lapse MP4), checks that it decodes with one frame per
render it received, and leaves; a new artist takes its place.  The server
runs with a short idle release (10 s) and idle timeout (60 s), so the
sessions of those who left are released and freed while the others draw.
It reports the server's memory after warm-up (the first
`--soak-warmup` minutes) and at the end, errors, leaks and exports.

Results go to OUT/loadtest.json and OUT/loadtest.md (or loadtest-soak.*).
"""

from __future__ import annotations

import argparse
import colorsys
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ui.settings import Settings

from .live import MODEL_CASES, app_device, builtin_engine, warmed_up
from .channel_client import ChannelClient, Received, share_secret
from .timing import frame_times, percentile

ECHO = "echo:8+3"
ECHO_SIZE = 512
WARMUP_SECONDS = 2.0
PICTURES = 24
START_TIMEOUT = 900.0  # a compiled engine warms up (compiles) before the server says it is ready
LEAK_DISTANCE = 40  # a render's ink this far from its artist's colour (or nearer another's) is a leak;
# measured: own renders are within 2, neighbouring colours of 16 artists 81 apart
RSS_EVERY = 0.5
MIN_INK = 8  # pixels at 1/8 scale
OBJECTS_EVERY = 60.0  # soak: seconds between counts of the server's live Python objects


# -- the server (a child process) ------------------------------------------------------
def make_engine(case: str, tiny_size: int, compile: str = "auto"):
    """(engine, render size) for `case`: echo:A+B, tiny[:SIZE] or sd15-random[:SIZE] (`compile`: the app's)."""
    kind, _, value = case.partition(":")
    if kind == "echo":
        call, _, per_frame = (value or "8+3").partition("+")
        from .echo import EchoEngine

        return EchoEngine(float(per_frame or 0), call_ms=float(call or 0)), ECHO_SIZE
    if kind in MODEL_CASES:
        return builtin_engine(kind, compile), engine_size(case, tiny_size)
    raise SystemExit(f"error: unknown engine {case!r} (use echo:A+B, tiny or sd15-random[:SIZE])")


def engine_size(case: str, tiny_size: int) -> int:
    """The render size of `case` (see make_engine)."""
    kind, _, value = case.partition(":")
    if kind == "echo":
        return ECHO_SIZE
    return int(value) if value else (tiny_size if kind == "tiny" else MODEL_CASES[kind])


def serve_forever(args: argparse.Namespace) -> None:
    """The child: serve the app, answer "stats" lines on stdin with JSON, stop at end of input."""
    import torch

    from ui.memory import limit_malloc_arenas
    from ui.presets import load_presets
    from ui.server import create_service, model_threads, serve

    limit_malloc_arenas()  # as app.py does
    threads = model_threads(None, app_device(), args.torch_threads)  # as app.py does
    if threads:
        torch.set_num_threads(threads)
    engine, size = make_engine(args.serve, args.tiny_size, args.compile)
    service = create_service(engine, size=size, render_mode=args.mode, max_sessions=args.max_sessions,
                             max_batch=args.max_batch, idle_timeout=args.idle_timeout,
                             release_after=args.release_after)
    warm_up_s = warmed_up(service)
    app = serve(service, load_presets(), port=args.port, block=False)
    print(f"ready {app.url} {warm_up_s:.1f} {torch.get_num_threads()}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() in ("stats", "objects"):
                stats = service.stats()
                answer = {"batches": stats.batches, "rendered": stats.rendered, "failed": stats.failed,
                          "dropped": stats.dropped, "sessions": len(service.registry),
                          "active": service.registry.active()}
                if line.strip() == "objects":  # Python objects alive: a leak grows them, allocator slack does not
                    gc.collect()
                    answer["objects"] = len(gc.get_objects())
                print(json.dumps(answer), flush=True)
    finally:
        app.close()
        service.close()
        engine.close()


class Server:
    """A child process serving the app (ui.server) with one engine."""

    def __init__(self, engine: str, *, max_batch: int, mode: str = "latency", tiny_size: int = 128,
                 max_sessions: int | None = None, idle_timeout: float = 1800.0, release_after: float = 30.0,
                 torch_threads: int | None = None, compile: str = "auto") -> None:
        from ui.server import free_port  # gradio loads only where a server runs

        port = free_port()
        command = [sys.executable, "-m", "bench.loadtest", "--serve", engine, "--port", str(port),
                   "--max-batch", str(max_batch), "--mode", mode, "--tiny-size", str(tiny_size),
                   "--idle-timeout", str(idle_timeout), "--release-after", str(release_after), "--compile", compile]
        if torch_threads is not None:
            command += ["--torch-threads", str(torch_threads)]
        if max_sessions:
            command += ["--max-sessions", str(max_sessions)]
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.url, self.warm_up_s, self.threads = self._ready()
        self.rss: list[tuple[float, float]] = []  # (time.monotonic, MiB)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _ready(self) -> tuple[str, float, int]:
        """The server's address, its warm-up's seconds and its model threads, once it says it is ready."""
        import select

        readable, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if readable else ""
        if not line.startswith("ready "):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"the app server did not start within {START_TIMEOUT:.0f} s (it said {line!r})")
        _, url, warm_up_s, threads = line.split()
        return url, float(warm_up_s), int(threads)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_EVERY):
            mib = rss_mib(self.process.pid)
            if mib is not None:
                self.rss.append((time.monotonic(), mib))

    def stats(self, objects: bool = False) -> dict:
        """The server's scheduler and session counts (and, with `objects`, its live Python objects)."""
        self.process.stdin.write("objects\n" if objects else "stats\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self._stop.set()
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used, in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB (Linux /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None



# -- the artists -------------------------------------------------------------------------
def colour_of(user: int, users: int) -> tuple[int, int, int]:
    """Artist `user`'s ink: hues spread evenly around the wheel."""
    r, g, b = colorsys.hsv_to_rgb(user / max(users, 1), 1.0, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def drawing(user: int, users: int, size: int, count: int = PICTURES) -> list[bytes]:
    """JPEG snapshots of artist `user` drawing a stroke in their own colour on white paper."""
    colour = colour_of(user, users)
    canvas = np.full((size, size, 3), 255, np.uint8)
    pictures = []
    rng = np.random.default_rng(user)
    y, x = rng.integers(size // 8, size - size // 8, 2)
    thickness = max(3, size // 24)
    for _ in range(count):
        dy, dx = rng.integers(-size // 10, size // 10 + 1, 2)
        for t in np.linspace(0, 1, 12):
            cy, cx = int(np.clip(y + t * dy, 0, size - 1)), int(np.clip(x + t * dx, 0, size - 1))
            canvas[max(0, cy - thickness): cy + thickness, max(0, cx - thickness): cx + thickness] = colour
        y, x = int(np.clip(y + dy, size // 8, size - size // 8)), int(np.clip(x + dx, size // 8, size - size // 8))
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format="JPEG", quality=85)
        pictures.append(buffer.getvalue())
    return pictures


def ink_colour(jpeg: bytes) -> np.ndarray | None:
    """The median colour of a picture's ink (strongly coloured pixels), decoded at 1/8 scale;
    None when there is too little ink to tell (the first snapshots of a stroke)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image.draft("RGB", (image.width // 8, image.height // 8))
        pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
    ink = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 120]
    return None if len(ink) < MIN_INK else np.median(ink, axis=0)


class Artist:
    """One simulated artist: a fast-channel client on its own thread, checking its renders' colour.

    settings: the page's settings it sends on connecting (None: the app's defaults); depth: its
    snapshots in flight at most (two, as the page when the model is the slow stage; one: each
    render's latency has no wait behind another snapshot of its own)."""

    def __init__(self, url: str, user: int, users: int, size: int, *, check_colour: bool, session: str | None = None,
                 page_rate: float = 0.0, settings: Settings | None = None, depth: int = 2):
        self.user = user
        self.session = session or f"artist-{user}-{os.getpid()}-{time.monotonic_ns()}"
        self.palette = np.array([colour_of(u, users) for u in range(users)], np.float32)
        self.check_colour = check_colour
        self.leaks = 0
        self.client = ChannelClient(url, self.session, drawing(user, users, size), depth=depth,
                                    interval=1 / page_rate if page_rate else 0.0, on_render=self._check,
                                    settings=settings)
        self.stop = threading.Event()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"artist-{user}", daemon=True)

    def _check(self, render: Received) -> None:
        if not self.check_colour:
            return
        ink = ink_colour(render.jpeg)
        if ink is None:
            return  # the first snapshots may have next to no ink at 1/8 scale
        distances = np.abs(self.palette - ink).max(axis=1)
        if distances[self.user] > LEAK_DISTANCE or int(distances.argmin()) != self.user:
            self.leaks += 1

    def _run(self) -> None:
        try:
            with self.client:
                self.client.start()
                while not self.stop.is_set():
                    self.client.step()
                self.client.drain()
        except Exception as error:  # noqa: BLE001 - reported in the row: any failure of a client is a result
            self.failure = f"{type(error).__name__}: {error}"

    def renders_between(self, start: float, end: float) -> list[Received]:
        return [render for render in list(self.client.log.renders) if start <= render.at < end]


def stop_all(artists: list[Artist], timeout: float = 60.0) -> None:
    """Tell every artist to stop, then wait for each to finish (its last answers drained)."""
    for artist in artists:
        artist.stop.set()
    for artist in artists:
        artist.thread.join(timeout)


def measured(artists: list[Artist], start: float, end: float) -> tuple[list[float], list[float], list[float]]:
    """Each artist's renders/s between `start` and `end`, and the latencies and frame times (ms) of all
    those renders."""
    rates, latencies, frames = [], [], []
    for artist in artists:
        renders = artist.renders_between(start, end)
        rates.append(len(renders) / (end - start))
        latencies += [render.latency_ms for render in renders]
        frames += [render.model_ms for render in renders]
    return rates, latencies, frames


# -- rows -------------------------------------------------------------------------------
@dataclass
class Row:
    engine: str
    users: int
    max_batch: int
    seconds: float
    per_user: list = field(default_factory=list)
    renders_min: float = 0.0
    renders_median: float = 0.0
    total: float = 0.0
    fairness: float = 0.0
    latency_p50: float = float("nan")
    latency_p95: float = float("nan")
    frame_ms: dict = field(default_factory=dict)  # the model's time per render (its tick's): p50, p95, max
    batches: dict = field(default_factory=dict)
    rss_median: float = float("nan")
    rss_max: float = float("nan")
    server_cpu: float = float("nan")  # CPU cores the server process used
    errors: int = 0
    leaks: int = 0
    dropped: int = 0
    load: str = ""
    warm_up_s: float = 0.0  # the server's warm-up (and a background compile) before it said it was ready
    threads: int = 0  # the server's model threads


def _batches_since(before: dict, after: dict) -> dict:
    sizes = {int(size): count - int(before.get(size, 0)) for size, count in after.items()}
    return {size: count for size, count in sorted(sizes.items()) if count > 0}


def run_row(engine: str, users: int, max_batch: int, seconds: float, *, tiny_size: int = 128,
            mode: str = "latency", torch_threads: int | None = None, page_rate: float = 0.0,
            compile: str = "auto") -> Row:
    """N artists drawing for WARMUP_SECONDS + `seconds` against a fresh server."""
    server = Server(engine, max_batch=max_batch, mode=mode, tiny_size=tiny_size, torch_threads=torch_threads,
                    compile=compile)
    size = engine_size(engine, tiny_size)
    row = Row(engine, users, max_batch, seconds, load=_load(), warm_up_s=server.warm_up_s, threads=server.threads)
    artists = [Artist(server.url, user, users, size, check_colour=engine.startswith("echo"), page_rate=page_rate)
               for user in range(users)]
    try:
        for artist in artists:
            artist.thread.start()
        time.sleep(WARMUP_SECONDS)
        before, start, cpu = server.stats(), time.perf_counter(), cpu_seconds(server.process.pid)
        rss_from = time.monotonic()
        time.sleep(seconds)
        end, after = time.perf_counter(), server.stats()
        row.server_cpu = (cpu_seconds(server.process.pid) - cpu) / (end - start)
        rss = [mib for at, mib in server.rss if at >= rss_from]
    finally:
        stop_all(artists)
        server.close()
    row.per_user, latencies, frames = measured(artists, start, end)
    for artist in artists:
        row.errors += len(artist.client.log.errors) + (artist.failure is not None)
        row.leaks += artist.leaks
        row.dropped += artist.client.log.dropped
    row.renders_min, row.renders_median = min(row.per_user), statistics.median(row.per_user)
    row.total = sum(row.per_user)
    row.fairness = min(row.per_user) / max(row.per_user) if max(row.per_user) > 0 else 0.0
    row.latency_p50, row.latency_p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    row.frame_ms = frame_times(frames)
    row.batches = _batches_since(before["batches"], after["batches"])
    if rss:
        row.rss_median, row.rss_max = statistics.median(rss), max(rss)
    return row


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def default_rows(args) -> list[tuple[str, int, int]]:
    rows = [(ECHO, users, args.max_batch) for users in (1, 2, 4, 8, 16)] + [(ECHO, 8, 1)]
    for _ in range(args.repeat):
        rows += [("tiny", 4, args.max_batch), ("tiny", 4, 1)]
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| engine | artists | max batch | renders/s per artist: min | median | total renders/s | fairness "
             "| latency p50 ms | p95 ms | frame ms p50 | p95 | max | batch sizes (ticks) | server RSS MiB (max) "
             "| server CPU cores | errors | leaks |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
             "| ---: | ---: |"]
    for row in rows:
        batches = " ".join(f"{size}×{count}" for size, count in row.batches.items())
        frame = row.frame_ms
        lines.append(f"| {row.engine} | {row.users} | {row.max_batch} | {row.renders_min:.1f} | "
                     f"{row.renders_median:.1f} | {row.total:.1f} | {row.fairness:.2f} | {row.latency_p50:.0f} | "
                     f"{row.latency_p95:.0f} | {frame.get('p50', float('nan')):.0f} | "
                     f"{frame.get('p95', float('nan')):.0f} | {frame.get('max', float('nan')):.0f} | {batches} | "
                     f"{row.rss_median:.0f} ({row.rss_max:.0f}) | {row.server_cpu:.2f} | {row.errors} | {row.leaks} |")
    return "\n".join(lines) + "\n"


def ratios(rows: list[Row]) -> list[str]:
    """Batched / one-at-a-time total throughput, per engine and crowd (rows alternate in order)."""
    notes = []
    for engine, users in sorted({(row.engine, row.users) for row in rows}):
        batched = [row.total for row in rows if (row.engine, row.users) == (engine, users) and row.max_batch > 1]
        single = [row.total for row in rows if (row.engine, row.users) == (engine, users) and row.max_batch == 1]
        if batched and single:
            pairs = [b / s for b, s in zip(batched, single) if s > 0]
            spread = f" (runs: {', '.join(f'{p:.2f}' for p in pairs)})" if len(pairs) > 1 else ""
            notes.append(f"{engine}, {users} artists: batched / one at a time = "
                         f"{statistics.median(batched) / statistics.median(single):.2f}x{spread}")
    return notes


# -- soak -----------------------------------------------------------------------------------
@dataclass
class Soak:
    minutes: float
    users: int
    session_seconds: float
    load_start: str = ""
    load_end: str = ""
    sessions: int = 0
    renders: int = 0
    errors: list = field(default_factory=list)
    leaks: int = 0
    exports_ok: int = 0
    exports_bad: list = field(default_factory=list)
    rss_after_warmup: float = float("nan")
    rss_max_after_warmup: float = float("nan")
    rss_end: float = float("nan")
    growth: float = float("nan")
    rss_trace: list = field(default_factory=list)
    objects_trace: list = field(default_factory=list)  # (minute, live Python objects, sessions) in the server


def _export_frames(url: str, session: str) -> tuple[int, str]:
    """Export `session`'s recording through the API; (frames decoded, path)."""
    import av
    from gradio_client import Client

    client = Client(url, verbose=False)
    client.session_hash = session  # the fast channel's session is the page's Gradio session
    try:
        path = client.predict("mp4", "timelapse", False, api_name="/export")
    finally:
        client.close()
    with av.open(path) as container:
        frames = sum(1 for _ in container.decode(video=0))
    return frames, path


def run_soak(minutes: float, users: int = 8, session_seconds: float = 60.0, warmup_minutes: float = 2.0,
             engine: str = ECHO, idle_timeout: float = 60.0, release_after: float = 10.0) -> Soak:
    """`users` artists for `minutes`, each leaving after `session_seconds` with an exported recording."""
    server = Server(engine, max_batch=8, idle_timeout=idle_timeout, release_after=release_after)
    soak = Soak(minutes, users, session_seconds, load_start=_load())
    deadline = time.monotonic() + minutes * 60
    warm = time.monotonic() + warmup_minutes * 60
    lock = threading.Lock()

    def seat(user: int) -> None:
        """Artist after artist in one seat until the soak ends."""
        turn = 0
        while time.monotonic() < deadline:
            artist = Artist(server.url, user, users, ECHO_SIZE, check_colour=True,
                            session=f"soak{user}x{turn}{os.getpid()}")
            turn += 1
            artist.thread.start()
            artist.stop.wait(min(session_seconds, max(1.0, deadline - time.monotonic())))
            artist.stop.set()
            artist.thread.join(60)
            rendered = len(artist.client.log.renders)
            with lock:
                soak.sessions += 1
                soak.renders += rendered
                soak.leaks += artist.leaks
                soak.errors += artist.client.log.errors + ([artist.failure] if artist.failure else [])
            try:
                frames, path = _export_frames(server.url, artist.session)
            except Exception as error:  # noqa: BLE001 - an export that fails for any reason is a soak failure
                frames, path = -1, f"{type(error).__name__}: {error}"
            with lock:
                if frames == rendered and rendered > 0:
                    soak.exports_ok += 1
                else:
                    soak.exports_bad.append(f"{artist.session}: {frames} frames for {rendered} renders ({path})")
            if frames >= 0:
                shutil.rmtree(Path(path).parent, ignore_errors=True)

    seats = [threading.Thread(target=seat, args=(user,), daemon=True) for user in range(users)]
    began = time.monotonic()
    try:
        for thread in seats:
            thread.start()
        while any(thread.is_alive() for thread in seats):
            stats = server.stats(objects=True)
            soak.objects_trace.append((round((time.monotonic() - began) / 60, 1), stats["objects"], stats["sessions"]))
            for thread in seats:
                thread.join(timeout=OBJECTS_EVERY / len(seats))
    finally:
        server.close()
    soak.load_end = _load()
    start = server.rss[0][0] if server.rss else 0.0
    soak.rss_trace = [(round(at - start, 1), round(mib, 1)) for at, mib in server.rss[:: max(1, int(10 / RSS_EVERY))]]
    after = [mib for at, mib in server.rss if at >= warm]
    if after:
        soak.rss_after_warmup, soak.rss_max_after_warmup, soak.rss_end = after[0], max(after), after[-1]
        soak.growth = soak.rss_max_after_warmup / soak.rss_after_warmup - 1
    return soak


def soak_markdown(soak: Soak) -> str:
    return (f"| minutes | artists at once | sessions | renders | errors | colour leaks | exports complete | "
            f"RSS after warm-up MiB | max after | end | growth |\n"
            f"| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            f"| {soak.minutes:g} | {soak.users} | {soak.sessions} | {soak.renders} | {len(soak.errors)} | "
            f"{soak.leaks} | {soak.exports_ok}/{soak.exports_ok + len(soak.exports_bad)} | "
            f"{soak.rss_after_warmup:.0f} | {soak.rss_max_after_warmup:.0f} | {soak.rss_end:.0f} | "
            f"{100 * soak.growth:+.1f} % |\n")


# -- command line ------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default=None, help=f"run only this engine ({ECHO}, tiny[:SIZE], or sd15-random[:SIZE]: "
                        "SD1.5's size with random weights, on CUDA in float16 where there is a GPU)")
    parser.add_argument("--users", type=int, nargs="+", default=None, help="crowd sizes (default 1 2 4 8 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row (after 2 s warm-up)")
    parser.add_argument("--max-batch", type=int, default=8, help="frames per tick (the app's default: 8)")
    parser.add_argument("--single", action="store_true", help="also run each row one frame per tick (max batch 1)")
    parser.add_argument("--repeat", type=int, default=2, help="built-in model rows: batched/one-at-a-time pairs")
    parser.add_argument("--tiny-size", type=int, default=128, help="render size of the built-in model")
    parser.add_argument("--mode", choices=("latency", "stream"), default="latency")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="the app's --compile for a built-in model's engine (default auto, as the app)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="the server's model threads (default: the app's own, ui.server.model_threads; "
                             "0: torch's choice)")
    parser.add_argument("--page-rate", type=float, default=0.0, metavar="HZ",
                        help="at most HZ snapshots a second per artist, as a page drawing on an HZ display "
                             "(default 0: as fast as the flow control lets it)")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="run the soak instead")
    parser.add_argument("--session-seconds", type=float, default=60.0, help="soak: how long each artist draws")
    parser.add_argument("--soak-warmup", type=float, default=2.0, help="soak: minutes before memory is judged")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    # the server child's own options
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--idle-timeout", type=float, default=1800.0, help=argparse.SUPPRESS)
    parser.add_argument("--release-after", type=float, default=30.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    share_secret()  # the app started below and the clients make their keys from it
    args = parse_args(argv)
    if args.serve:
        serve_forever(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        soak = run_soak(args.soak, args.users[0] if args.users else 8, args.session_seconds, args.soak_warmup)
        (args.out / "loadtest-soak.json").write_text(json.dumps(asdict(soak), indent=2))
        (args.out / "loadtest-soak.md").write_text(soak_markdown(soak))
        print(soak_markdown(soak))
        for line in soak.errors[:10] + soak.exports_bad[:10]:
            print("  ", line)
        return 0 if not soak.errors and not soak.exports_bad and not soak.leaks else 1
    if args.engine or args.users:
        engines = [args.engine or ECHO]
        plan = [(engine, users, args.max_batch) for engine in engines for users in (args.users or [1, 2, 4, 8, 16])]
        if args.single:
            plan = [item for engine, users, batch in plan for item in ((engine, users, batch), (engine, users, 1))]
    else:
        plan = default_rows(args)
    rows = []
    for engine, users, max_batch in plan:
        seconds = args.seconds * (2 if engine.startswith("tiny") else 1)
        row = run_row(engine, users, max_batch, seconds, tiny_size=args.tiny_size, mode=args.mode,
                      page_rate=args.page_rate, compile=args.compile, torch_threads=args.torch_threads)
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
    table = markdown(rows)
    notes = ratios(rows)
    servers = "; ".join(sorted({f"{row.threads} model thread(s), warm-up {row.warm_up_s:.0f} s" for row in rows}))
    text = (table + "".join(f"\n{note}" for note in notes)
            + f"\n\nConditions: {_load()}; server: {servers}; --compile {args.compile}.\n")
    (args.out / "loadtest.json").write_text(json.dumps({"rows": [asdict(row) for row in rows], "ratios": notes,
                                                        "conditions": _load()}, indent=2))
    (args.out / "loadtest.md").write_text(text)
    print("\n" + text)
    return 0 if all(row.errors == 0 and row.leaks == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
