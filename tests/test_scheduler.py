"""The render scheduler: one worker thread, newest frame wins per session, batches with fair turns,
tasks never dropped."""

from __future__ import annotations

import contextvars
import threading

import pytest

from ui.renderer import RendererClosed, Superseded
from ui.scheduler import RenderScheduler

TIMEOUT = 10


class Gate:
    """A batch function that blocks on demand, recording what it ran, in which batches, on which thread.
    A frame that is an Exception fails (only itself)."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.ran: list = []
        self.batches: list = []
        self.threads: set = set()

    def __call__(self, frames):
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.open.wait(TIMEOUT)
        self.batches.append(list(frames))
        self.ran.extend(frame for frame in frames if not isinstance(frame, Exception))
        return [frame if isinstance(frame, Exception) else f"render of {frame}" for frame in frames]


@pytest.fixture()
def gate():
    return Gate()


@pytest.fixture()
def scheduler(gate):
    scheduler = RenderScheduler(gate, max_batch=3)
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
    stats = scheduler.stats()
    assert stats.rendered == 5 and sum(size * count for size, count in stats.batches.items()) == 5


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


def test_each_tick_renders_every_waiting_session_once_in_one_batch_in_arrival_order(scheduler, gate):
    block_worker(scheduler, gate)
    jobs = [scheduler.submit("b", "b1"), scheduler.submit("a", "a1"), scheduler.submit("b", "b2"),
            scheduler.submit("c", "c1")]
    gate.open.set()
    for job in jobs[1:]:
        job.future.result(TIMEOUT)
    # b keeps its place (it arrived first) with its newest frame; nobody gets two turns.
    assert gate.batches[1:] == [["b2", "a1", "c1"]]
    assert scheduler.stats().batches == {1: 1, 3: 1}
    assert len({job.started for job in jobs[1:]}) == 1  # a batch's frames start together


def test_sessions_beyond_the_batch_size_take_turns_and_fast_ones_get_no_extra_turns():
    """max_batch 3, five sessions always waiting; "fast" sends a new frame before every tick."""
    batches, entered, permit = [], threading.Semaphore(0), threading.Semaphore(0)

    def run_batch(frames):  # one batch per permit
        batches.append([frame.rstrip("0123456789x") for frame in frames])
        entered.release()
        assert permit.acquire(timeout=TIMEOUT)
        return frames

    scheduler = RenderScheduler(run_batch, max_batch=3)
    try:
        scheduler.submit("blocker", "blocker")
        assert entered.acquire(timeout=TIMEOUT)
        for key in ("fast", "a", "b", "c", "d"):
            scheduler.submit(key, f"{key}0")
        for tick in range(1, 6):
            permit.release()  # the running batch finishes; the worker takes the next one and waits
            assert entered.acquire(timeout=TIMEOUT)
            for key in batches[-1]:  # whoever is being served draws again at once
                scheduler.submit(key, f"{key}{tick}")
            scheduler.submit("fast", f"fast{tick}x")  # and "fast" draws again and again
    finally:
        permit.release()
        scheduler.close()
    served = batches[1:]
    assert all(len(batch) == 3 and len(set(batch)) == 3 for batch in served), served
    counts = {key: sum(batch.count(key) for batch in served) for key in ("fast", "a", "b", "c", "d")}
    assert counts == {"fast": 3, "a": 3, "b": 3, "c": 3, "d": 3}, (counts, served)


def test_a_tick_waits_briefly_for_the_sessions_that_drew_in_the_last_second():
    """a, b, c were served together; a's next frame comes first, b's and c's 50 ms later: still one batch."""
    batches = []
    scheduler = RenderScheduler(lambda frames: batches.append(frames) or frames, max_batch=4, gather=1.0)
    try:
        held = threading.Event()
        holding = scheduler.call(lambda: held.wait(TIMEOUT))  # so a, b and c wait together
        first = [scheduler.submit(key, f"{key}1") for key in "abc"]
        held.set()
        holding.result(TIMEOUT)
        for job in first:
            job.future.result(TIMEOUT)
        later = [scheduler.submit("a", "a2")]
        threading.Event().wait(0.05)
        later += [scheduler.submit("b", "b2"), scheduler.submit("c", "c2")]
        for job in later:
            job.future.result(TIMEOUT)
    finally:
        scheduler.close()
    assert batches == [["a1", "b1", "c1"], ["a2", "b2", "c2"]]


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
    block_worker(scheduler, gate)
    failing = scheduler.submit("a", ValueError("bad frame"))
    fine = scheduler.submit("b", "b1")
    gate.open.set()
    with pytest.raises(ValueError, match="bad frame"):
        failing.future.result(TIMEOUT)
    assert fine.future.result(TIMEOUT) == "render of b1"
    assert gate.batches[1] == [failing.payload, "b1"]  # in the same batch
    assert scheduler.submit("a", "a2").future.result(TIMEOUT) == "render of a2"  # the worker lives on
    assert scheduler.stats().failed == 1


def test_a_batch_function_that_raises_fails_its_frames_and_the_worker_lives_on():
    calls = []

    def run_batch(frames):
        calls.append(frames)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [f"render of {frame}" for frame in frames]

    scheduler = RenderScheduler(run_batch)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            scheduler.submit("a", "a1").future.result(TIMEOUT)
        assert scheduler.submit("a", "a2").future.result(TIMEOUT) == "render of a2"
    finally:
        scheduler.close()


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
        with pytest.raises(RendererClosed):
            future.result(TIMEOUT)
    with pytest.raises(RendererClosed):
        scheduler.submit("a", "a2")
