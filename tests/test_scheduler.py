"""The render scheduler: one worker thread, newest frame wins per session, tasks never dropped."""

from __future__ import annotations

import contextvars
import threading

import pytest

from ui.scheduler import RenderScheduler, SchedulerClosed, Superseded

TIMEOUT = 10


class Gate:
    """A frame function that blocks on demand, recording what it ran and on which thread."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.ran: list = []
        self.threads: set = set()

    def __call__(self, frame):
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.open.wait(TIMEOUT)
        if isinstance(frame, Exception):
            raise frame
        self.ran.append(frame)
        return f"render of {frame}"


@pytest.fixture()
def gate():
    return Gate()


@pytest.fixture()
def scheduler(gate):
    scheduler = RenderScheduler(gate)
    yield scheduler
    gate.open.set()
    scheduler.close()


def block_worker(scheduler, gate):
    """Occupy the worker with a frame of session "busy" until gate.open is set."""
    gate.open.clear()
    gate.entered.clear()
    job = scheduler.submit("busy", "blocker")
    assert gate.entered.wait(TIMEOUT)
    return job


def test_frames_render_on_one_worker_thread_with_their_timeline(scheduler, gate):
    jobs = [scheduler.submit(f"s{i}", i) for i in range(5)]
    assert [job.future.result(TIMEOUT) for job in jobs] == [f"render of {i}" for i in range(5)]
    assert gate.threads == {"sv2v-render"}
    assert all(job.started >= job.submitted and job.finished >= job.started for job in jobs)
    assert scheduler.stats().rendered == 5


def test_a_newer_frame_replaces_the_waiting_one_of_the_same_session(scheduler, gate):
    blocker = block_worker(scheduler, gate)
    first = scheduler.submit("a", "a1")
    second = scheduler.submit("a", "a2")
    other = scheduler.submit("b", "b1")
    with pytest.raises(Superseded):
        first.future.result(TIMEOUT)
    gate.open.set()
    assert second.future.result(TIMEOUT) == "render of a2"
    assert other.future.result(TIMEOUT) == "render of b1"
    blocker.future.result(TIMEOUT)
    assert "a1" not in gate.ran
    stats = scheduler.stats()
    assert (stats.submitted, stats.dropped, stats.rendered) == (4, 1, 3)


def test_each_tick_serves_every_waiting_session_once_in_arrival_order(scheduler, gate):
    block_worker(scheduler, gate)
    jobs = [scheduler.submit("b", "b1"), scheduler.submit("a", "a1"), scheduler.submit("b", "b2"),
            scheduler.submit("c", "c1")]
    gate.open.set()
    for job in jobs[1:]:
        job.future.result(TIMEOUT)
    # b keeps its place (it arrived first) with its newest frame; nobody gets two turns.
    assert gate.ran[1:] == ["b2", "a1", "c1"]


def test_tasks_are_never_dropped_and_run_before_the_next_frames(scheduler, gate):
    block_worker(scheduler, gate)
    order = []
    tasks = [scheduler.call(lambda i=i: order.append(f"task{i}") or i) for i in range(3)]
    frame = scheduler.submit("a", "a1")
    gate.open.set()
    frame.future.result(TIMEOUT)
    assert [task.result(TIMEOUT) for task in tasks] == [0, 1, 2]
    assert order == ["task0", "task1", "task2"]
    assert gate.ran[-1] == "a1"


def test_an_error_goes_to_its_own_frame_only(scheduler, gate):
    failing = scheduler.submit("a", ValueError("bad frame"))
    fine = scheduler.submit("b", "b1")
    with pytest.raises(ValueError, match="bad frame"):
        failing.future.result(TIMEOUT)
    assert fine.future.result(TIMEOUT) == "render of b1"
    assert scheduler.submit("a", "a2").future.result(TIMEOUT) == "render of a2"  # the worker lives on
    assert scheduler.stats().failed == 1


def test_work_runs_in_the_context_of_whoever_submitted_it(scheduler):
    request = contextvars.ContextVar("request", default=None)
    request.set("page 1")
    assert scheduler.call(request.get).result(TIMEOUT) == "page 1"


def test_cancel_drops_the_waiting_frame_of_a_closed_session(scheduler, gate):
    blocker = block_worker(scheduler, gate)
    waiting = scheduler.submit("a", "a1")
    assert scheduler.cancel("a") and not scheduler.cancel("a")
    gate.open.set()
    blocker.future.result(TIMEOUT)
    with pytest.raises(Superseded):
        waiting.future.result(TIMEOUT)
    assert "a1" not in gate.ran


def test_close_fails_waiting_work_and_refuses_new_work(gate):
    scheduler = RenderScheduler(gate)
    blocker = block_worker(scheduler, gate)
    waiting = scheduler.submit("a", "a1")
    task = scheduler.call(lambda: 1)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    gate.open.set()
    closer.join(TIMEOUT)
    blocker.future.result(TIMEOUT)  # the running frame finishes
    for future in (waiting.future, task):
        with pytest.raises(SchedulerClosed):
            future.result(TIMEOUT)
    with pytest.raises(SchedulerClosed):
        scheduler.submit("a", "a2")
