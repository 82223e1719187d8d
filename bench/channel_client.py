"""A Python client of the fast channel that draws like the page does.

`ChannelClient` connects to ``/sv2v/ws?session=...&key=...`` (ui.channel), sends
pictures encoded in advance (so its own CPU does not skew the server's
figures) and paces them as the page's flow control does: `depth` snapshots
unanswered at most (two: one renders while the next waits), the next one
sent as soon as an answer comes, but no sooner than `interval` after the
last (the page sends only when the drawing changed, so at most once per
display frame: 1/60 s; 0: no such limit).  With `settings` it sends the page's
settings message first, as the page does on connecting.  It records each render's latency (snapshot
sent -> the render showing it received) and the server's timings, and
counts the other answers.  The benchmarks (bench.live, bench.loadtest) and the
tests use it.

The key: a session's key is an HMAC of its id under the app's secret
(ui.live); a client that is not the app's page makes it from the same
secret, $SV2V_CHANNEL_SECRET, which the app must have been started with
(`channel_url`).  It sends no Origin: it is not a browser.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from ui import wire
from ui.live import CHANNEL_SECRET_ENV, channel_key
from ui.settings import Settings

RECEIVE_TIMEOUT = 30.0


def share_secret() -> None:
    """Give this process (and the apps it starts) a channel secret, if it has none: for a benchmark's
    `main`, before it starts its app, so that its clients can make their keys."""
    os.environ.setdefault(CHANNEL_SECRET_ENV, secrets.token_hex(16))


def session_key(session: str) -> str:
    """The fast channel's key of `session` for an app started with this process's $SV2V_CHANNEL_SECRET."""
    secret = os.environ.get(CHANNEL_SECRET_ENV)
    if not secret:
        raise RuntimeError(f"set {CHANNEL_SECRET_ENV} for the app and its clients: the clients' keys come from it")
    return channel_key(secret.encode(), session)


def channel_url(url: str, session: str, key: str | None = None) -> str:
    """The fast channel's WebSocket URL of the app at `url` for `session` (its key by default)."""
    key = session_key(session) if key is None else key
    return url.replace("http://", "ws://").rstrip("/") + f"/sv2v/ws?session={session}&key={key}"


@dataclass
class Received:
    """One render: when it arrived (time.perf_counter), its latency (ms) and what it shows."""

    at: float
    latency_ms: float
    model_ms: float
    reply: int
    shows: int
    jpeg: bytes


@dataclass
class ClientLog:
    renders: list[Received] = field(default_factory=list)
    dropped: int = 0
    busy: int = 0
    errors: list[str] = field(default_factory=list)


class ChannelClient:
    """One simulated page on the fast channel (use as a context manager)."""

    def __init__(self, url: str, session: str, pictures: list[bytes], *, depth: int = 2, interval: float = 0.0,
                 on_render: Callable[[Received], None] | None = None, settings: Settings | None = None) -> None:
        if not pictures:
            raise ValueError("a client needs at least one picture to send")
        self.url = channel_url(url, session)
        self.session = session
        self.pictures = pictures
        self.depth = depth
        self.interval = interval
        self.on_render = on_render
        self.settings = settings
        self.log = ClientLog()
        self.seq = 0
        self.sent: dict[int, float] = {}
        self.unanswered = 0
        self._ws = None

    def __enter__(self) -> "ChannelClient":
        from websockets.sync.client import connect

        self._ws = connect(self.url, compression=None, open_timeout=RECEIVE_TIMEOUT, max_size=None)
        ready = json.loads(self._ws.recv(RECEIVE_TIMEOUT))
        if ready.get("type") != "ready":
            raise RuntimeError(f"the server did not say ready: {ready}")
        if self.settings is not None:
            self._ws.send(wire.settings_message(self.settings))
        return self

    def __exit__(self, *exc) -> None:
        self._ws.close()

    def send(self, *, end: bool = False) -> None:
        """Send the next picture (they are sent in turn, round and round), `interval` after the last."""
        wait = self.sent.get(self.seq, -float("inf")) + self.interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.seq += 1
        self.sent[self.seq] = time.perf_counter()
        self._ws.send(wire.pack_snapshot(self.seq, 0.0, self.pictures[self.seq % len(self.pictures)], end=end))
        self.unanswered += 1

    def start(self) -> None:
        """Fill the pipeline: `depth` snapshots in flight."""
        while self.unanswered < self.depth:
            self.send()

    def receive(self) -> str:
        """Wait for one answer and log it; its kind ("render", "dropped", "busy", "error")."""
        message = self._ws.recv(RECEIVE_TIMEOUT)
        if isinstance(message, bytes):
            reply, shows, _, timings, _, jpeg = wire.unpack_render(message)
            now = time.perf_counter()
            received = Received(now, (now - self.sent.get(shows, now)) * 1000, timings.model, reply, shows, jpeg)
            self.log.renders.append(received)
            self.unanswered -= 1
            if self.on_render is not None:
                self.on_render(received)
            return "render"
        answer = json.loads(message)
        kind = answer.get("type")
        if kind == "dropped":
            self.log.dropped += 1
        elif kind == "busy":
            self.log.busy += 1
        else:
            self.log.errors.append(answer.get("message", message))
        if answer.get("seq") is not None:
            self.unanswered -= 1
        return kind

    def step(self) -> str:
        """Receive one answer, then send the next snapshot (flow control: one out per answer in)."""
        kind = self.receive()
        self.start()
        return kind

    def drain(self) -> None:
        """Stop sending and wait for every answer still due."""
        while self.unanswered > 0:
            self.receive()
