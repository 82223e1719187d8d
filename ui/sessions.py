"""Per-visitor sessions: one stream and one recording per browser session.

A `SessionRegistry` belongs to one app instance (no module-level state).
Sessions are created lazily on a visitor's first render, keyed by Gradio's
session hash, closed when the page unloads (`close`) and evicted after
`idle_timeout` seconds without use (checked on every access), so an
abandoned tab does not hold memory forever.

The registry also owns the GPU lock: every piece of model work takes it for
one frame at a time, so a long video translation interleaves with other
visitors' canvas frames instead of shutting them out.  (The Gradio queue
already runs render events one at a time, first come first served; the lock
covers the work that runs outside that queue group.)
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
    stamps: page timestamp of recent inputs, by the stream's input index, so
        a render can be matched to the snapshot it shows.
    """

    session_id: str
    recorder: Recorder
    state: Any = None
    last_used: float = field(default_factory=time.monotonic)
    stamps: OrderedDict = field(default_factory=OrderedDict)

    def remember_stamp(self, index: int, stamp: float) -> None:
        self.stamps[index] = stamp
        while len(self.stamps) > MAX_STAMPS:
            self.stamps.popitem(last=False)

    def close(self) -> None:
        self.state = None
        self.recorder.close()


class SessionRegistry:
    """Sessions by id, with idle eviction and a shared GPU lock."""

    def __init__(self, make_recorder: Callable[[], Recorder], idle_timeout: float = 1800.0,
                 clock: Callable[[], float] = time.monotonic):
        self._make_recorder = make_recorder
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.gpu_lock = threading.Lock()

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
