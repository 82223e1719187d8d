"""`python -m bench.drill`: a fault drill, with the echo engine and the built-in model, in a couple of minutes.

It injects every kind of fault bench.faults knows into the app's own render
path (ui.service over an in-process renderer, the echo engine behind a
FaultyEngine), drops a client mid-render on a real server, knocks on the
fast channel with foreign origins and wrong keys, and stops real app
(`python app.py --model tiny --size 64`) and CLI processes with SIGTERM
and SIGINT.  It counts:

- faults injected (calls that failed or stalled on purpose) and survived
  (the server rendered on: every session without a fault got every render,
  unchanged, in order);
- frames lost (a render a page received that its recording does not hold)
  and counted twice (a recording or a stream holding more frames than its
  page received renders);
- connections refused, by origin and by key, and foreign ones let in;
- each stop's exit status and seconds, and the files left behind.

It prints a markdown table (docs/reliability.md keeps one) and, with
--json PATH, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.video import write_video
from ui import wire
from ui.presets import load_presets
from ui.recording import Recorder
from ui.renderer import DeviceFault
from ui.server import create_service, free_port, serve
from ui.service import CanvasService
from ui.sessions import SessionRegistry
from ui.settings import Settings

from .channel_client import ChannelClient, channel_url, share_secret
from .echo import EchoEngine
from .faults import Faults, FaultyEngine

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
TIMEOUT = 30
FAULTY = "FAULTY"
SESSIONS = ["a", "b", FAULTY, "c"]


@dataclass
class Figures:
    """What the drill counted."""

    scenarios: list[dict] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    stops: list[dict] = field(default_factory=list)

    def add(self, name: str, injected: int, survived: bool, lost: int, twice: int, messages: int) -> None:
        self.scenarios.append(dict(fault=name, injected=injected, survived=survived, lost=lost, twice=twice,
                                   faulty_messages=messages))


def colour(session: int, tick: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), (40 * session + 10, (7 * tick + 5) % 256, 100), np.uint8)


class Logged(logging.Handler):
    """Counts the renderer's log records that contain `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.count = text, 0
        logging.getLogger("sv2v.renderer").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += self.text in record.getMessage()

    def close(self) -> None:
        logging.getLogger("sv2v.renderer").removeHandler(self)
        super().close()


def service_of(engine) -> CanvasService:
    base = StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None, scene_cut=None)
    return CanvasService(engine, SessionRegistry(Recorder), base, sweep_seconds=3600.0)


def batch_drill(name: str, faults: Faults, ticks: int, sessions=SESSIONS, **renderer) -> tuple:
    """Every session sends one frame a tick, all in one batch; (injected, survived, lost, twice, messages)."""
    engine = FaultyEngine(EchoEngine(0), faults)
    service = service_of(engine)
    for attribute, value in renderer.items():
        setattr(service.renderer, attribute, value)
    received = {session: [] for session in sessions}
    messages = 0
    try:
        for tick in range(ticks):
            entered, release = threading.Event(), threading.Event()
            hold = service.renderer.call(lambda: entered.set() or release.wait(TIMEOUT))
            entered.wait(TIMEOUT)  # the model is held: the frames below share its next tick
            tickets = {session: service.submit(session, colour(index, tick), service.base.replace(prompt=session),
                                               seq=tick) for index, session in enumerate(sessions)}
            release.set()
            hold.result(TIMEOUT)
            for index, (session, ticket) in enumerate(tickets.items()):
                error = ticket.future.exception(TIMEOUT)
                if error is None:
                    received[session].append((tick, ticket.future.result()))
                    messages += ticket.future.result().notice is not None
                elif FAULTY in session or isinstance(error, DeviceFault) or "out of memory" in str(error):
                    messages += 1
            if service.renderer.device_fault is not None:
                break
        survived, lost, twice = True, 0, 0
        for index, session in enumerate(sessions):
            renders = received[session]
            recorded = service.recorded(session)
            state = service.renderer.stream_state(session)
            counted = state.frames_in if state is not None else 0
            lost += max(0, len(renders) - recorded)
            twice += max(0, recorded - len(renders)) + max(0, counted - len(renders))
            in_order = [tick for tick, _ in renders] == sorted(tick for tick, _ in renders)
            unchanged = all(np.array_equal(rendered.image, colour(index, tick)) for tick, rendered in renders)
            healthy = FAULTY not in session and faults.oom_above is None and faults.device_fault_at is None
            if not (in_order and unchanged) or (healthy and len(renders) != ticks):
                survived = False
        if faults.device_fault_at is not None:  # survived: it stopped taking work instead of going on
            survived = service.renderer.device_fault is not None
        if faults.oom_above is not None:  # survived: everybody got every render in the end
            survived = survived and all(len(received[s]) == ticks for s in sessions)
        return sum(engine.injected.values()), survived, lost, twice, messages
    finally:
        service.close()


def dropped_client_drill() -> tuple:
    """A page drops its connection while its render stalls; another page draws on (a real server)."""
    engine = FaultyEngine(EchoEngine(0), Faults(stall_at=1, stall_seconds=1.0))
    service = create_service(engine, size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    from websockets.sync.client import connect

    try:
        with ChannelClient(running.url, "keeper", [wire.encode_render(colour(0, 0))], depth=1) as keeper:
            dropper = connect(channel_url(running.url, "dropper"), open_timeout=TIMEOUT)
            dropper.recv(TIMEOUT)
            dropper.send(wire.settings_message(Settings(FAULTY, "Plain prompt", 0.4, 4, 0, "dyme", True, True)))
            dropper.send(wire.pack_snapshot(1, 0.0, wire.encode_render(colour(1, 0))))
            dropper.recv(TIMEOUT)
            dropper.send(wire.pack_snapshot(2, 0.0, wire.encode_render(colour(1, 1))))
            time.sleep(0.3)
            dropper.close()
            keeper.start()
            for _ in range(10):
                keeper.step()
            keeper.drain()
        received = len(keeper.log.renders)
        lost = max(0, received - service.recorded("keeper"))
        twice = max(0, service.recorded("keeper") - received)
        survived = not keeper.log.errors and lost == 0
        return engine.injected["stall"], survived, lost, twice, 0
    finally:
        running.close()
        service.close()


def refusal_drill(figures: Figures) -> None:
    """Knock on the fast channel: foreign origins, no key, a wrong key, another session's key."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    service = create_service(EchoEngine(0), size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    try:
        for origin in ("https://evil.example", "http://localhost.evil.example", "null"):
            try:
                with connect(channel_url(running.url, "victim"), origin=origin, open_timeout=TIMEOUT):
                    figures.refused["foreign origin let in"] += 1
            except InvalidStatus:
                figures.refused["by origin"] += 1
        for key in ("", "0" * 32, channel_url(running.url, "other").split("key=")[1]):
            ws = connect(channel_url(running.url, "victim", key), open_timeout=TIMEOUT)
            ws.recv(TIMEOUT)
            try:
                ws.recv(TIMEOUT)
                figures.refused["wrong key let in"] += 1
            except ConnectionClosed as closed:
                figures.refused["by key"] += closed.rcvd is not None and closed.rcvd.code == 1008
    finally:
        running.close()
        service.close()


def left_behind(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.name.startswith("sv2v-rec-") or ".part" in path.name)


def stop_drill(figures: Figures, work: Path) -> None:
    """Stop a real app (a page connected) and a real CLI translation with SIGTERM and SIGINT."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    for sig in (signal.SIGTERM, signal.SIGINT):
        folder = Path(tempfile.mkdtemp(dir=work))
        env = dict(os.environ, TMPDIR=str(folder), GRADIO_TEMP_DIR=str(folder / "gradio"))
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        log = open(folder / "app.log", "wb")
        process = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--size", str(SIZE), "--port",
                                    str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "gradio_api/info", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the app did not start")
                time.sleep(0.3)
        ws = connect(channel_url(url, "page"), open_timeout=TIMEOUT)
        ws.recv(TIMEOUT)
        ws.send(wire.pack_snapshot(1, 0.0, wire.encode_render(colour(0, 0)), end=True))
        ws.recv(TIMEOUT)
        started = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - started
        close_code = None
        try:
            while True:
                ws.recv(5)
        except ConnectionClosed as closed:
            close_code = closed.rcvd.code if closed.rcvd else None
        text = (folder / "app.log").read_text(errors="replace")
        figures.stops.append(dict(what=f"app, {signal.Signals(sig).name}", exit=code, seconds=round(seconds, 2),
                                  page_closed=close_code, files_left=left_behind(folder),
                                  traceback="Traceback" in text or "graceful shutdown exceeded" in text))
    for sig in (signal.SIGTERM, signal.SIGINT):
        folder = Path(tempfile.mkdtemp(dir=work))
        source, output = folder / "in.mp4", folder / "out.mp4"
        write_video(source, [np.full((SIZE, SIZE, 3), index % 255, np.uint8) for index in range(400)], fps=25)
        process = subprocess.Popen([sys.executable, "-m", "sv2v_core", "translate", str(source), str(output),
                                    "--model", "tiny", "--width", str(SIZE), "--height", str(SIZE)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        progress = b""
        while b"frame" not in progress and process.poll() is None:
            progress += os.read(process.stderr.fileno(), 4096)
        started = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - started
        files = [path.name for path in folder.iterdir() if path.name != "in.mp4"]
        rest = process.stderr.read().decode(errors="replace")
        figures.stops.append(dict(what=f"CLI translate, {signal.Signals(sig).name}", exit=code,
                                  seconds=round(seconds, 2), page_closed=None, files_left=len(files),
                                  traceback="Traceback" in rest))


def markdown(figures: Figures) -> str:
    lines = ["| fault | injected | survived | frames lost | counted twice | messages and notices |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for row in figures.scenarios:
        lines.append(f"| {row['fault']} | {row['injected']} | {'yes' if row['survived'] else 'NO'} | "
                     f"{row['lost']} | {row['twice']} | {row['faulty_messages']} |")
    refused = figures.refused
    lines += ["", f"Connections refused: {refused['by origin']} by origin, {refused['by key']} by key; "
                  f"let in wrongly: {refused['foreign origin let in'] + refused['wrong key let in']}.", "",
              "| stop | exit status | seconds | page's close code | files left | traceback |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for stop in figures.stops:
        lines.append(f"| {stop['what']} | {stop['exit']} | {stop['seconds']} | {stop['page_closed'] or '-'} | "
                     f"{stop['files_left']} | {'yes' if stop['traceback'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--ticks", type=int, default=30, help="ticks per batch scenario (default 30)")
    args = parser.parse_args(argv)
    share_secret()  # the apps below and the clients make their keys from it
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    figures = Figures()
    ticks = args.ticks
    figures.add("error in one session's UNet call, once", *batch_drill("once", Faults(once_at=3), ticks))
    figures.add("error in one session's UNet call, 1 in 3", *batch_drill("every", Faults(every=3), ticks))
    sessions = [f"s{index}" for index in range(8)]
    figures.add("out of memory above 2 frames (8 sessions)",
                *batch_drill("oom", Faults(oom_above=2), ticks, sessions=sessions, grow_after=10))
    stalls = Logged("stalled?")
    injected, survived, lost, twice, messages = batch_drill("stall", Faults(stall_at=2, stall_seconds=2.0), 6,
                                                            stall_seconds=1.0)
    figures.add("a call stalled 2 s (logged as stalled after 1 s)", injected, survived and stalls.count == 1, lost,
                twice, messages)
    stalls.close()
    figures.add("device fault (CUDA error)", *batch_drill("device", Faults(device_fault_at=2), ticks))
    figures.add("client dropped mid-render", *dropped_client_drill())
    refusal_drill(figures)
    with tempfile.TemporaryDirectory(prefix="sv2v-drill-") as work:
        stop_drill(figures, Path(work))
    table = markdown(figures)
    print(table)
    print(f"\n{time.monotonic() - started:.0f} s on {platform.node() or 'this machine'} "
          f"({os.cpu_count()} CPUs), python {platform.python_version()}")
    if args.json:
        args.json.write_text(json.dumps(dict(scenarios=figures.scenarios, refused=dict(figures.refused),
                                             stops=figures.stops), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
