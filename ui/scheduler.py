"""The render scheduler: the one thread that runs the model, for every channel.

Every piece of model work in the app, from every channel (the fast WebSocket
channel, the Gradio events, the `/render` API, webcam frames, video
translation, bank resets), runs on the scheduler's single worker thread, so
the engine is never called from two threads and nothing else needs a lock
around the GPU.

Two kinds of work:

- **Frames** (`submit(key, frame)`): droppable.  Each key (a session) has a
  mailbox holding at most one waiting frame; a newer frame replaces it and
  the replaced one's future fails with `Superseded` (counted in
  `stats().dropped`).  A slow model so gets fewer, fresher frames instead of
  a backlog.  Each *tick* the worker takes the newest waiting frame of every
  key, in the order the keys' frames arrived, and runs them one after the
  other through the `run_frame` function given to the constructor; no key
  gets a second frame before every other waiting key got one.  (Taking every key's newest frame per tick is what
  lets a later version render several sessions in one batched model call.)
- **Tasks** (`call(fn)`): never dropped, run first-in first-out before the
  next tick's frames: bank resets, video frames, warm-up.

Work runs in the submitter's `contextvars` context (copied at submit time),
so a function that looks up the current Gradio request — `spaces.GPU` on a
ZeroGPU Space does — sees the request that asked for it.

Each `Job` records when it was submitted, started and finished, so callers
can report the wait in the mailbox and the model time separately.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Superseded(Exception):
    """A newer frame of the same session replaced this one before it ran."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed (the app is shutting down)."""


@dataclass
class Job:
    """One piece of work and its timeline (time.monotonic seconds)."""

    key: str | None
    payload: Any
    future: Future = field(default_factory=Future)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None

    @property
    def wait_seconds(self) -> float:
        """Time spent waiting for the worker (0 until it started)."""
        return 0.0 if self.started is None else self.started - self.submitted

    @property
    def run_seconds(self) -> float:
        """Time the worker spent on it (0 until it finished)."""
        return 0.0 if self.started is None or self.finished is None else self.finished - self.started


@dataclass(frozen=True)
class SchedulerStats:
    """Counters since the scheduler started (busy: seconds the worker ran work)."""

    submitted: int
    rendered: int
    dropped: int
    failed: int
    tasks: int
    busy_seconds: float


class RenderScheduler:
    """A single worker thread with one newest-wins mailbox per session."""

    def __init__(self, run_frame: Callable[[Any], Any], *, name: str = "sv2v-render") -> None:
        self._run_frame = run_frame
        self._cond = threading.Condition()
        self._mailboxes: OrderedDict[str, Job] = OrderedDict()  # key -> waiting frame, in turn order
        self._tasks: deque[Job] = deque()
        self._closed = False
        self._counts = dict(submitted=0, rendered=0, dropped=0, failed=0, tasks=0)
        self._busy = 0.0
        self._running_since: float | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- submitting ---------------------------------------------------------------
    def submit(self, key: str, frame: Any) -> Job:
        """Queue `frame` for session `key`, replacing its waiting frame, if any."""
        job = Job(key, frame)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the app is shutting down")
            replaced = self._mailboxes.get(key)
            self._mailboxes[key] = job  # an existing key keeps its place in the turn order
            self._counts["submitted"] += 1
            if replaced is not None:
                self._counts["dropped"] += 1
            self._cond.notify()
        if replaced is not None:
            replaced.future.set_exception(Superseded(f"a newer frame of session {key} replaced this one"))
        return job

    def call(self, fn: Callable[[], T]) -> Future:
        """Run `fn()` on the worker (never dropped, first in first out); its future."""
        job = Job(None, fn)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the app is shutting down")
            self._tasks.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, key: str) -> bool:
        """Drop the waiting frame of `key` (its page went away); True if there was one."""
        with self._cond:
            job = self._mailboxes.pop(key, None)
            if job is not None:
                self._counts["dropped"] += 1
        if job is None:
            return False
        job.future.set_exception(Superseded(f"session {key} closed before this frame ran"))
        return True

    def waiting(self) -> int:
        """Frames and tasks waiting for the worker."""
        with self._cond:
            return len(self._mailboxes) + len(self._tasks)

    def stats(self) -> SchedulerStats:
        """The counters now; busy time includes the part of the running job done so far."""
        with self._cond:
            running = 0.0 if self._running_since is None else time.monotonic() - self._running_since
            return SchedulerStats(busy_seconds=self._busy + running, **self._counts)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what is waiting, and let the worker finish its current job."""
        with self._cond:
            self._closed = True
            waiting = list(self._tasks) + list(self._mailboxes.values())
            self._tasks.clear()
            self._mailboxes.clear()
            self._cond.notify_all()
        for job in waiting:
            job.future.set_exception(SchedulerClosed("the app is shutting down"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------
    def _next_tick(self) -> tuple[list[Job], list[Job]] | None:
        """Wait for work; the waiting tasks and the newest frame of every session."""
        with self._cond:
            while not self._closed and not self._tasks and not self._mailboxes:
                self._cond.wait()
            if self._closed:
                return None
            tasks = list(self._tasks)
            self._tasks.clear()
            frames = list(self._mailboxes.values())
            self._mailboxes.clear()
            return tasks, frames

    def _work(self) -> None:
        while (tick := self._next_tick()) is not None:
            tasks, frames = tick
            for job in tasks:
                self._run(job, job.payload, "tasks")
            for job in frames:
                self._run(job, lambda job=job: self._run_frame(job.payload), "rendered")

    def _run(self, job: Job, fn: Callable[[], Any], counter: str) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        job.started = time.monotonic()
        with self._cond:
            self._running_since = job.started
        try:
            result = job.context.run(fn)
        except Exception as error:  # noqa: BLE001 - not swallowed: it goes to whoever waits on the job
            job.finished = time.monotonic()
            self._account(job, "failed")
            job.future.set_exception(error)
        else:
            job.finished = time.monotonic()
            self._account(job, counter)
            job.future.set_result(result)

    def _account(self, job: Job, counter: str) -> None:
        with self._cond:
            self._counts[counter] += 1
            self._busy += job.run_seconds
            self._running_since = None
