"""The render scheduler: the one thread that runs the model, for every channel.

Every piece of model work in the app, from every channel (the fast WebSocket
channel, the Gradio events, the `/render` API, webcam frames, video
translation, bank resets), runs on the scheduler's single worker thread, so
the engine is never called from two threads and nothing else needs a lock
around the GPU.

Two kinds of work:

- **Frames** (`submit(key, frame)`): droppable.  Newest wins (ui.mailbox):
  each key (a session) has at most one waiting frame; a newer frame
  replaces it and the replaced one's future fails with `Superseded`
  (counted in `stats().dropped`).  A slow model so gets fewer, fresher frames instead of
  a backlog.  Each *tick* the worker takes the newest waiting frame of up
  to `max_batch` keys and hands them, as one list, to the `run_batch`
  function given to the constructor, which renders them together (one
  batched model call per group of compatible streams) and returns one
  result per frame, in order: a value, or the exception that frame alone
  raised (one bad frame fails only its own job).
- **Tasks** (`call(fn)`): never dropped, run first-in first-out before the
  next tick's frames: bank resets, video frames, warm-up, memory release.

Fair turns.  The keys wait in the order they first asked for a turn: a key
that was served goes to the back of the line when its next frame comes, a
key whose newer frame replaces a waiting one keeps its place, and a tick
serves the first `max_batch` keys of the line.  So each key has at most one
frame per tick whatever its drawing rate, and when more keys wait than a
tick takes, those left out are first in the next tick: nobody starves, and
a page that sends fast gets no more turns than one that sends slowly.

Gathering.  A tick that finds fewer frames waiting than the sessions that
were served in the last second waits up to `gather` seconds (10 ms) for
theirs: under CPU load their next snapshots arrive a few ms after a batch
ends, and a tick that starts without them renders a small batch, which ends
sooner, which leaves even less time for the rest: batches shrink and
throughput falls (see docs/performance.md).  A session that stopped drawing
costs at most one such wait per tick, for a second.

Work runs in the submitter's `contextvars` context (copied at submit time),
so a function that looks up the current Gradio request — `spaces.GPU` on a
ZeroGPU Space does — sees the request that asked for it; a batch runs in
the context of its first frame.

Each `Job` records when it was submitted, started and finished (a batch's
frames start and finish together), so callers can report the wait in the
mailbox and the model time separately; `stats().batches` counts the ticks
by batch size.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .mailbox import Mailbox, supersede
from .renderer import RendererClosed, RenderStats

T = TypeVar("T")
GATHER_SECONDS = 0.010
RECENT_SECONDS = 1.0
CLOSED = "the app is shutting down"


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


class RenderScheduler:
    """A single worker thread with one newest-wins mailbox per session, serving them in batches.

    run_batch: frames -> one result or Exception per frame, in order.
    max_batch: at most this many frames per tick.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], *, max_batch: int = 8,
                 gather: float = GATHER_SECONDS, name: str = "sv2v-render") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.gather = gather
        self._served: dict[str, float] = {}  # key -> when its last frame was taken
        self._cond = threading.Condition()
        self._mailbox: Mailbox[Job] = Mailbox()  # key -> waiting frame, in turn order
        self._tasks: deque[Job] = deque()
        self._closed = False
        self._counts = dict(submitted=0, rendered=0, dropped=0, failed=0, tasks=0)
        self._batches: Counter[int] = Counter()
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
                raise RendererClosed(CLOSED)
            replaced = self._mailbox.put(key, job)
            self._counts["submitted"] += 1
            if replaced is not None:
                self._counts["dropped"] += 1
            self._cond.notify()
        supersede([replaced], f"a newer frame of session {key} replaced this one")
        return job

    def call(self, fn: Callable[[], T]) -> Future:
        """Run `fn()` on the worker (never dropped, first in first out); its future."""
        job = Job(None, fn)
        with self._cond:
            if self._closed:
                raise RendererClosed(CLOSED)
            self._tasks.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, key: str) -> bool:
        """Drop the waiting frame of `key` (its page went away); True if there was one."""
        with self._cond:
            job = self._mailbox.take(key)
            self._served.pop(key, None)  # gone: no frame of it to wait for
            if job is not None:
                self._counts["dropped"] += 1
        supersede([job], f"session {key} closed before this frame ran")
        return job is not None

    def waiting(self) -> int:
        """Frames and tasks waiting for the worker."""
        with self._cond:
            return len(self._mailbox) + len(self._tasks)

    def stats(self) -> RenderStats:
        """The counters now; busy time includes the part of the running job done so far."""
        with self._cond:
            running = 0.0 if self._running_since is None else time.monotonic() - self._running_since
            return RenderStats(busy_seconds=self._busy + running, batches=dict(sorted(self._batches.items())),
                                  **self._counts)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what is waiting, and let the worker finish its current job."""
        with self._cond:
            self._closed = True
            waiting = list(self._tasks) + self._mailbox.clear()
            self._tasks.clear()
            self._cond.notify_all()
        for job in waiting:
            job.future.set_exception(RendererClosed(CLOSED))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------
    def _next_tick(self) -> tuple[list[Job], list[Job]] | None:
        """Wait for work; the waiting tasks and the newest frames of the first `max_batch` sessions in line."""
        with self._cond:
            while not self._closed and not self._tasks and not self._mailbox:
                self._cond.wait()
            if self._closed:
                return None
            if not self._tasks:
                self._gather()
            if self._closed:
                return None
            tasks = list(self._tasks)
            self._tasks.clear()
            now = time.monotonic()
            frames = self._mailbox.take_turns(self.max_batch)  # served: back of the line next time
            for key, _ in frames:
                self._served[key] = now
            return tasks, [job for _, job in frames]

    def _gather(self) -> None:
        """Wait (up to `gather`) for the frames of sessions that drew in the last second (lock held)."""
        now = time.monotonic()
        for key in [key for key, served in self._served.items() if now - served > RECENT_SECONDS]:
            del self._served[key]
        expected = min(self.max_batch, len(self._served.keys() | self._mailbox.keys()))
        deadline = now + self.gather
        while len(self._mailbox) < expected and not self._tasks and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _work(self) -> None:
        while (tick := self._next_tick()) is not None:
            tasks, frames = tick
            for job in tasks:
                self._run_task(job)
            if frames:
                self._run_frames(frames)

    def _start(self, jobs: list[Job]) -> list[Job]:
        """Mark `jobs` running (those whose future was not cancelled) and return them."""
        running = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        started = time.monotonic()
        for job in running:
            job.started = started
        with self._cond:
            self._running_since = started
        return running

    def _run_task(self, job: Job) -> None:
        if not self._start([job]):
            return
        try:
            result = job.context.run(job.payload)
        except Exception as error:  # noqa: BLE001 - not swallowed: it goes to whoever waits on the job
            self._finish([(job, error)])
        else:
            self._finish([(job, result)], counter="tasks")

    def _run_frames(self, jobs: list[Job]) -> None:
        jobs = self._start(jobs)
        if not jobs:
            return
        try:
            results = jobs[0].context.run(self._run_batch, [job.payload for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} frames")
        except Exception as error:  # noqa: BLE001 - not swallowed: every frame of the batch gets it
            results = [error] * len(jobs)
        with self._cond:
            self._batches[len(jobs)] += 1
        self._finish(list(zip(jobs, results)), counter="rendered")

    def _finish(self, outcomes: list[tuple[Job, Any]], counter: str = "failed") -> None:
        """Account for finished jobs, then hand each its result (an Exception instance fails it)."""
        finished = time.monotonic()
        with self._cond:
            for job, result in outcomes:
                job.finished = finished
                self._counts["failed" if isinstance(result, Exception) else counter] += 1
            self._busy += finished - outcomes[0][0].started
            self._running_since = None
        for job, result in outcomes:
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
