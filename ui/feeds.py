"""Pop-out feeds: each session's newest render, for whoever watches it, found by an unguessable token.

A session's `ViewFeed` is made with its token (`ViewLinks.token_for`, 192
random bits, `secrets.token_urlsafe`) when its page asks for the pop-out
link; the token leads to that session's renders and nothing else, and is
not the session id: the link lets a viewer watch, never draw.  The service
publishes every finished render of the session to its feed (the JPEG it
already made for the page: no second render), and each watcher gets the
newest one: a slow viewer skips renders, it never queues them.  The view
page and its WebSocket are ui.popout.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import weakref
from typing import AsyncIterator

TOKEN_BYTES = 24
MAX_TOKEN_CHARS = 64


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
