"""The Ray Serve back end on a local cluster: pinning, spread, busy state, failover.

Two CanvasWorker replicas of the built-in model on the CPU, with fake
resources (`ray.init(num_cpus=4, num_gpus=2)`, tests/conftest.py), each
taking RAY_SESSIONS_PER_REPLICA sessions.  Skipped when ray is not installed.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import wait

import numpy as np
import pytest

from tests.conftest import RAY_REPLICAS, RAY_SESSIONS_PER_REPLICA
from tests.test_batching import assert_rounding_close
from tests.test_renderer import LATENCY, TIMEOUT, frames
from ui.local_renderer import local_renderer
from ui.renderer import RendererBusy, StepRequest

ray = pytest.importorskip("ray", reason="ray is optional: pip install -r requirements-ray.txt")

FULL = RAY_REPLICAS * RAY_SESSIONS_PER_REPLICA


def step_all(renderer, inputs: dict[str, np.ndarray]) -> dict:
    """One frame of every session at once; each session's reply."""
    futures = {session_id: renderer.step(session_id, StepRequest(frame, LATENCY)) for session_id, frame in inputs.items()}
    wait(futures.values(), TIMEOUT)
    return {session_id: future.result() for session_id, future in futures.items()}


def wait_for_replicas(renderer, count: int, gone: str, seconds: float = 180.0) -> None:
    """Wait until `count` replicas answer and `gone` (a killed one) is not among them.

    (Serve's status still counts a killed replica as running until its controller notices.)"""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answering = {stats["replica"] for stats in renderer.replica_stats(count, attempts=16)}
        if len(answering) == count and gone not in answering:
            return
        time.sleep(1.0)
    raise AssertionError(f"Serve did not bring back {count} replicas in {seconds:.0f} s")


def test_sessions_stay_on_one_replica_spread_over_both_and_render_as_in_process(ray_renderer, engine):
    sessions = [f"pin-{index}" for index in range(FULL)]
    inputs = {session_id: frames(50, seed) for seed, session_id in enumerate(sessions)}
    try:
        served_before = sum(stats["served"] for stats in ray_renderer.replica_stats(RAY_REPLICAS))
        workers: dict[str, Counter] = defaultdict(Counter)
        replies: dict[str, list] = defaultdict(list)
        for index in range(50):
            for session_id, reply in step_all(ray_renderer, {s: inputs[s][index] for s in sessions}).items():
                workers[session_id][reply.worker] += 1
                replies[session_id].append(reply)

        assert all(len(counts) == 1 for counts in workers.values()), dict(workers)  # pinned: one replica each
        owners = Counter(next(iter(counts)) for counts in workers.values())
        assert len(owners) == RAY_REPLICAS and set(owners.values()) == {RAY_SESSIONS_PER_REPLICA}  # spread
        stats = ray_renderer.replica_stats(RAY_REPLICAS)
        assert sum(s["served"] for s in stats) - served_before == 50 * FULL  # each frame rendered once, nowhere else
        assert any(size > 1 for s in stats for size in s["batches"])  # a replica batches its sessions' frames
        assert all(len({reply.epoch for reply in replies[s]}) == 1 for s in sessions)

        local = local_renderer(engine)
        try:
            for session_id in sessions[:3]:  # the in-process renderer, same inputs: the same pictures
                for frame, reply in zip(inputs[session_id], replies[session_id]):
                    expected = local.step(session_id, StepRequest(frame, LATENCY)).result(TIMEOUT)
                    # a replica batches its sessions' frames: equal to within rounding (tests/test_batching.py)
                    assert_rounding_close(reply.image, expected.image, (session_id, reply.input_index))
        finally:
            local.shutdown()

        # The cluster is full: a newcomer is told so, and nobody is evicted for it.
        with pytest.raises(RendererBusy):
            ray_renderer.open("pin-newcomer")
        after = step_all(ray_renderer, {s: inputs[s][0] for s in sessions})
        assert all(after[s].epoch == replies[s][0].epoch and after[s].input_index == 50 for s in sessions)
        # A leaving session frees its slot and its state: the newcomer gets its room.
        leaving = sessions[0]
        ray_renderer.close(leaving)
        assert sorted(s["sessions"] for s in ray_renderer.replica_stats(RAY_REPLICAS)) == [RAY_SESSIONS_PER_REPLICA - 1,
                                                                                 RAY_SESSIONS_PER_REPLICA]
        ray_renderer.open("pin-newcomer")
        newcomer = step_all(ray_renderer, {"pin-newcomer": inputs[leaving][0]})["pin-newcomer"]
        assert newcomer.worker == next(iter(workers[leaving]))
    finally:
        for session_id in sessions + ["pin-newcomer"]:
            ray_renderer.close(session_id)
    assert [s["sessions"] for s in ray_renderer.replica_stats(RAY_REPLICAS)] == [0] * RAY_REPLICAS


def test_the_video_tab_translates_through_the_replicas(ray_renderer, tmp_path):
    from sv2v_core.video import probe_video, read_video, write_video
    from ui.ray_renderer import RayRenderer
    from ui.recording import Recorder
    from ui.service import CanvasService
    from ui.sessions import SessionRegistry

    source = tmp_path / "in.mp4"
    write_video(source, [np.full((72, 128, 3), (30 * i, 120, 200), np.uint8) for i in range(6)], fps=12)
    base = LATENCY.replace(width=128, height=128)
    service = CanvasService(None, SessionRegistry(Recorder), base, renderer=RayRenderer(ray_renderer.handle))
    try:
        done = []
        out = service.translate_video(str(source), base, tmp_path / "out.mp4", lambda d, t: done.append(d))
        info = probe_video(out)
        assert (info.frame_count, info.width, info.height) == (6, 128, 64) and done[-1] == 6  # aspect kept
        first = next(read_video(out)[0])
        assert first.std() > 1  # rendered pictures, not an empty file
        assert service.renderer.sessions() == 0  # its session of its own is closed
        assert sum(stats["sessions"] for stats in ray_renderer.replica_stats(RAY_REPLICAS)) == 0
    finally:
        service.close()


def test_a_killed_replica_s_sessions_warm_start_on_the_other_and_the_rest_never_notice(ray_renderer, engine):
    """Two sessions through the renderer, two through the app's service (its own client of the
    same deployment): kill the replica of the service's first session while every session has
    a frame in flight."""
    from ui.ray_renderer import APP_NAME, RayRenderer
    from ui.recording import Recorder
    from ui.service import CanvasService
    from ui.sessions import SessionRegistry

    service = CanvasService(None, SessionRegistry(Recorder), LATENCY, renderer=RayRenderer(ray_renderer.handle))
    direct, through_app = ["kill-0", "kill-1"], ["app-0", "app-1"]
    inputs = {session_id: frames(9, 20 + seed) for seed, session_id in enumerate(direct + through_app)}
    history: dict[str, list] = defaultdict(list)
    rendered: dict[str, list] = defaultdict(list)

    def round_of(index: int) -> tuple[dict, dict]:
        futures = {s: ray_renderer.step(s, StepRequest(inputs[s][index], LATENCY)) for s in direct}
        tickets = {s: service.submit(s, inputs[s][index], LATENCY, seq=index) for s in through_app}
        return futures, tickets

    def collect(futures: dict, tickets: dict) -> None:
        wait([*futures.values(), *(ticket.future for ticket in tickets.values())], TIMEOUT)
        for session_id, future in futures.items():
            history[session_id].append(future.result())  # no frame is lost: every one got its render
        for session_id, ticket in tickets.items():
            rendered[session_id].append(ticket.future.result())

    victim = None
    try:
        for index in range(5):
            collect(*round_of(index))
        owner = {s: history[s][-1].worker for s in direct} | {s: service.renderer.owner(s) for s in through_app}
        victim = owner["app-0"]
        assert sorted(Counter(owner.values()).values()) == [2, 2]  # spread
        moved = [s for s in direct + through_app if owner[s] == victim]
        stayed = [s for s in direct + through_app if owner[s] != victim]
        survivor = owner[stayed[0]]

        in_flight = round_of(5)  # kill the victim while a frame of every session is in flight
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#CanvasWorker#{victim}", namespace="serve"),
                 no_restart=True)
        collect(*in_flight)
        for index in range(6, 9):
            collect(*round_of(index))

        for session_id in [s for s in direct if s in stayed]:  # same replica, same stream, as if nothing happened
            got = history[session_id]
            assert {reply.worker for reply in got} == {survivor}
            assert len({reply.epoch for reply in got}) == 1 and [r.input_index for r in got] == list(range(9))
        for session_id in [s for s in direct if s in moved]:
            before, after = history[session_id][:5], history[session_id][5:]
            assert {reply.worker for reply in after} == {survivor}
            assert len({reply.epoch for reply in after}) == 1 and after[0].epoch != before[0].epoch  # a new epoch
            assert [reply.input_index for reply in after] == [0, 1, 2, 3]  # warm-started from the frame it lost
            local = local_renderer(engine)
            try:  # the restarted stream renders as a fresh stream started at that frame does
                for frame, reply in zip(inputs[session_id][5:], after):
                    expected = local.step(session_id, StepRequest(frame, LATENCY)).result(TIMEOUT)
                    # a replica batches its sessions' frames: equal to within rounding (tests/test_batching.py)
                assert_rounding_close(reply.image, expected.image, (session_id, reply.input_index))
            finally:
                local.shutdown()
        for session_id in through_app:  # the app: told once, for the moved session only; every frame recorded
            flags = [r.restarted for r in rendered[session_id]]
            assert flags == ([False] * 5 + [True] + [False] * 3 if session_id in moved else [False] * 9)
            assert [r.seq for r in rendered[session_id]] == list(range(9))
            assert service.recorded(session_id) == 9
        assert service.renderer.owner("app-0") == survivor
    finally:
        for session_id in direct:
            ray_renderer.close(session_id)
        service.close()
        if victim is not None:
            wait_for_replicas(ray_renderer, RAY_REPLICAS, victim)  # Serve replaces it; later tests get two again
