"""A stand-in for Hugging Face's `spaces` package, for tests only (put tests/fake_spaces on sys.path).

`GPU` behaves as ZeroGPU's does where the app can tell: the decorated
function runs in another process, a worker forked at the first call that
stays for the next calls; its arguments and results are pickled, so
changes it makes to its arguments never come back; an exception it raises
is raised in the caller.  Unlike the real one it acts whatever
SPACES_ZERO_GPU says (the app decides whether to use it, ui.gpu).

For tests: `calls` counts the calls, `durations` the seconds each asked
for, `sent` and `received` the pickled bytes each way; `replace_worker()`
lets the worker go, so the next call meets a fresh one (a lost worker), as
does every call after FAKE_SPACES_REPLACE_EVERY calls when that is set.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading

DEFAULT_DURATION = 60


STOP = b"stop"


def _serve(fn, connection) -> None:
    """The worker: run `fn` on each pickled (args, kwargs) received, send back the pickled outcome;
    end at STOP or when the caller is gone."""
    while True:
        try:
            message = connection.recv_bytes()
        except EOFError:
            return
        if message == STOP:
            return
        args, kwargs = pickle.loads(message)
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as error:  # a process boundary: the caller raises it
            outcome = (False, error)
        connection.send_bytes(pickle.dumps(outcome))


class GPUFunction:
    def __init__(self, fn, duration) -> None:
        self.fn = fn
        self.duration = duration
        self.calls = 0
        self.durations: list[float] = []
        self.sent: list[int] = []
        self.received: list[int] = []
        self.workers_started = 0
        self._worker = None
        self._lock = threading.Lock()
        self._replace_every = int(os.environ.get("FAKE_SPACES_REPLACE_EVERY", "0") or 0)

    def __call__(self, *args, **kwargs):
        with self._lock:
            duration = self.duration(*args, **kwargs) if callable(self.duration) else self.duration
            if not isinstance(duration, (int, float)) or duration <= 0:
                raise ValueError(f"a GPU duration must be a positive number of seconds, got {duration!r}")
            self.durations.append(duration)
            if self._replace_every and self.calls and self.calls % self._replace_every == 0:
                self.replace_worker()
            self.calls += 1
            connection = self._connection()
            message = pickle.dumps((args, kwargs))
            self.sent.append(len(message))
            connection.send_bytes(message)
            reply = connection.recv_bytes()
            self.received.append(len(reply))
        ok, value = pickle.loads(reply)
        if not ok:
            raise value
        return value

    def _connection(self):
        if self._worker is None:
            context = multiprocessing.get_context("fork")
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(self.fn, theirs), daemon=True)
            process.start()
            theirs.close()
            self._worker = (process, ours)
            self.workers_started += 1
        return self._worker[1]

    def replace_worker(self) -> None:
        """Let the worker go: the next call forks a fresh one."""
        if self._worker is not None:
            process, connection = self._worker
            self._worker = None
            try:
                connection.send_bytes(STOP)
            except OSError:  # the worker is gone already
                pass
            connection.close()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def GPU(fn=None, *, duration=DEFAULT_DURATION):
    """`spaces.GPU` or `spaces.GPU(duration=...)`: `fn` run in a worker process (see the module docstring)."""
    if fn is None:
        return lambda fn: GPUFunction(fn, duration)
    return GPUFunction(fn, duration)
