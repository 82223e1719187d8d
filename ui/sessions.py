"""Per-visitor sessions: one stream and one recording per browser session.

A `SessionRegistry` belongs to one app instance (no module-level state).
Sessions are created lazily on a visitor's first render, keyed by Gradio's
session hash (the fast channel connects with the same hash, so both channels
share one stream, bank and recording), closed when the page unloads
(`close`) and evicted after `idle_timeout` seconds without use (checked on
every access), so an abandoned tab does not hold memory forever.

Only the render scheduler's worker thread touches a session's `state` (see
ui.scheduler); the other fields are set by request threads and read there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .recording import Recorder

MAX_STAMPS = 64


@dataclass
class Session:
    """What one visitor owns.

    state: the core's StreamState (None until the first frame is rendered).
    recorder: every frame rendered for this visitor, for export.
    config: the settings the page last reported (None until it did); the
        fast channel renders with these.
    last_frame, last_seq, last_control: the newest canvas frame submitted,
        its page sequence number and its control source (the ink layer, with
        a ControlNet), re-rendered when a setting changes.
    cut_pending: a submitted frame replaced the picture; the next frame that
        runs empties the bank (even if a newer frame replaced that one).
    sources: (page stamp, page seq) of recent inputs, by the stream's input
        index, so a render can be matched to the snapshot it shows.
    feed: the pop-out view's feed of this session's renders (ui.popout;
        None until the page asks for its link); closed with the session.
    """

    session_id: str
    recorder: Recorder
    state: Any = None
    config: Any = None
    last_frame: Any = None
    last_seq: int = 0
    last_control: Any = None
    cut_pending: bool = False
    last_used: float = field(default_factory=time.monotonic)
    sources: OrderedDict = field(default_factory=OrderedDict)
    feed: Any = None

    def remember_source(self, index: int, stamp: float, seq: int) -> None:
        self.sources[index] = (stamp, seq)
        while len(self.sources) > MAX_STAMPS:
            self.sources.popitem(last=False)

    def close(self) -> None:
        self.state = None
        self.last_frame = None
        self.last_control = None
        if self.feed is not None:
            self.feed.close()
        self.recorder.close()


class SessionRegistry:
    """Sessions by id, with idle eviction."""

    def __init__(self, make_recorder: Callable[[], Recorder], idle_timeout: float = 1800.0,
                 clock: Callable[[], float] = time.monotonic):
        self._make_recorder = make_recorder
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def get(self, session_id: str | None) -> Session:
        """The visitor's session, created on first use."""
        if not session_id:
            raise ValueError("this request has no session; reload the page")
        self.evict_idle()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = Session(session_id, self._make_recorder())
                self._sessions[session_id] = session
            session.last_used = self._clock()
            return session

    def close(self, session_id: str | None) -> None:
        """Free a session (the page was closed); unknown ids are ignored."""
        with self._lock:
            session = self._sessions.pop(session_id, None) if session_id else None
        if session is not None:
            session.close()

    def evict_idle(self) -> list[str]:
        """Close sessions unused for longer than `idle_timeout`; their ids."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
            sessions = [self._sessions.pop(sid) for sid in stale]
        for session in sessions:
            session.close()
        return stale

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
