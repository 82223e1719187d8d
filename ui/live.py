"""The session layer of the live canvas: what a page's snapshots and settings go through, on any transport.

A transport adapter only translates: its messages into calls here, and the
typed replies it gets back into its own messages.  Today's adapters are
ui.channel (the WebSocket fast channel), ui.layout (Gradio's events: the
fallback path, the API, the webcam) and ui.popout (the pop-out view); a new
transport is one more adapter file.  Everything else happens here, once:

- sequence: on one connection a page's snapshot numbers must increase;
- caps: at most MAX_UNANSWERED snapshots of a connection unanswered
  (`Overrun`: the client does not read its renders);
- decode on take: a snapshot is queued still encoded (`ui.inputs.EncodedFrame`)
  and decoded at the render size only when the model takes it, so one that
  a newer snapshot replaces first is never decoded; one that cannot be
  decoded fails alone (`Failed`, unreadable);
- errors: every outcome is one typed reply: `RenderReply`, `Dropped` (a
  newer snapshot replaced it), `Failed` (bad input, bad settings, a
  failing device), `BusyReply` (every place taken), plus a `Notice` when
  the session's stream was restarted (`RESTARTED_NOTICE`);
- settings: the page's controls (ui.settings) become the session's stream
  settings, from whichever transport sends them;
- pop-out: the session's view token, and the feed a view watches (the
  service publishes every render to it, ui.feeds);
- the fast channel's key: a per-session secret (`channel_key`, an HMAC of
  the session id under the app's secret) that the server gives the page
  with its Gradio session and the page sends when it connects; a
  connection without the right key for its session is refused
  (`connect_channel`).  The app's secret is random per process, or
  $SV2V_CHANNEL_SECRET (so the benchmark's clients can make keys, and
  pages keep theirs across a restart).

An adapter's calls:

    live = Live(service, presets)                    # one per app
    page = live.connect(session_id)                  # one per connection (ValueError: a bad id)
    page = live.connect_channel(session_id, key)     # the same, for a transport the page opens itself
    live.channel_key(session_id)                     # the key the page gets with its session
    page.render_size(), page.view_token()            # what the page needs to know: its snapshot size, pop-out link
    page.settings(Settings(...))                     # -> [] or [Failed]
    outcome = page.snapshot(message)                 # a wire.SnapshotMessage; may block (admission)
    # outcome: a list of replies (answered at once), or a Pending whose
    # future finishes later; then:
    page.answer(pending)                             # -> [Notice?, RenderReply] or [Dropped] ...
    page.rerender(), page.render(frame, config)      # a settings change; the API and the webcam
    page.close()                                     # the connection ended: its waiting frame goes
    live.watch(token)                                # the pop-out's feed, or None

An async transport calls `snapshot` on a worker thread (admission takes
locks) and `answer` once the pending future is done (`Pending.future`), so
its event loop never waits for the model.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from sv2v_core.config import StreamConfig
from sv2v_core.images import ImageError

from .feeds import ViewFeed
from .inputs import EncodedFrame
from .presets import Preset
from .renderer import RendererBusy, Superseded
from .service import CanvasService, Rendered, Ticket
from .sessions import Busy
from .settings import Settings
from .wire import ServerTimings, SnapshotMessage

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_UNANSWERED = 8
# What the page shows when a visitor's stream was started afresh (a worker died or reclaimed it).
RESTARTED_NOTICE = ("render restarted: its worker changed, so the bank starts over from this frame "
                    "(drawing and recording kept)")

# What a render can end with besides a picture (Busy and RendererBusy are RuntimeErrors): see `_refusal`.
RENDER_ERRORS = (Superseded, ValueError, OSError, RuntimeError)

log = logging.getLogger("sv2v.live")
CHANNEL_SECRET_ENV = "SV2V_CHANNEL_SECRET"


def channel_secret() -> bytes:
    """The secret the fast channel's keys are made with: $SV2V_CHANNEL_SECRET, else random (this process)."""
    value = os.environ.get(CHANNEL_SECRET_ENV)
    return value.encode() if value else secrets.token_bytes(32)


def channel_key(secret: bytes, session_id: str) -> str:
    """The fast channel's key for a session: an HMAC of its id, so it needs no storage and no other
    session's key can be told from it."""
    return hmac.new(secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]


class Refused(ValueError):
    """A connection without the right key for its session."""


class Overrun(Exception):
    """A connection has more than MAX_UNANSWERED snapshots unanswered: its client does not read its renders."""


@dataclass(frozen=True)
class RenderReply:
    """Snapshot `seq` rendered (in stream mode the picture may show an older one: `rendered.seq`)."""

    seq: int
    rendered: Rendered
    timings: ServerTimings = field(default_factory=ServerTimings)


@dataclass(frozen=True)
class Dropped:
    """A newer snapshot of the page replaced snapshot `seq` before the model got to it (it was never decoded)."""

    seq: int


@dataclass(frozen=True)
class Failed:
    """Snapshot `seq` (None: the settings) could not be used; `unreadable`: its picture could not be decoded."""

    seq: int | None
    message: str
    unreadable: bool = False


@dataclass(frozen=True)
class BusyReply:
    """Every place is taken: `ahead` people wait before this page (0: every render worker is full)."""

    seq: int
    ahead: int
    message: str


@dataclass(frozen=True)
class Notice:
    """Something the person drawing should know (the render restarted; the GPU renders fewer at a time...)."""

    message: str


Reply = Union[RenderReply, Dropped, Failed, BusyReply, Notice]


@dataclass(frozen=True)
class Pending:
    """A queued snapshot: `future` finishes when its render does (then `LivePage.answer`)."""

    seq: int
    ticket: Ticket
    received: float

    @property
    def future(self) -> Future:
        return self.ticket.future


class Live:
    """The session layer of one app: the service and the style presets the pages' settings refer to."""

    def __init__(self, service: CanvasService, presets: dict[str, Preset], *, secret: bytes | None = None) -> None:
        self.service = service
        self.presets = presets
        self._secret = secret or channel_secret()

    def connect(self, session_id: str | None) -> "LivePage":
        """A page's connection (its Gradio session id); ValueError for an id that is not one."""
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a page's session id: {session_id!r:.80}")
        return LivePage(self, session_id)

    def channel_key(self, session_id: str) -> str:
        """The key a page of this session connects its own channels with (ValueError: not a session id)."""
        return channel_key(self._secret, self.connect(session_id).session_id)

    def connect_channel(self, session_id: str | None, key: str | None) -> "LivePage":
        """A connection the page opened itself, with its session's key; `Refused` without the right one."""
        page = self.connect(session_id)
        if not key:
            raise Refused("connect with the page's key (?key=...)")
        if not hmac.compare_digest(str(key), channel_key(self._secret, page.session_id)):
            raise Refused("the key is not this session's")
        return page

    def config(self, settings: Settings) -> StreamConfig:
        """The stream settings the page's controls describe; ValueError."""
        return settings.config(self.service.base, self.presets, controlled=self.service.controlled)

    def watch(self, token: str) -> ViewFeed | None:
        """The pop-out feed of the session `token` was made for (None: no such live view)."""
        return self.service.views.find(token)


class LivePage:
    """One page's connection on some transport (see the module docstring)."""

    def __init__(self, live: Live, session_id: str) -> None:
        self.live = live
        self.service = live.service
        self.session_id = session_id
        self._lock = threading.Lock()
        self._last_seq = -1
        self._unanswered = 0  # snapshots queued for the model whose answer is not out yet

    def render_size(self) -> tuple[int, int]:
        """(width, height) the page's snapshots are rendered at."""
        config = self.service.config_of(self.session_id)
        return config.width, config.height

    def view_token(self) -> str:
        """The session's pop-out link token (made on first use)."""
        return self.service.view_token(self.session_id)

    def settings(self, settings: Settings) -> list[Reply]:
        """Render with these settings (and compare view) from now on: [] or [Failed] (the settings stay
        as they were)."""
        try:
            self.service.set_config(self.session_id, self.live.config(settings), compare=bool(settings.compare))
        except ValueError as error:
            return [Failed(None, str(error))]
        return []

    def snapshot(self, message: SnapshotMessage, received: float | None = None) -> list[Reply] | Pending:
        """Check and queue one snapshot, still encoded (newest wins; decoded when the model takes it);
        replies now, or a Pending.

        received: when the transport got it (time.monotonic; default now).
        Raises `Overrun` when too many are unanswered: the transport should
        drop the connection.
        """
        received = time.monotonic() if received is None else received
        seq = message.seq
        with self._lock:
            if self._unanswered >= MAX_UNANSWERED:
                raise Overrun(f"more than {MAX_UNANSWERED} snapshots unanswered: read the renders")
            if seq <= self._last_seq:
                return [Failed(seq, f"snapshot {seq} arrived after snapshot {self._last_seq}; "
                                    "sequence numbers must increase")]
            self._last_seq = seq
        frame = EncodedFrame(message.image, message.control)
        try:
            ticket = self.service.submit(self.session_id, frame, self.service.config_of(self.session_id),
                                         stamp=message.stamp, seq=seq, end=message.end, cut=message.cut)
        except RENDER_ERRORS as error:
            return self._refusal(seq, error)
        with self._lock:
            self._unanswered += 1
        return Pending(seq, ticket, received)

    def answer(self, pending: Pending) -> list[Reply]:
        """The replies to a queued snapshot (waits for its render if it is not done)."""
        with self._lock:
            self._unanswered -= 1

        def timings(rendered: Rendered) -> ServerTimings:
            return ServerTimings(decode=rendered.decode_seconds * 1000, wait=pending.ticket.wait_seconds * 1000,
                                 model=rendered.model_seconds * 1000, encode=rendered.encode_seconds * 1000,
                                 total=(time.monotonic() - pending.received) * 1000)

        return self._replies(pending.seq, pending.ticket.future.result, timings)

    def rerender(self) -> list[Reply]:
        """Render the newest snapshot again with the current settings ([] when nothing was drawn)."""
        return self._replies(0, lambda: self.service.rerender(self.session_id))

    def render(self, frame: np.ndarray, config: StreamConfig, *, end: bool = True) -> list[Reply]:
        """Render a picture that came decoded (the API's image, a webcam frame) with `config`."""
        return self._replies(0, lambda: self.service.render(self.session_id, frame, config, end=end))

    def close(self) -> None:
        """The connection ended: its waiting snapshot is dropped; the session stays for a reconnect."""
        self.service.cancel(self.session_id)

    def _replies(self, seq: int, attempt: Callable[[], Rendered | None],
                 timings: Callable[[Rendered], ServerTimings] | None = None) -> list[Reply]:
        """What `attempt` comes to, as replies (None from it: no render, no reply)."""
        try:
            rendered = attempt()
        except RENDER_ERRORS as error:
            return self._refusal(seq, error)
        if rendered is None:
            return []
        # The renderer's own notice says why when it has one (e.g. an idle stream freed), else a restart's
        notice = [Notice(rendered.notice or RESTARTED_NOTICE)] if rendered.notice or rendered.restarted else []
        return [*notice, RenderReply(seq, rendered, ServerTimings() if timings is None else timings(rendered))]

    def _refusal(self, seq: int, error: Exception) -> list[Reply]:
        """The reply to snapshot `seq` for an error a render ended with: the one mapping of errors to replies."""
        if isinstance(error, Superseded):
            return [Dropped(seq)]
        if isinstance(error, ImageError):  # its picture could not be read: this snapshot alone
            return [Failed(seq, str(error), unreadable=True)]
        if isinstance(error, Busy):  # every place is taken (ui.sessions): the page shows it and asks again
            return [BusyReply(seq, error.ahead, str(error))]
        if isinstance(error, RendererBusy):  # every render worker is full (Ray): the same busy state
            return [BusyReply(seq, 0, str(error))]
        if not isinstance(error, ValueError):  # a bad picture or setting is the visitor's to fix; this is ours
            log.warning("render of snapshot %d of session %s failed: %s", seq, self.session_id, error)
        return [Failed(seq, str(error))]
