"""The fast channel: the session layer (ui.live) over one WebSocket per page.

Route: ``/sv2v/ws?session=<Gradio session hash>&key=<the session's key>``.
The page connects with its Gradio session hash, so the fast channel and
the Gradio events of one page share one session: one stream, feature bank,
recording and settings.

Only its own pages.  A connection is refused before it opens (HTTP 403)
when its `Origin` is neither the app's own (the Origin's host and port are
the request's `Host`) nor one of the allowed origins (`--allow-origin`: a
proxy or an embedding page); a request without an Origin is not a
browser's (browsers always send one) and is let through to the key check.
Then it needs its session's key (ui.live's `channel_key`, which the page
got with its Gradio session): a missing or wrong key, or the key of
another session, is refused (1008).  So another web page a visitor opens
cannot drive the app, and knowing a session's hash is not enough to read
its renders.
Message format: ui.wire (binary snapshots in, binary renders out, JSON text
for settings and everything else).

This module only translates.  A receiving loop reads each message: a
snapshot goes to `LivePage.snapshot` on a worker thread (which queues it,
still encoded, newest wins: it is decoded when the model takes it), then
the loop goes straight back to receiving; a settings message goes to
`LivePage.settings`.  A sending loop sends
the replies in the order they are ready (a queued snapshot's once its
render is done, `LivePage.answer`).  Every reply the page gets answers one
snapshot (a render, "dropped", "busy" or "error"), which is what the
page's flow control counts.

What ends a connection (bad input never reaches the model and never
affects another connection):
- a message that breaks the format (too short, bad magic or version,
  unknown flags; text that is not a settings message): an error message,
  then the connection is closed (1002 protocol error / 1003 unsupported
  data);
- a client that does not read its answers (`Overrun`): closed (1008)
  without a goodbye, so its renders do not pile up in memory;
- a bad session id, or a missing or wrong key: an error, then 1008;
- the server stopping (`FastChannel.stop`): "the server is stopping",
  then 1001 (going away).
An oversized snapshot gets an error naming it and the connection stays.  A
connection dropped at any point drops its waiting snapshot; the session
(stream, bank, recording) stays for a reconnect until the page unloads or
the idle timeout frees it (ui.sessions).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Iterable
from urllib.parse import urlsplit

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .live import BusyReply, Dropped, Failed, Live, LivePage, Notice, Overrun, Pending, Refused, RenderReply, Reply
from .wire import (
    MAX_SNAPSHOT_BYTES, SNAPSHOT_HEADER, ProtocolError, busy_message, dropped_message, error_message, notice_message,
    pack_render, ready_message, unpack_settings, unpack_snapshot,
)

PATH = "/sv2v/ws"
GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, POLICY_VIOLATION = 1001, 1002, 1003, 1008
STOPPING = "the server is stopping"
CLOSE_SECONDS = 5.0  # at most this long to send what is answered and the close, to a client that may not read

log = logging.getLogger("sv2v.channel")


def origin_of(url: str) -> str:
    """An origin as browsers send it: scheme://host[:port], lower case, no path."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"not an origin (scheme://host[:port]): {url!r}")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class FastChannel:
    """The fast channel of one app: its route, the origins it accepts, its open connections.

    allowed_origins: origins accepted besides the app's own (a proxy's or
    an embedding page's, scheme://host[:port]).  `refused` counts the
    connections refused, by reason ("origin", "key").
    """

    def __init__(self, live: Live, allowed_origins: Iterable[str] = ()) -> None:
        self.live = live
        self.allowed_origins = frozenset(origin_of(origin) for origin in allowed_origins)
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._open: set[Connection] = set()
        self.stopping = False

    def route(self) -> WebSocketRoute:
        """The WebSocket route (added to the app's server by ui.server)."""
        return WebSocketRoute(PATH, self._endpoint)

    def origin_allowed(self, websocket: WebSocket) -> bool:
        """Whether the request's Origin is the app's own or an allowed one (no Origin: not a browser)."""
        origin = websocket.headers.get("origin")
        if origin is None:
            return True
        try:
            origin = origin_of(origin)
        except ValueError:
            return False
        return origin in self.allowed_origins or urlsplit(origin).netloc == websocket.headers.get("host", "").lower()

    def stop(self) -> None:
        """The server is stopping: every connection is told so and closed with 1001 (from any thread)."""
        with self._lock:
            self.stopping = True
            connections = list(self._open)
        for connection in connections:
            connection.going_away()

    async def _endpoint(self, websocket: WebSocket) -> None:
        if not self.origin_allowed(websocket):
            self.refused["origin"] += 1
            log.info("refused a fast-channel connection from origin %s", websocket.headers.get("origin"))
            await websocket.close(POLICY_VIOLATION)  # before accepting: an HTTP 403
            return
        connection = Connection(self.live, websocket, self)
        with self._lock:
            stopping = self.stopping
            if not stopping:
                self._open.add(connection)
        try:
            await connection.run(stopping=stopping)
        finally:
            with self._lock:
                self._open.discard(connection)


class _Close(Exception):
    """End the connection after telling the page why (if it still reads)."""

    def __init__(self, code: int, message: str, *, reads: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.reads = reads


class Connection:
    """One page's WebSocket: a receiving loop and a sending loop around one `LivePage`."""

    def __init__(self, live: Live, websocket: WebSocket, channel: FastChannel | None = None) -> None:
        self.live = live
        self.websocket = websocket
        self.channel = channel
        self.outbox: asyncio.Queue = asyncio.Queue()  # replies, and pending snapshots once their render is done
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiving: asyncio.Task | None = None

    def going_away(self) -> None:
        """Close with 1001 ("the server is stopping"), from any thread."""
        if self._loop is not None and self._receiving is not None:
            self._loop.call_soon_threadsafe(self._receiving.cancel, STOPPING)

    async def run(self, *, stopping: bool = False) -> None:
        await self.websocket.accept()
        if stopping:
            await self._close(GOING_AWAY, STOPPING)
            return
        query = self.websocket.query_params
        try:
            page = self.live.connect_channel(query.get("session", ""), query.get("key"))
        except Refused as refused:
            if self.channel is not None:
                self.channel.refused["key"] += 1
            log.info("refused a fast-channel connection for session %.64s: %s", query.get("session", ""), refused)
            await self._close(POLICY_VIOLATION, str(refused))
            return
        except ValueError:
            await self._close(POLICY_VIOLATION, "connect with ?session=<the page's session id>&key=<its key>")
            return
        self._loop = asyncio.get_running_loop()
        sender = asyncio.create_task(self._send_loop(page))
        try:
            await self.websocket.send_text(ready_message(*page.render_size()))
            self._receiving = asyncio.current_task()
            if self.channel is not None and self.channel.stopping:
                raise asyncio.CancelledError(STOPPING)
            await self._receive_loop(page)
        except asyncio.CancelledError:
            if self.channel is None or not self.channel.stopping:
                raise  # not ours: the server cancels what is left
            asyncio.current_task().uncancel()  # ours (`going_away`): say goodbye
            await self._close(GOING_AWAY, STOPPING)
        except _Close as close:
            log.info("closing a fast-channel connection: %s", close)
            if close.reads:
                self.outbox.put_nowait(None)
                try:  # what was already answered goes out first
                    await asyncio.wait_for(sender, CLOSE_SECONDS)
                except asyncio.TimeoutError:
                    pass
                await self._close(close.code, str(close))
            # A client that does not read gets no goodbye: returning drops the connection.
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass
        finally:
            sender.cancel()
            page.close()

    async def _close(self, code: int, message: str) -> None:
        try:
            await asyncio.wait_for(self.websocket.send_text(error_message(message)), CLOSE_SECONDS)
            await asyncio.wait_for(self.websocket.close(code, reason=message[:120]), CLOSE_SECONDS)
        except (WebSocketDisconnect, WebSocketDisconnected, asyncio.TimeoutError):
            pass  # gone, or not reading: returning ends the connection

    # -- receiving ------------------------------------------------------------------
    async def _receive_loop(self, page: LivePage) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                await self._snapshot(page, data)
                continue
            try:
                settings = unpack_settings(message.get("text"))
            except ProtocolError as error:
                raise _Close(UNSUPPORTED_DATA, str(error)) from None
            self._post(page.settings(settings))

    async def _snapshot(self, page: LivePage, data: bytes) -> None:
        received = time.monotonic()
        if len(data) > SNAPSHOT_HEADER.size + MAX_SNAPSHOT_BYTES:
            seq = SNAPSHOT_HEADER.unpack_from(data)[3]
            self._post([Failed(seq, f"the snapshot is {len(data) / 2**20:.1f} MB; the limit is "
                                    f"{MAX_SNAPSHOT_BYTES // 2**20} MB")])
            return
        try:
            snapshot = unpack_snapshot(data)
        except ProtocolError as error:
            raise _Close(PROTOCOL_ERROR, str(error)) from None
        try:
            outcome = await asyncio.to_thread(page.snapshot, snapshot, received)
        except Overrun as error:
            raise _Close(POLICY_VIOLATION, str(error), reads=False) from None
        if not isinstance(outcome, Pending):
            self._post(outcome)
            return
        loop = asyncio.get_running_loop()

        def deliver(_) -> None:  # on the thread that finished the render
            try:
                loop.call_soon_threadsafe(self.outbox.put_nowait, outcome)
            except RuntimeError:  # the event loop is closed: the server has shut down
                pass

        outcome.future.add_done_callback(deliver)

    def _post(self, replies: list[Reply]) -> None:
        for reply in replies:
            self.outbox.put_nowait(reply)

    # -- sending ----------------------------------------------------------------------
    async def _send_loop(self, page: LivePage) -> None:
        try:
            while (item := await self.outbox.get()) is not None:
                for reply in page.answer(item) if isinstance(item, Pending) else [item]:
                    await self._send(reply)
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass  # the page went away; the receiving loop sees it too

    async def _send(self, reply: Reply) -> None:
        """One reply as the fast channel's message (ui.wire)."""
        if isinstance(reply, RenderReply):
            rendered = reply.rendered
            await self.websocket.send_bytes(pack_render(reply.seq, rendered.seq, rendered.stamp, rendered.jpeg,
                                                        reply.timings, skipped=rendered.skipped,
                                                        compare=rendered.compare_jpeg or None))
        elif isinstance(reply, Dropped):
            await self.websocket.send_text(dropped_message(reply.seq))
        elif isinstance(reply, BusyReply):
            await self.websocket.send_text(busy_message(reply.seq, reply.ahead, reply.message))
        elif isinstance(reply, Failed):
            await self.websocket.send_text(error_message(reply.message, reply.seq))
        elif isinstance(reply, Notice):
            await self.websocket.send_text(notice_message(reply.message))
