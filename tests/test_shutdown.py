"""A clean stop, on real processes: the app (`python app.py --model tiny --size 64`) and the CLI.

SIGTERM and Ctrl+C (SIGINT) stop the app: the fast channel's pages are told
"the server is stopping" and their WebSockets closed with 1001, the process
exits 0 within a bounded time, with no traceback and no "timeout graceful
shutdown exceeded", and leaves no recording folder nor partial file behind.
Stopped while starting, it says so in one line and exits 130.  The CLI's
translation stopped mid-way exits 143 (SIGTERM) or 130 (SIGINT) with one
line and leaves nothing under the output's name, nor a partial file beside it.
Each process runs in its own process group, with a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from bench.channel_client import channel_url  # noqa: E402
from sv2v_core.video import write_video  # noqa: E402
from ui import wire  # noqa: E402
from tests.test_app_api import start_app as start_tiny_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STOP_SECONDS = 15  # the app must be gone within this after the signal
JPEG = wire.encode_render(np.full((64, 64, 3), 200, np.uint8))


def environment(tmp: Path) -> dict:
    (tmp / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TMPDIR=str(tmp / "tmp"),
                GRADIO_TEMP_DIR=str(tmp / "gradio"))


def start_app(tmp: Path, *extra: str, wait: bool = True) -> tuple[subprocess.Popen, str]:
    return start_tiny_app(tmp, 64, *extra, env=environment(tmp), wait=wait)


def stopped(process: subprocess.Popen, sig: int) -> tuple[int, float]:
    """Send `sig`; the exit status and the seconds it took (killed, and failed, after STOP_SECONDS)."""
    started = time.monotonic()
    process.send_signal(sig)
    try:
        code = process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"still running {STOP_SECONDS} s after signal {sig}")
    return code, time.monotonic() - started


def left_behind(tmp: Path) -> list[str]:
    """Recording folders and partial files left under the app's temporary folder."""
    return sorted(str(path.relative_to(tmp)) for path in (tmp / "tmp").rglob("*")
                  if path.name.startswith("sv2v-rec-") or ".part" in path.name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_app_cleanly_and_tells_the_pages(tmp_path, sig):
    process, url = start_app(tmp_path)
    try:
        # A page's Gradio heartbeat stream (held open while a page is open) and its fast channel.
        heartbeat = urllib.request.urlopen(url + "gradio_api/heartbeat/drawing", timeout=30)
        ws = connect(channel_url(url, "drawing"), open_timeout=30)
        assert json.loads(ws.recv(30))["type"] == "ready"
        ws.send(wire.pack_snapshot(1, 0.0, JPEG, end=True))
        assert isinstance(ws.recv(30), bytes)  # a render: the session has a recording now
        code, seconds = stopped(process, sig)
        said = json.loads(ws.recv(10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        heartbeat.close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = (tmp_path / "app.log").read_text(errors="replace")
    assert said["message"] == "the server is stopping"
    assert closed.value.rcvd.code == 1001
    assert code == 0, log
    assert seconds < 10
    assert "Traceback" not in log and "graceful shutdown exceeded" not in log, log
    assert left_behind(tmp_path) == []


def test_stopped_while_starting_it_says_so_in_one_line(tmp_path):
    process, _ = start_app(tmp_path, wait=False)
    log = tmp_path / "app.log"
    deadline = time.monotonic() + 120
    while "model threads" not in log.read_text(errors="replace"):  # start-up is under way
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    code, _ = stopped(process, signal.SIGINT)
    text = log.read_text(errors="replace")
    if "running on" in text:  # too late: it had started (then it stops as a running app does)
        assert code == 0
        pytest.skip("the app started before the signal came")
    assert code == 130, text
    assert text.strip().splitlines()[-1] == "stopped before the server was running"
    assert "Traceback" not in text


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_translation_stopped_midway_leaves_no_output(tmp_path, sig, code, word):
    source, output = tmp_path / "in.mp4", tmp_path / "out.mp4"
    frames = [np.full((64, 64, 3), (index * 2) % 255, np.uint8) for index in range(400)]
    write_video(source, frames, fps=25)
    process = subprocess.Popen([sys.executable, "-m", "sv2v_core", "translate", str(source), str(output),
                                "--model", "tiny", "--width", "64", "--height", "64"], cwd=ROOT,
                               env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        progress = b""
        deadline = time.monotonic() + 120
        while b"frame" not in progress:  # tqdm's progress: frames are being written
            assert time.monotonic() < deadline and process.poll() is None
            progress += os.read(process.stderr.fileno(), 4096)
        exit_code, _ = stopped(process, sig)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    rest = process.stderr.read().decode(errors="replace")
    assert exit_code == code, rest
    assert rest.strip().splitlines()[-1] == f"error: {word}; no output was written"
    assert "Traceback" not in rest
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == ["in.mp4"]


def test_the_page_says_the_server_is_stopping(tmp_path):
    """In Chromium: the page on the fast channel shows "the server is stopping" when the app is stopped."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian chromium (/usr/bin/chromium) is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    process, url = start_app(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium),
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
            page.wait_for_function("() => window.sv2vStats && window.sv2vStats.channel === 'ws'", timeout=30_000)
            code, _ = stopped(process, signal.SIGTERM)
            page.wait_for_function("() => document.querySelector('#sv2v-render .sv2v-message').textContent"
                                   ".includes('the server is stopping')", timeout=10_000)
            browser.close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0


def test_closing_lets_an_export_in_progress_finish_and_refuses_new_work():
    import threading

    from bench.echo import EchoEngine
    from tests.test_many_users import make_service
    from ui.renderer import RendererClosed

    service = make_service(EchoEngine(0), size=128)
    frames = [np.random.default_rng(index).integers(0, 255, (128, 128, 3), np.uint8) for index in range(4)]
    for index in range(240):
        service.render("artist", frames[index % 4], service.base)
    exports = service.registry.get("artist").recorder.folder / "exports"
    outcome = {}

    def export() -> None:
        try:
            outcome["path"] = service.export("artist", "mp4", "real", True, keep_pauses=False)
        except (RendererClosed, ValueError, OSError) as error:
            outcome["error"] = error

    exporting = threading.Thread(target=export)
    exporting.start()
    deadline = time.monotonic() + 30
    while not (exports.exists() and any(exports.iterdir())):  # its partial file is being written
        assert time.monotonic() < deadline and exporting.is_alive()
        time.sleep(0.005)
    service.stop()
    with pytest.raises(RendererClosed, match="stopping"):
        service.submit("artist", frames[0], service.base)
    with pytest.raises(RendererClosed, match="stopping"):
        service.export("artist", "gif", "timelapse", False)
    service.close()
    assert not exporting.is_alive() and "error" not in outcome  # it finished before the sessions went
    assert outcome["path"].name.endswith(".mp4")
    assert not exports.exists()  # and the session's folder went with them


def test_sigterm_stops_the_app_without_a_fast_channel_too(tmp_path):
    process, _ = start_app(tmp_path, "--no-fast-channel")
    try:
        code, seconds = stopped(process, signal.SIGTERM)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = (tmp_path / "app.log").read_text(errors="replace")
    assert code == 0 and seconds < 10, log
    assert "Traceback" not in log and "stopped before" not in log
    assert left_behind(tmp_path) == []
