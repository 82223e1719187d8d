"""The pop-out view's transport: one session's live render alone, full-window, in another window.

For a second monitor or a streaming tool's browser source (OBS).  The page
shows a link, ``view#<token>`` (the token: ui.feeds).  The token sits in the
URL's fragment, which browsers never send to a server (so it stays out of
access logs and Referer headers); the view page (GET /view) hands it over
as the first message on its WebSocket, ``/sv2v/view``, which then gets the
session's renders as binary JPEG messages.  A token that was never given
out, or whose session has ended, gets an error and no picture.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .live import Live

PAGE_PATH = "/view"
SOCKET_PATH = "/sv2v/view"
POLICY_VIOLATION = 1008
PAGE = Path(__file__).resolve().parent / "static" / "view.html"
NO_SUCH_VIEW = "This pop-out link is not valid, or its drawing session has ended."


def view_routes(live: Live) -> list:
    """The view page (GET /view) and its WebSocket (/sv2v/view) over the session layer, for ui.server."""

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
            feed = live.watch(hello.get("token")) if isinstance(hello, dict) else None
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
