"""The fast channel: the session layer (ui.live) over one WebSocket per page.

Route: ``/sv2v/ws?session=<Gradio session hash>``.  The page connects with
its Gradio session hash, so the fast channel and the Gradio events of one
page share one session: one stream, feature bank, recording and settings.
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
- a bad session id: an error, then 1008.
An oversized snapshot gets an error naming it and the connection stays.  A
connection dropped at any point drops its waiting snapshot; the session
(stream, bank, recording) stays for a reconnect until the page unloads or
the idle timeout frees it (ui.sessions).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .live import BusyReply, Dropped, Failed, Live, LivePage, Notice, Overrun, Pending, RenderReply, Reply
from .wire import (
    MAX_SNAPSHOT_BYTES, SNAPSHOT_HEADER, ProtocolError, busy_message, dropped_message, error_message, notice_message,
    pack_render, ready_message, unpack_settings, unpack_snapshot,
)

PATH = "/sv2v/ws"
PROTOCOL_ERROR, UNSUPPORTED_DATA, POLICY_VIOLATION = 1002, 1003, 1008
CLOSE_SECONDS = 5.0  # at most this long to send what is answered and the close, to a client that may not read

log = logging.getLogger("sv2v.channel")


def channel_route(live: Live) -> WebSocketRoute:
    """The WebSocket route serving the session layer `live` (added to the app's server by ui.server)."""

    async def endpoint(websocket: WebSocket) -> None:
        await Connection(live, websocket).run()

    return WebSocketRoute(PATH, endpoint)


class _Close(Exception):
    """End the connection after telling the page why (if it still reads)."""

    def __init__(self, code: int, message: str, *, reads: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.reads = reads


class Connection:
    """One page's WebSocket: a receiving loop and a sending loop around one `LivePage`."""

    def __init__(self, live: Live, websocket: WebSocket) -> None:
        self.live = live
        self.websocket = websocket
        self.outbox: asyncio.Queue = asyncio.Queue()  # replies, and pending snapshots once their render is done

    async def run(self) -> None:
        await self.websocket.accept()
        try:
            page = self.live.connect(self.websocket.query_params.get("session", ""))
        except ValueError:
            await self._close(POLICY_VIOLATION, "connect with ?session=<the page's session id>")
            return
        sender = asyncio.create_task(self._send_loop(page))
        try:
            await self.websocket.send_text(ready_message(*page.render_size()))
            await self._receive_loop(page)
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
