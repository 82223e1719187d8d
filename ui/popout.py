"""The pop-out view: one session's live render alone, full-window, in another window.

For a second monitor or a streaming tool's browser source (OBS).  The page
shows a link, ``view#<token>``; the token is 192 random bits
(`secrets.token_urlsafe`) made for that session when its page asks for the
link, and it leads to that session's renders and nothing else.  It sits in
the URL's fragment, which browsers never send to a server (so it stays out
of access logs and Referer headers); the view page hands it over as the
first message on its WebSocket, ``/sv2v/view``.  A token that was never
given out, or whose session has ended, gets an error and no picture.  The
token is not the Gradio session id: the link lets a viewer watch, never draw
into the session.

No second model call: every render of the session (the canvas on either
channel, settings re-renders, the API, the webcam) is published by the
service's finishing thread as the JPEG it already made for the page
(`ViewFeed.publish`), and each connected view gets the newest one: a slow
viewer skips renders, it never queues them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import weakref
from pathlib import Path
from typing import AsyncIterator

from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

PAGE_PATH = "/view"
SOCKET_PATH = "/sv2v/view"
TOKEN_BYTES = 24
MAX_TOKEN_CHARS = 64
POLICY_VIOLATION = 1008
PAGE = Path(__file__).resolve().parent / "static" / "view.html"
NO_SUCH_VIEW = "This pop-out link is not valid, or its drawing session has ended."


class ViewFeed:
    """One session's renders for its pop-out views: the newest JPEG and who waits for it.

    `publish` may be called from any thread; `frames` runs on an event loop.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._latest: bytes | None = None
        self._version = 0
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def publish(self, jpeg: bytes) -> None:
        """A new render of the session (any thread)."""
        with self._lock:
            self._latest = jpeg
            self._version += 1
            waiters = list(self._waiters)
        self._wake(waiters)

    def close(self) -> None:
        """The session ended: every view of it stops."""
        with self._lock:
            self._closed = True
            waiters = list(self._waiters)
        self._wake(waiters)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @staticmethod
    def _wake(waiters) -> None:
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that viewer's event loop has shut down
                pass

    async def frames(self) -> AsyncIterator[bytes]:
        """The newest render now (if any) and then each newer one, skipping those
        published while the previous was still being sent; ends when the feed closes."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        seen = 0
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                with self._lock:
                    closed, version, latest = self._closed, self._version, self._latest
                    event.clear()
                if closed:
                    return
                if version != seen and latest is not None:
                    seen = version
                    yield latest
                    continue
                await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)


class ViewLinks:
    """The pop-out tokens of one app: token -> the feed of the session it was made for.

    A feed lives on its session (`Session.feed`) and is held here weakly, so
    a session that is closed or evicted takes its token with it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: weakref.WeakValueDictionary[str, ViewFeed] = weakref.WeakValueDictionary()

    def token_for(self, session) -> str:
        """The session's token, made (with its feed) on the first call."""
        with self._lock:
            if session.feed is None:
                feed = ViewFeed(secrets.token_urlsafe(TOKEN_BYTES))
                self._feeds[feed.token] = feed
                session.feed = feed
            return session.feed.token

    def find(self, token: str) -> ViewFeed | None:
        """The live feed for `token`, or None (never given out, or its session has ended)."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            return None
        with self._lock:
            feed = self._feeds.get(token)
        return None if feed is None or feed.closed else feed


def view_routes(links: ViewLinks) -> list:
    """The view page (GET /view) and its WebSocket (/sv2v/view), for ui.server to serve."""

    async def page(request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store",
                                                                       "Referrer-Policy": "no-referrer"})

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            try:
                hello = json.loads(await asyncio.wait_for(websocket.receive_text(), 10))
            except (asyncio.TimeoutError, json.JSONDecodeError, KeyError, TypeError):
                hello = None
            feed = links.find(hello.get("token")) if isinstance(hello, dict) else None
            if feed is None:
                await websocket.send_text(json.dumps({"type": "error", "message": NO_SUCH_VIEW}))
                await websocket.close(POLICY_VIOLATION, reason="no such view")
                return
            await websocket.send_text(json.dumps({"type": "ready"}))
            async for jpeg in feed.frames():
                await websocket.send_bytes(jpeg)
            await websocket.send_text(json.dumps({"type": "error", "message": "The drawing session has ended."}))
            await websocket.close()
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass  # the view was closed

    return [Route(PAGE_PATH, page), WebSocketRoute(SOCKET_PATH, socket)]
