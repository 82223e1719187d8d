"""Per-visitor sessions: one recording and one set of settings per browser session.

A `SessionRegistry` belongs to one app instance (no module-level state).
Sessions are created lazily on a visitor's first use, keyed by Gradio's
session hash (the fast channel connects with the same hash, so both channels
share one stream, bank and recording), closed when the page unloads
(`close`) and evicted after `idle_timeout` seconds without use (checked on
every access and by the service's sweeper), so an abandoned tab does not
hold memory forever.

Admission.  At most `max_active` sessions render at once (None: no limit).
A session becomes active when it renders (`admit`) and stays active until it
closes, is evicted, or has been idle for `release_after` seconds
(`release_idle`: the service then moves its stream state off the GPU; its
next frame is admitted again and continues the stream where it was).  When
every place is taken, `admit` puts the session in a first-come first-served
line and raises `Busy` with the number of people ahead of it; a place that
frees goes to the first in line, not to whoever asks first.  A session in
line must keep asking (the page retries every second) or it leaves the line
after `LINE_SECONDS`.

A session's stream (feature bank, frames in flight) is not here: the
renderer owns it (ui.renderer), under the same id; `on_close` tells the
service which sessions the idle timeout closed, so it frees their streams.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .recording import Recorder

MAX_STAMPS = 64
# Snapshots a session keeps for a replay (ui.service): enough for a DyMe bank to store its
# first frame and merge once more (every 4 frames), so a bank setting shows what it does.
RECENT_SNAPSHOTS = 5
LINE_SECONDS = 10.0  # a waiting session that has not asked again for this long leaves the line


class Busy(RuntimeError):
    """Every place is taken: `ahead` people wait before this session for one of the `places`."""

    def __init__(self, ahead: int, places: int) -> None:
        people = "person" if ahead == 1 else "people"
        super().__init__(f"busy: {ahead} {people} ahead of you. The canvas renders for {places} artists at once; "
                         "you get in when one of them leaves")
        self.ahead = ahead
        self.places = places


@dataclass(frozen=True)
class Drawn:
    """A canvas frame as submitted: the picture and its control source, at the render size, and its
    page sequence number."""

    frame: Any
    control: Any
    seq: int


@dataclass
class Session:
    """What one visitor owns.

    recorder: every frame rendered for this visitor, for export.
    epoch: the epoch of the stream that rendered the visitor's last frame (a
        renderer owns the stream itself, ui.renderer); a new one means the
        stream was started afresh.
    config: the settings the page last reported (None until it did); the
        fast channel renders with these.
    compare: the page's compare view is on: every frame also renders on a
        second stream with the bank off (ui.service).
    recent: the newest canvas frames submitted (`Drawn`), newest last; the
        newest is re-rendered when a setting changes, after the others when
        the bank's settings changed (a replay, ui.service).
    rendered_with: the bank settings and compare flag of the last frame
        submitted (None: none yet).
    sources: (page stamp, page seq) of recent inputs, by the stream's input
        index, so a render can be matched to the snapshot it shows.
    feed: the pop-out view's feed of this session's renders (ui.popout;
        None until the page asks for its link); closed with the session.
    """

    session_id: str
    recorder: Recorder
    epoch: str | None = None
    config: Any = None
    compare: bool = False
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_SNAPSHOTS))
    rendered_with: Any = None
    last_used: float = field(default_factory=time.monotonic)
    holds: int = 0  # operations under way (an export) that keep the session from being freed
    sources: OrderedDict = field(default_factory=OrderedDict)
    feed: Any = None

    def remember_source(self, index: int, stamp: float, seq: int) -> None:
        self.sources[index] = (stamp, seq)
        while len(self.sources) > MAX_STAMPS:
            self.sources.popitem(last=False)

    @property
    def latest(self) -> Drawn | None:
        """The newest canvas frame submitted (None: nothing drawn yet)."""
        return self.recent[-1] if self.recent else None

    def close(self) -> None:
        self.recent.clear()
        if self.feed is not None:
            self.feed.close()
        self.recorder.close()


class SessionRegistry:
    """Sessions by id, with admission (a limit on active sessions), idle release and idle eviction."""

    def __init__(self, make_recorder: Callable[[], Recorder], idle_timeout: float = 1800.0,
                 clock: Callable[[], float] = time.monotonic, *, max_active: int | None = None,
                 release_after: float = 30.0):
        if max_active is not None and max_active < 1:
            raise ValueError(f"the maximum of sessions must be at least 1, got {max_active}")
        self._make_recorder = make_recorder
        self.idle_timeout = idle_timeout
        self.max_active = max_active
        self.release_after = release_after
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._active: set[str] = set()
        self._line: OrderedDict[str, float] = OrderedDict()  # waiting session -> when it last asked
        self._lock = threading.Lock()
        # Told the id of every session closed here (the service frees its stream).
        self.on_close: Callable[[str], None] = lambda session_id: None

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

    @contextmanager
    def hold(self, session_id: str | None) -> Iterator[Session]:
        """The visitor's session, never freed for idleness while the block runs (an export of a
        long recording may take longer than the idle timeout)."""
        session = self.get(session_id)
        with self._lock:
            session.holds += 1
        try:
            yield session
        finally:
            with self._lock:
                session.holds -= 1
                session.last_used = self._clock()

    def admit(self, session_id: str | None) -> Session:
        """The visitor's session, active (allowed to render); `Busy` when every place is taken."""
        session = self.get(session_id)
        with self._lock:
            if session_id in self._active:
                return session
            now = self._clock()
            for waiting, asked in list(self._line.items()):
                if now - asked > LINE_SECONDS:
                    del self._line[waiting]
            self._line[session_id] = now  # a newcomer joins the back; one already in line keeps its place
            ahead = list(self._line).index(session_id)
            free = len(self._line) if self.max_active is None else self.max_active - len(self._active)
            if ahead >= free:
                raise Busy(ahead, self.max_active)
            del self._line[session_id]
            self._active.add(session_id)
            return session

    def active(self) -> int:
        """Sessions admitted now."""
        with self._lock:
            return len(self._active)

    def waiting(self) -> int:
        """Sessions in line for a place."""
        with self._lock:
            return len(self._line)

    def release_idle(self) -> list[Session]:
        """Active sessions idle for longer than `release_after`: no longer active (their place is
        free); the caller moves their state off the GPU."""
        now = self._clock()
        with self._lock:
            idle = [self._sessions[sid] for sid in self._active
                    if sid in self._sessions and now - self._sessions[sid].last_used > self.release_after]
            for session in idle:
                self._active.discard(session.session_id)
            return idle

    def close(self, session_id: str | None) -> None:
        """Free a session (the page was closed); unknown ids are ignored."""
        with self._lock:
            session = self._sessions.pop(session_id, None) if session_id else None
            self._active.discard(session_id)
            self._line.pop(session_id, None)
        if session is not None:
            session.close()

    def evict_idle(self) -> list[str]:
        """Close sessions unused for longer than `idle_timeout`; their ids."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items()
                     if now - s.last_used > self.idle_timeout and s.holds == 0]
            sessions = [self._sessions.pop(sid) for sid in stale]
            self._active.difference_update(stale)
        for session in sessions:
            session.close()
            self.on_close(session.session_id)
        return stale

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._active.clear()
            self._line.clear()
        for session in sessions:
            session.close()
