"""The fast channel: canvas snapshots in, renders out, over one WebSocket per page.

Route: ``/sv2v/ws?session=<Gradio session hash>``.  The page connects with
its Gradio session hash, so the fast channel and the Gradio events of one
page share one session: one stream, feature bank, recording and settings
(the settings themselves arrive through Gradio events, ui.layout).  Message
format: ui.wire.

Per connection, a receiving loop parses each snapshot, decodes and resizes it
on a worker thread and queues it on the render scheduler (newest wins), then
goes straight back to receiving: the next snapshot is decoded while the model
renders this one.  A sending loop takes finished renders in order (encoded
to JPEG by the service's finishing thread, not the model's) and sends them
with the server's timings.  Every message the page gets back answers one snapshot (a
render, "dropped" or "error"), which is what the page's flow control counts.

Bad input never reaches the model and never affects another connection:
- a message that breaks the format (too short, bad magic or version,
  unknown flags, text instead of binary): an error message, then the
  connection is closed (1002 protocol error / 1003 unsupported data);
- an oversized snapshot, a sequence number that does not increase, an image
  that cannot be decoded: an error message naming the snapshot; the
  connection stays open;
- a client that does not read its answers (more than MAX_UNANSWERED
  snapshots unanswered; the page never has more than two): an error, then
  the connection is closed (1008), so its renders do not pile up in memory;
- a connection dropped at any point: its waiting snapshot is dropped; the
  session (stream, bank, recording) stays for a reconnect until the page
  unloads or the idle timeout frees it (its GPU memory and its place go
  after the shorter idle release, ui.sessions).

When every place is taken (ui.sessions, `--max-sessions`) a snapshot is
answered with ``{"type": "busy", "seq", "ahead", "message"}`` and never
queued; the page shows the message and asks again every second.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from sv2v_core.images import ImageError

from .inputs import decode_image_bytes
from .renderer import RendererClosed, Superseded
from .renderer import RendererBusy
from .service import RESTARTED_NOTICE, CanvasService, Ticket
from .sessions import Busy
from .wire import (
    MAX_SNAPSHOT_BYTES, SNAPSHOT_HEADER, ProtocolError, ServerTimings, busy_message, dropped_message,
    error_message, notice_message, pack_render, ready_message, unpack_snapshot,
)

PATH = "/sv2v/ws"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROTOCOL_ERROR, UNSUPPORTED_DATA, POLICY_VIOLATION = 1002, 1003, 1008
MAX_UNANSWERED = 8
CLOSE_SECONDS = 5.0  # at most this long to send what is answered and the close, to a client that may not read

log = logging.getLogger("sv2v.channel")


def channel_route(service: CanvasService) -> WebSocketRoute:
    """The WebSocket route serving `service` (added to the app's server by ui.server)."""

    async def endpoint(websocket: WebSocket) -> None:
        await Connection(service, websocket).run()

    return WebSocketRoute(PATH, endpoint)


class _Close(Exception):
    """End the connection after telling the page why (if it still reads)."""

    def __init__(self, code: int, message: str, *, reads: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.reads = reads


class Connection:
    """One page's WebSocket: a receiving loop and a sending loop."""

    def __init__(self, service: CanvasService, websocket: WebSocket) -> None:
        self.service = service
        self.websocket = websocket
        self.session_id = websocket.query_params.get("session", "")
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.last_seq = -1
        self.unanswered = 0  # snapshots queued for the model whose answer is not sent yet

    async def run(self) -> None:
        await self.websocket.accept()
        if not SESSION_ID.fullmatch(self.session_id):
            await self._close(POLICY_VIOLATION, "connect with ?session=<the page's session id>")
            return
        config = self.service.config_of(self.session_id)
        sender = asyncio.create_task(self._send_loop())
        try:
            await self.websocket.send_text(ready_message(config.width, config.height))
            await self._receive_loop()
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
            self.service.cancel(self.session_id)

    async def _close(self, code: int, message: str) -> None:
        try:
            await asyncio.wait_for(self.websocket.send_text(error_message(message)), CLOSE_SECONDS)
            await asyncio.wait_for(self.websocket.close(code, reason=message[:120]), CLOSE_SECONDS)
        except (WebSocketDisconnect, WebSocketDisconnected, asyncio.TimeoutError):
            pass  # gone, or not reading: returning ends the connection

    # -- receiving ------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise _Close(UNSUPPORTED_DATA, "this channel takes binary canvas snapshots only")
            await self._snapshot(data)

    async def _snapshot(self, data: bytes) -> None:
        received = time.monotonic()
        if len(data) > SNAPSHOT_HEADER.size + MAX_SNAPSHOT_BYTES:
            seq = SNAPSHOT_HEADER.unpack_from(data)[3]
            self.outbox.put_nowait(error_message(
                f"the snapshot is {len(data) / 2**20:.1f} MB; the limit is {MAX_SNAPSHOT_BYTES // 2**20} MB", seq))
            return
        try:
            snapshot = unpack_snapshot(data)
        except ProtocolError as error:
            raise _Close(PROTOCOL_ERROR, str(error)) from None
        if self.unanswered >= MAX_UNANSWERED:
            raise _Close(POLICY_VIOLATION, f"more than {MAX_UNANSWERED} snapshots unanswered: read the renders",
                         reads=False)
        if snapshot.seq <= self.last_seq:
            self.outbox.put_nowait(error_message(
                f"snapshot {snapshot.seq} arrived after snapshot {self.last_seq}; sequence numbers must increase",
                snapshot.seq))
            return
        self.last_seq = snapshot.seq
        config = self.service.config_of(self.session_id)
        size = (config.width, config.height)
        try:
            frame = await asyncio.to_thread(decode_image_bytes, snapshot.image, size)
            # The ink layer, the ControlNet's control source (sent only when the app has one).
            control = None if snapshot.control is None else await asyncio.to_thread(decode_image_bytes,
                                                                                     snapshot.control, size)
        except ImageError as error:
            self.outbox.put_nowait(error_message(str(error), snapshot.seq))
            return
        decode_ms = (time.monotonic() - received) * 1000
        try:
            ticket = self.service.submit(self.session_id, frame, config, stamp=snapshot.stamp, seq=snapshot.seq,
                                         end=snapshot.end, cut=snapshot.cut, jpeg=snapshot.image, control=control)
        except Busy as busy:
            self.outbox.put_nowait(busy_message(snapshot.seq, busy.ahead, str(busy)))
            return
        except (ValueError, RendererClosed) as error:
            self.outbox.put_nowait(error_message(str(error), snapshot.seq))
            return
        self.unanswered += 1
        loop = asyncio.get_running_loop()
        item = (snapshot.seq, ticket, received, decode_ms)

        def deliver(_) -> None:  # on the thread that finished the render
            try:
                loop.call_soon_threadsafe(self.outbox.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server has shut down
                pass

        ticket.future.add_done_callback(deliver)

    # -- sending ----------------------------------------------------------------------
    async def _send_loop(self) -> None:
        try:
            while (item := await self.outbox.get()) is not None:
                if isinstance(item, str):
                    await self.websocket.send_text(item)
                else:
                    await self._send_render(*item)
                    self.unanswered -= 1
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass  # the page went away; the receiving loop sees it too

    async def _send_render(self, seq: int, ticket: Ticket, received: float, decode_ms: float) -> None:
        try:
            rendered = ticket.future.result()
        except Superseded:
            await self.websocket.send_text(dropped_message(seq))
            return
        except RendererBusy as busy:  # every render worker is full (Ray): the page shows busy and asks again
            await self.websocket.send_text(busy_message(seq, 0, str(busy)))
            return
        except (ValueError, OSError, RuntimeError) as error:  # bad frame or settings; a failing device
            log.warning("render of snapshot %d failed: %s", seq, error)
            await self.websocket.send_text(error_message(str(error), seq))
            return
        if rendered.restarted:
            await self.websocket.send_text(notice_message(RESTARTED_NOTICE))
        timings = ServerTimings(decode=decode_ms, wait=ticket.wait_seconds * 1000,
                                model=rendered.model_seconds * 1000, encode=rendered.encode_seconds * 1000,
                                total=(time.monotonic() - received) * 1000)
        await self.websocket.send_bytes(pack_render(seq, rendered.seq, rendered.stamp, rendered.jpeg, timings,
                                                    skipped=rendered.skipped))
