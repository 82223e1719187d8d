"""Serving the app: the Gradio page and the fast channel on one server.

`create_service` puts an engine behind a `CanvasService` with the canvas's
render settings; `serve` puts the session layer (ui.live) over it, with its
three adapters (the page's Gradio events, ui.layout; the fast channel,
ui.channel; the pop-out view, ui.popout), and runs it.

With the fast channel (the default), the page is mounted into a FastAPI app
(`gr.mount_gradio_app`) next to the channel's WebSocket route (ui.channel),
and uvicorn is run here, because Gradio's own `launch` starts uvicorn with
per-message compression on: zlib over every JPEG in both directions, which
cannot shrink them and roughly doubles a loopback round trip (and its CPU).  The host and port follow Gradio's rules
(`--host`/`--port`, else `GRADIO_SERVER_NAME`/`GRADIO_SERVER_PORT`, else
127.0.0.1 and the first free port from 7860), so `python app.py` on a
Hugging Face Space listens on 0.0.0.0:7860 as the Space expects.

Without it (`--no-fast-channel`, or on ZeroGPU, where the GPU exists only
inside a `spaces.GPU` call made from a Gradio request, which a WebSocket
handler is not; or when no WebSocket library is installed) the page is
served by Gradio's own `launch`, exactly as a plain Gradio app, and uses
the Gradio event path.

Either way the server also serves the pop-out view (ui.popout: GET /view
and its WebSocket /sv2v/view), which only reads renders the live path has
made, so it needs no GPU and works on ZeroGPU too.

The model's CPU threads (`model_threads`): an app that renders on a CPU and
listens on a loopback address serves a browser on the same machine, which
needs a core of its own to draw and show the renders; so by default the
model gets all cores but one there (at least one), and torch's own count
everywhere else (docs/live-path.md has the measurements).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import fastapi
import gradio as gr
import torch
import uvicorn
from starlette.routing import Mount

from sv2v_core.config import StreamConfig
from sv2v_core.control import CONTROLLED_STRENGTH

from .channel import FastChannel
from .gpu import zero_gpu
from .layout import PAGE_CSS, build_app
from .live import Live
from .popout import view_routes
from .presets import Preset
from .recording import Recorder
from .local_renderer import MAX_BATCH
from .service import CanvasService
from .sessions import SessionRegistry
from .wire import MAX_SNAPSHOT_BYTES

# Messages beyond this are refused by the WebSocket layer itself (close 1009);
# between MAX_SNAPSHOT_BYTES and this the channel answers with an error message.
WS_MAX_SIZE = 2 * MAX_SNAPSHOT_BYTES

MAX_UPLOAD = "20mb"
QUEUE_CONCURRENCY = 4
DEFAULT_HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860
PORTS_TO_TRY = 100
SHUTDOWN_SECONDS = 3
FAULT_STOP_DELAY = 1.0  # seconds between a device fault and the server's stop
RELEASE_AFTER = 30.0  # seconds idle before a session's stream state leaves the GPU (and its place frees)

log = logging.getLogger("sv2v.server")


def listen_host(host: str | None) -> str:
    """Where the server listens: `host`, else $GRADIO_SERVER_NAME, else 127.0.0.1 (Gradio's rules)."""
    return host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST


def model_threads(host: str | None, device: str, asked: int | None = None) -> int | None:
    """The model's CPU threads for an app listening on `host` with its model on `device` ("cpu", "cuda"):
    `asked` (--torch-threads; 0: torch's own), else, on a CPU listening on a loopback address (the
    browser draws on this machine), torch's own count less a core for the browser, at least one
    (never more than the CPUs less one), else None: torch's own."""
    if asked is not None:
        return asked or None
    if device != "cpu" or listen_host(host) not in LOOPBACK:
        return None
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def create_base_config(size: int, render_mode: str = "latency", *, controlled: bool = False,
                       control_scale: float | None = None) -> StreamConfig:
    """The canvas's stream settings at size×size (ValueError for settings the config rejects).

    controlled: the model has a ControlNet; control_scale: its default
    conditioning scale (None: 1.0).
    """
    # No similarity skip for the canvas: it sends a snapshot only when the drawing
    # changed, and a small stroke (an eye, a dot) must still be rendered.  Webcam
    # frames turn the skip back on (ui/layout.py).
    base = StreamConfig(width=size, height=size, mode=render_mode, similarity_skip=None)
    if controlled:
        base = base.replace(control_scale=1.0 if control_scale is None else control_scale, control_image="lines",
                            strength=CONTROLLED_STRENGTH)
    return base


def create_service(engine, *, size: int, render_mode: str = "latency", idle_timeout: float = 1800.0,
                   control_scale: float | None = None, max_sessions: int | None = None,
                   release_after: float = RELEASE_AFTER, max_batch: int = MAX_BATCH,
                   renderer=None, released_memory: int | None = None) -> CanvasService:
    """The app's service around `engine`, or `renderer` (see CanvasService), rendering the canvas at size×size.

    control_scale: the default conditioning scale when the model has a
    ControlNet (None: 1.0).  max_sessions: at most this many sessions render
    at once (None: no limit), release_after: seconds of idleness before a
    session's state leaves the GPU and its place is freed, max_batch: frames
    per batch, released_memory: bytes idle sessions' streams may hold in host memory (ui.sessions,
    ui.service, ui.local_renderer).  ValueError for settings the config rejects
    (e.g. a size out of range).
    """
    controlled = renderer.controlled if renderer is not None else getattr(engine, "controlnet", None) is not None
    base = create_base_config(size, render_mode, controlled=controlled, control_scale=control_scale)
    registry = SessionRegistry(Recorder, idle_timeout=idle_timeout, max_active=max_sessions,
                               release_after=release_after)
    return CanvasService(engine, registry, base, max_batch=max_batch, renderer=renderer,
                         released_memory=released_memory)


def fast_channel_available() -> tuple[bool, str]:
    """Whether this host can serve the fast channel, and why not."""
    if zero_gpu():
        return False, "ZeroGPU: GPU work must run inside Gradio requests"
    if not any(importlib.util.find_spec(name) for name in ("websockets", "wsproto")):
        return False, "no WebSocket library for uvicorn (pip install websockets)"
    return True, ""


@dataclass
class RunningApp:
    """A server started with `serve(..., block=False)`."""

    demo: gr.Blocks
    url: str
    fast_channel: bool
    stop: Callable[[], None]

    def close(self) -> None:
        self.stop()


def serve(service: CanvasService, presets: dict[str, Preset], *, notice: str | None = None,
          host: str | None = None, port: int | None = None, fast_channel: bool = True,
          block: bool = True, allowed_origins: Sequence[str] = ()) -> RunningApp | None:
    """Serve the page (and the fast channel, where possible).

    block: run until the server stops (returns None); False: start it in
    the background and return a `RunningApp` (stop it with `.close()`).
    allowed_origins: origins besides the app's own whose pages may use the
    fast channel (a proxy's, an embedding page's: ui.channel).
    """
    if fast_channel:
        fast_channel, why = fast_channel_available()
        if not fast_channel:
            log.warning("fast channel off (%s): pages use the Gradio event path", why)
    live = Live(service, presets)  # the session layer; the page, the fast channel and the pop-out adapt it
    channel = FastChannel(live, allowed_origins)  # ValueError for an origin that is not one
    demo = build_app(live, notice=notice, fast_channel=fast_channel)
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY)
    if not fast_channel:
        stop_on_device_fault(service, demo.close)
        with signals_as_interrupt() if block else contextlib.nullcontext():
            try:
                demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, css=PAGE_CSS,
                            show_error=True, prevent_thread_lock=not block, quiet=not block,
                            app_kwargs={"routes": view_routes(live)})
            except KeyboardInterrupt:  # stopped while `launch` was still starting (once running, it takes it)
                demo.close()
        return None if block else RunningApp(demo, demo.local_url, False, demo.close)

    app = fastapi.FastAPI(routes=[channel.route(), *view_routes(live)], docs_url=None, redoc_url=None,
                          openapi_url=None)
    gr.mount_gradio_app(app, demo, path="/", max_file_size=MAX_UPLOAD, css=PAGE_CSS, show_error=True)
    page = next(route.app for route in app.routes if isinstance(route, Mount))  # the mounted Gradio app
    host = listen_host(host)
    port = port or _free_port(host, int(os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT))

    def stopping() -> None:
        """The server is told to stop: refuse new work, close the pages' connections (on the server's loop)."""
        log.info("stopping: new work is refused and the pages are told")
        service.stop()
        channel.stop()
        page.stop_event.set()  # Gradio's heartbeat streams end at once instead of holding the shutdown

    server = AppServer(uvicorn.Config(
        app, host=host, port=port, log_level="warning", ws_per_message_deflate=False, ws_max_size=WS_MAX_SIZE,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,  # open pages hold connections: do not wait for them forever
    ), on_stop=stopping)
    stop_on_device_fault(service, server.stop)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"
    if block:
        log.info("running on %s", url)
        with signals_after_stop():
            server.run()
        return None
    thread = threading.Thread(target=server.run, name="sv2v-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port}")
        time.sleep(0.05)

    def stop() -> None:
        server.stop()
        thread.join(timeout=15)

    return RunningApp(demo, url, True, stop)


class AppServer(uvicorn.Server):
    """uvicorn's server, which tells the app first when it is stopped (SIGINT, SIGTERM or `stop`):
    `on_stop` refuses new work and closes the pages' connections (1001), so uvicorn's graceful
    shutdown does not wait for them; then uvicorn shuts down as it does."""

    def __init__(self, config: uvicorn.Config, *, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        """Stop serving (from any thread)."""
        self._tell()
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        self._tell()
        super().handle_exit(sig, frame)

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _tell(self) -> None:
        """Run `on_stop` once, on the server's event loop (it touches the connections' loop objects)."""
        with self._stop_lock:
            first, self._stopped = not self._stopped, True
        if first and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_stop)
        elif first:
            self.on_stop()


def stop_on_device_fault(service: CanvasService, stop: Callable[[], None]) -> None:
    """After a device fault (ui.local_renderer) the server stops, so that the app exits (status 1) and its
    supervisor restarts it; FAULT_STOP_DELAY later, so that the pages get the failed renders' message
    first.  A back end without device faults of its own (Ray: its replicas) is left as it is."""
    if hasattr(service.renderer, "on_device_fault"):
        service.renderer.on_device_fault = lambda fault: threading.Timer(FAULT_STOP_DELAY, stop).start()


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """While Gradio's own `launch` blocks this (main) thread: SIGTERM too is a Ctrl+C (KeyboardInterrupt),
    which `launch` takes as its stop, closing its server and returning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handled.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_after_stop() -> Iterator[None]:
    """While the server runs in this (main) thread: uvicorn handles SIGINT and SIGTERM (a graceful stop)
    and, once stopped, raises the signal again with the handlers it found; these take it as done, so the
    process goes on to close the service and exit 0 instead of dying with the default handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handled.items():
            signal.signal(sig, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now (the system's pick): for test and benchmark servers."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _free_port(host: str, start: int) -> int:
    """The first port from `start` that `host` can listen on (as Gradio's launch picks one)."""
    for port in range(start, start + PORTS_TO_TRY):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}-{start + PORTS_TO_TRY - 1} on {host}; pass --port")
