"""Faults a server meets, injected (bench.faults), through the app's own render path.

For each fault (an error in one session's UNet call, once or every Nth
frame; out of GPU memory above a batch size; a stalled call; a device
fault; a client dropped mid-render) the faulty session gets one clear
message, the others keep their renders, unchanged (the echo engine's
render is the frame itself) and in order, and every recording keeps one
frame per render its page received: no frame lost, none counted twice
(the streams' input counts say so too).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image

from bench.echo import EchoEngine
from bench.faults import INJECTED, Faults, FaultyEngine
from tests.test_many_users import Held, make_service
from ui.renderer import DeviceFault, RendererClosed

TIMEOUT = 30
SIZE = 64
SESSIONS = ["a", "b", "FAULTY", "c"]


def colour(session: int, tick: int) -> np.ndarray:
    """A frame whose colour says whose it is and which tick sent it."""
    return np.full((SIZE, SIZE, 3), (40 * session + 10, 7 * tick + 5, 100), np.uint8)


class Run:
    """Sessions drawing on a service around a FaultyEngine, one frame each per tick (all in one batch)."""

    def __init__(self, faults: Faults, *, sessions=SESSIONS, max_batch: int = 8, **renderer) -> None:
        self.engine = FaultyEngine(EchoEngine(0), faults)
        self.service = make_service(self.engine)
        self.renderer = self.service.renderer
        self.renderer.scheduler.max_batch = self.renderer.max_batch = self.renderer.batch_cap = max_batch
        for name, value in renderer.items():
            setattr(self.renderer, name, value)
        self.sessions = list(sessions)
        self.renders: dict[str, list] = {name: [] for name in self.sessions}
        self.errors: dict[str, list[Exception]] = {name: [] for name in self.sessions}
        self.tick = 0

    def config(self, name: str):
        return self.service.base.replace(prompt=name)

    def step(self, held: bool = True) -> dict:
        """One frame of every session, submitted while the model is held, so that they share a tick."""
        tick, self.tick = self.tick, self.tick + 1
        def submit():
            return {name: self.service.submit(name, colour(index, tick), self.config(name), seq=tick)
                    for index, name in enumerate(self.sessions)}
        if held:
            with Held(self.service):
                tickets = submit()
        else:
            tickets = submit()
        outcome = {}
        for name, ticket in tickets.items():
            error = ticket.future.exception(TIMEOUT)
            if error is None:
                self.renders[name].append((tick, ticket.future.result()))
                outcome[name] = ticket.future.result()
            else:
                self.errors[name].append(error)
                outcome[name] = error
        return outcome

    def check_kept(self, names) -> None:
        """Each of `names` has its renders unchanged and in order, one recorded frame per render and
        its stream's input count equal to its renders."""
        for name in names:
            index = self.sessions.index(name)
            renders = self.renders[name]
            assert [rendered.seq for _, rendered in renders] == sorted(rendered.seq for _, rendered in renders)
            for tick, rendered in renders:
                assert np.array_equal(rendered.image, colour(index, tick)), (name, tick)
            assert self.service.recorded(name) == len(renders), name
            assert self.renderer.stream_state(name).frames_in == len(renders), name

    def close(self) -> None:
        self.service.close()


@pytest.fixture
def run_of():
    runs = []

    def make(faults: Faults, **options) -> Run:
        runs.append(Run(faults, **options))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def test_an_error_in_one_session_s_call_fails_that_frame_alone_and_counts_nothing_twice(run_of):
    run = run_of(Faults(once_at=1))
    for _ in range(4):
        run.step()
    assert run.engine.injected["error"] == 2  # the batched call, and the faulty frame's retry alone
    assert [str(error) for error in run.errors["FAULTY"]] == [f"{INJECTED} (frame 1 of the faulty session)"]
    assert all(not run.errors[name] for name in ("a", "b", "c"))
    run.check_kept(SESSIONS)  # the faulty one too: 3 renders, 3 recorded, 3 inputs counted
    assert len(run.renders["FAULTY"]) == 3 and len(run.renders["a"]) == 4


def test_an_error_every_nth_frame_fails_each_of_those_frames_once(run_of):
    run = run_of(Faults(every=3))
    for _ in range(9):
        run.step()
    assert len(run.errors["FAULTY"]) == 3 and run.engine.injected["error"] == 6  # batched and alone
    assert all(not run.errors[name] for name in ("a", "b", "c"))
    run.check_kept(SESSIONS)


def test_out_of_memory_halves_the_batch_says_so_and_grows_back(run_of, caplog):
    sessions = [f"s{index}" for index in range(8)]
    run = run_of(Faults(oom_above=2), sessions=sessions, grow_after=3)
    with caplog.at_level(logging.WARNING, logger="sv2v.renderer"):
        first = run.step()
    assert not any(run.errors.values())  # everybody got their render
    assert run.renderer.batch_cap == 2 and run.renderer.scheduler.max_batch == 2  # 8 -> 4 -> 2
    assert {rendered.notice for rendered in first.values()} == {"the GPU ran out of memory: rendering 2 at a time"}
    assert "rendering at most 2 frames at a time" in caplog.text
    second = run.step()  # the scheduler now takes 2 a tick: no more running out, no more notices
    assert run.engine.injected["out of memory"] == 2
    assert all(rendered.notice is None for rendered in second.values())
    run.engine.faults.oom_above = None  # the memory is back
    for _ in range(6):
        run.step()
    assert run.renderer.batch_cap == 8
    run.check_kept(sessions)


def test_a_frame_that_does_not_fit_alone_fails_alone(run_of):
    run = run_of(Faults(oom_above=0))
    outcome = run.step()
    assert all(isinstance(error, RuntimeError) and "out of memory" in str(error) for error in outcome.values())
    assert run.renderer.batch_cap == 1
    run.check_kept(SESSIONS)  # nothing rendered, nothing recorded, nothing counted


def test_a_stalled_call_is_logged_with_its_sessions_and_the_others_go_on(run_of, caplog):
    run = run_of(Faults(stall_at=1, stall_seconds=1.5), sessions=["a", "FAULTY"])
    run.renderer.stall_seconds = 0.3
    with caplog.at_level(logging.WARNING, logger="sv2v.renderer"):
        for _ in range(3):
            run.step()
    assert "stalled? (sessions FAULTY, a)" in caplog.text
    assert "the stalled model call for sessions FAULTY, a finished after" in caplog.text
    assert not any(run.errors.values())
    run.check_kept(["a", "FAULTY"])


def test_a_device_fault_is_not_retried_and_stops_the_renderer(run_of):
    faults: list = []
    run = run_of(Faults(device_fault_at=1))
    run.renderer.on_device_fault = faults.append
    run.step()
    outcome = run.step()
    assert run.engine.injected["device fault"] == 1  # not retried: once, for the whole batch
    assert all(isinstance(error, DeviceFault) and "the server is restarting" in str(error)
               for error in outcome.values())
    assert len(faults) == 1 and run.renderer.device_fault is faults[0]
    with pytest.raises(RendererClosed):
        run.service.submit("a", colour(0, 9), run.config("a"))
    for name in SESSIONS:  # the first tick's renders stayed, the failed one is not counted
        assert run.service.recorded(name) == len(run.renders[name]) == 1


def test_a_failed_comparison_sends_the_render_alone_with_a_notice(run_of):
    run = run_of(Faults(once_at=0, prompt="FAULTY"), sessions=["a"])
    # The comparison stream's prompt is the session's with the bank off: make it the faulty one alone.
    original = run.service.submit

    def submit(name, image, config, **options):
        run.service.registry.admit(name).compare = True
        return original(name, image, config, **options)

    run.service.submit = submit
    real = run.engine.render

    def render(jobs):  # fail the comparison stream's frames (bank off) only
        if any(state.config.bank.mode == "none" for state, *_ in jobs):
            raise RuntimeError("comparison broke")
        return real(jobs)

    run.engine.render = render
    outcome = run.step()
    assert not run.errors["a"]
    assert outcome["a"].compare_image is None
    assert outcome["a"].notice.startswith("the comparison could not be rendered (comparison broke)")
    run.check_kept(["a"])


def test_a_client_dropped_mid_render_loses_nobody_else_s_frames(tmp_path):
    """A page that goes away while its render runs: the others keep theirs, its session goes on."""
    pytest.importorskip("websockets")
    from websockets.sync.client import connect

    from bench.channel_client import ChannelClient, channel_url
    from ui import wire
    from ui.presets import load_presets
    from ui.server import create_service, free_port, serve
    from ui.settings import Settings

    engine = FaultyEngine(EchoEngine(0), Faults(stall_at=1, stall_seconds=1.0))
    service = create_service(engine, size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    keeper_picture = wire.encode_render(colour(0, 0))
    faulty = Settings("FAULTY", "Plain prompt", 0.4, 4, 0, "dyme", True, True)
    try:
        with ChannelClient(running.url, "keeper", [keeper_picture], depth=1) as keeper:
            dropper = connect(channel_url(running.url, "dropper"), open_timeout=TIMEOUT)
            assert "ready" in dropper.recv(TIMEOUT)
            dropper.send(wire.settings_message(faulty))
            dropper.send(wire.pack_snapshot(1, 0.0, wire.encode_render(colour(1, 0))))
            assert isinstance(dropper.recv(TIMEOUT), bytes)  # its first render
            dropper.send(wire.pack_snapshot(2, 0.0, wire.encode_render(colour(1, 1))))  # this one stalls...
            time.sleep(0.3)
            dropper.close()  # ...and its page goes away meanwhile
            keeper.start()
            for _ in range(6):
                assert keeper.step() == "render"
            keeper.drain()
            received = len(keeper.log.renders)
        assert engine.injected["stall"] == 1
        assert not keeper.log.errors and keeper.log.dropped == 0
        assert [render.reply for render in keeper.log.renders] == sorted(r.reply for r in keeper.log.renders)
        assert service.recorded("keeper") == received
        for render in keeper.log.renders:  # unchanged: its own picture (JPEG, so nearly)
            picture = np.asarray(Image.open(io.BytesIO(render.jpeg)).convert("RGB"), np.int16)
            assert np.abs(picture - colour(0, 0)).max() <= 8
        # The dropped page's render that was running when it left is recorded too: it was drawn.
        assert service.recorded("dropper") == 2
        with connect(channel_url(running.url, "dropper"), open_timeout=TIMEOUT) as again:  # it comes back
            assert "ready" in again.recv(TIMEOUT)
            again.send(wire.settings_message(faulty))
            again.send(wire.pack_snapshot(1, 0.0, wire.encode_render(colour(1, 2))))
            assert isinstance(again.recv(TIMEOUT), bytes)
    finally:
        running.close()
        service.close()


def test_a_device_fault_stops_the_server_so_that_the_app_exits_for_a_restart():
    import urllib.error
    import urllib.request

    from bench.channel_client import ChannelClient
    from ui import wire
    from ui.presets import load_presets
    from ui.server import create_service, free_port, serve
    from ui.settings import Settings

    engine = FaultyEngine(EchoEngine(0), Faults(device_fault_at=0))
    service = create_service(engine, size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    faulty = Settings("FAULTY", "Plain prompt", 0.4, 4, 0, "dyme", True, True)
    try:
        with ChannelClient(running.url, "faulty", [wire.encode_render(colour(0, 0))], depth=1,
                           settings=faulty) as client:
            client.start()
            assert client.receive() == "error"
        assert "the server is restarting" in client.log.errors[0]
        assert isinstance(service.renderer.device_fault, DeviceFault)  # what app.py exits 1 for
        deadline = time.monotonic() + 10
        while True:  # the server stops by itself
            try:
                urllib.request.urlopen(running.url, timeout=1).close()
            except (urllib.error.URLError, ConnectionError):
                break
            assert time.monotonic() < deadline, "the server still serves after a device fault"
            time.sleep(0.2)
    finally:
        running.close()
        service.close()


@pytest.mark.parametrize("mode", ["latency", "stream"])
def test_with_the_real_engine_a_failed_batch_leaves_the_others_streams_as_if_it_never_ran(engine, mode):
    """The built-in model: a session batched with a faulty one renders exactly what it renders with no
    fault at all (its stream put back: inputs, frames in flight, the bank's counters)."""
    from tests.test_batching import BACKGROUNDS, assert_rounding_close
    from tests.test_method import sketch

    def run(faults: Faults) -> tuple[list, object]:
        service = make_service(FaultyEngine(engine, faults), mode=mode)
        renders = []
        try:
            for step in range(6):
                with Held(service):
                    mine = service.submit("a", sketch(step, BACKGROUNDS[0]), service.base.replace(prompt="a"),
                                          end=False)
                    service.submit(FAULTY, sketch(step, BACKGROUNDS[1]), service.base.replace(prompt=FAULTY),
                                   end=False)
                renders.append(mine.future.result(TIMEOUT).image)
            state = service.renderer.stream_state("a")
            return renders, (state.frames_in, state.bank.frames, list(state.in_flight_sources))
        finally:
            service.close()

    FAULTY = "FAULTY"
    clean, clean_state = run(Faults())
    faulty, faulty_state = run(Faults(every=2))  # the faulty session's frames 1, 3 and 5 break the batch
    assert faulty_state == clean_state
    for step, (a, b) in enumerate(zip(clean, faulty)):
        assert_rounding_close(a, b, step)
