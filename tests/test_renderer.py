"""The renderer interface: both back ends (in-process, Ray Serve) pass the same tests.

Each test drives a renderer through open / step / reset / close and checks
its renders against the engine run directly on the same frames (the built-in
model at 64², one torch thread, so equal means bit-equal).  The Ray half runs
on the two-replica local cluster of tests/conftest.py and is skipped when ray
is not installed.
"""

from __future__ import annotations

import itertools
import uuid
from concurrent.futures import wait

import numpy as np
import pytest

from sv2v_core.config import StreamConfig
from sv2v_core.images import ImageError
from tests.conftest import RAY_REPLICAS, RAY_SESSIONS_PER_REPLICA
from ui.local_renderer import local_renderer
from ui.renderer import RendererBusy, SessionLost, StepRequest, Superseded

TIMEOUT = 120
SIZE = 64
LATENCY = StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None, prompt="a watercolor")
STREAM = LATENCY.replace(mode="stream")
LOCAL_CAP = 3


def frames(count: int, seed: int) -> list[np.ndarray]:
    """A moving drawing: a dark square sliding over a light gradient."""
    rng = np.random.default_rng(seed)
    base = np.linspace(150, 250, SIZE, dtype=np.float32)[None, :, None] + rng.uniform(0, 5, (SIZE, SIZE, 3))
    out = []
    for index in range(count):
        frame = base.copy()
        x = 8 + 3 * index % (SIZE - 24)
        frame[20:40, x:x + 16] = (40 + 10 * seed) % 255
        out.append(frame.clip(0, 255).astype(np.uint8))
    return out


def reference(engine, config: StreamConfig, inputs, *, end: bool = True, resets=(), cuts=()) -> list[np.ndarray]:
    """What one stream renders for `inputs` when the engine runs it directly, as a renderer's step does."""
    state = engine.new_stream(config)
    renders = []
    for index, frame in enumerate(inputs):
        if index in resets or index in cuts:
            state.reset_bank()
        output = engine(state, frame)
        if end:
            flushed = engine.flush(state)
            output = flushed[-1] if flushed else output
        renders.append(output.image)
    return renders


@pytest.fixture(params=["in-process", "ray"])
def backend(request, engine):
    """(renderer, its session cap in all) for each back end."""
    if request.param == "in-process":
        renderer = local_renderer(engine, max_sessions=LOCAL_CAP)
        yield renderer, LOCAL_CAP
        renderer.shutdown()
    else:
        yield request.getfixturevalue("ray_renderer"), RAY_REPLICAS * RAY_SESSIONS_PER_REPLICA


@pytest.fixture()
def renderer(backend):
    return backend[0]


@pytest.fixture()
def session_ids(renderer):
    """Fresh session ids; every one is closed after the test."""
    made = []

    def make() -> str:
        made.append(f"test-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    for session_id in made:
        renderer.close(session_id)


def run(renderer, session_id: str, config: StreamConfig, inputs, **flags):
    """Step `inputs` one at a time (each waits for its render); the replies."""
    return [renderer.step(session_id, StepRequest(frame, config, **flags)).result(TIMEOUT) for frame in inputs]


def test_renders_equal_the_engine_alone_and_keep_one_epoch(renderer, session_ids, engine):
    first, second = session_ids(), session_ids()
    inputs = {first: frames(6, 1), second: frames(6, 2)}
    replies = {first: [], second: []}
    for index in range(6):  # interleaved: the sessions' banks must stay apart
        for session_id in (first, second):
            request = StepRequest(inputs[session_id][index], LATENCY)
            replies[session_id].append(renderer.step(session_id, request).result(TIMEOUT))
    for session_id in (first, second):
        expected = reference(engine, LATENCY, inputs[session_id])
        got = replies[session_id]
        assert [reply.input_index for reply in got] == list(range(6))
        assert [reply.source_index for reply in got] == list(range(6))
        assert len({reply.epoch for reply in got}) == 1
        for reply, image in zip(got, expected):
            np.testing.assert_array_equal(reply.image, image)
    assert replies[first][0].epoch != replies[second][0].epoch


def test_stream_mode_end_flushes_to_the_newest_frame(renderer, session_ids, engine):
    session_id = session_ids()
    inputs = frames(5, 3)
    replies = run(renderer, session_id, STREAM, inputs[:4], end=False)
    replies += run(renderer, session_id, STREAM, inputs[4:], end=True)
    assert [reply.input_index for reply in replies] == [0, 1, 2, 3, 4]
    assert replies[-1].source_index == 4  # the flush brought the newest frame out
    assert replies[2].source_index < 2     # mid-stroke, stream mode lags
    state = engine.new_stream(STREAM)
    for frame in inputs:
        output = engine(state, frame)
    np.testing.assert_array_equal(replies[-1].image, engine.flush(state)[-1].image)
    assert output.source_index < 4


def test_reset_and_cut_empty_the_bank_of_that_session_only(renderer, session_ids, engine):
    session_id, other = session_ids(), session_ids()
    assert renderer.reset(session_id).result(TIMEOUT) is False  # nothing rendered yet
    inputs, others = frames(6, 4), frames(6, 5)
    got, got_other = [], []
    for index in range(6):
        if index == 2:
            assert renderer.reset(session_id).result(TIMEOUT) is True
        got.append(renderer.step(session_id, StepRequest(inputs[index], LATENCY, cut=index == 4)).result(TIMEOUT))
        got_other.append(renderer.step(other, StepRequest(others[index], LATENCY)).result(TIMEOUT))
    for reply, image in zip(got, reference(engine, LATENCY, inputs, resets={2}, cuts={4})):
        np.testing.assert_array_equal(reply.image, image)
    for reply, image in zip(got_other, reference(engine, LATENCY, others)):
        np.testing.assert_array_equal(reply.image, image)
    # and it made a difference: without the reset the third render differs
    assert not np.array_equal(got[2].image, reference(engine, LATENCY, inputs[:3])[2])


def test_newest_frame_wins_with_at_most_one_waiting(renderer, session_ids):
    session_id = session_ids()
    run(renderer, session_id, LATENCY, frames(1, 6))
    burst = [renderer.step(session_id, StepRequest(frame, LATENCY)) for frame in frames(6, 7)]
    wait(burst, TIMEOUT)
    outcomes = ["superseded" if isinstance(f.exception(), Superseded) else "rendered" for f in burst]
    assert outcomes[-1] == "rendered"
    assert outcomes.count("rendered") <= 2  # the one in flight when the burst came, and the newest
    rendered = [f.result().input_index for f in burst if f.exception() is None]
    assert rendered == list(range(1, len(rendered) + 1))  # in order, none lost in between


def test_busy_when_full_and_leaving_frees_the_room(backend, session_ids):
    renderer, cap = backend
    held = [session_ids() for _ in range(cap)]
    for session_id in held:
        renderer.open(session_id)
    newcomer = session_ids()
    with pytest.raises(RendererBusy):
        renderer.open(newcomer)
    with pytest.raises(RendererBusy):  # a frame of a newcomer too, and no active session was evicted for it
        renderer.step(newcomer, StepRequest(frames(1, 8)[0], LATENCY)).result(TIMEOUT)
    run(renderer, held[0], LATENCY, frames(1, 9))
    renderer.close(held[-1])
    renderer.open(newcomer)
    assert run(renderer, newcomer, LATENCY, frames(1, 10))[0].input_index == 0


def test_bad_frame_is_refused_and_the_session_goes_on(renderer, session_ids):
    session_id = session_ids()
    good = run(renderer, session_id, LATENCY, frames(2, 11))
    with pytest.raises(ImageError):
        renderer.step(session_id, StepRequest(np.zeros((4,), np.float32), LATENCY)).result(TIMEOUT)
    after = run(renderer, session_id, LATENCY, frames(1, 12))[0]
    assert after.epoch == good[0].epoch and after.input_index == 2


def test_a_session_that_comes_back_starts_a_fresh_stream(renderer, session_ids, engine):
    session_id = session_ids()
    inputs = frames(4, 13)
    before = run(renderer, session_id, LATENCY, inputs[:2])
    renderer.close(session_id)
    after = run(renderer, session_id, LATENCY, inputs[2:])
    assert after[0].epoch != before[0].epoch
    assert [reply.input_index for reply in after] == [0, 1]
    for reply, image in zip(after, reference(engine, LATENCY, inputs[2:])):
        np.testing.assert_array_equal(reply.image, image)


# -- the in-process renderer's strict epochs (what a Ray replica runs) -------------------------
def test_strict_epochs_refuse_another_stream_unless_told_to_restart(engine):
    renderer = local_renderer(engine)
    try:
        inputs = frames(3, 14)
        first = renderer.step("s", StepRequest(inputs[0], LATENCY)).result(TIMEOUT)
        same = renderer.step("s", StepRequest(inputs[1], LATENCY, epoch=first.epoch)).result(TIMEOUT)
        assert same.epoch == first.epoch and same.input_index == 1
        with pytest.raises(SessionLost):  # a stream this renderer never had: and its own copy is stale now
            renderer.step("s", StepRequest(inputs[2], LATENCY, epoch="elsewhere-7")).result(TIMEOUT)
        assert not renderer.holds("s")
        with pytest.raises(SessionLost):
            renderer.step("s", StepRequest(inputs[2], LATENCY, epoch=first.epoch)).result(TIMEOUT)
        restarted = renderer.step("s", StepRequest(inputs[2], LATENCY, epoch=first.epoch, restart=True)).result(TIMEOUT)
        assert restarted.epoch not in (first.epoch, "elsewhere-7") and restarted.input_index == 0
        np.testing.assert_array_equal(restarted.image, reference(engine, LATENCY, inputs[2:])[0])
    finally:
        renderer.shutdown()


def test_an_idle_session_is_reclaimed_for_a_newcomer_an_active_one_never(engine):
    now = itertools.count(0.0, 10.0)  # each clock reading is 10 s after the last
    clock = lambda: next(now)  # noqa: E731
    from ui.local_renderer import InProcessRenderer

    renderer = InProcessRenderer(engine, max_sessions=2, idle_timeout=25.0, clock=clock)
    try:
        renderer.open("a")      # t=0
        renderer.open("b")      # t=10
        with pytest.raises(RendererBusy):
            renderer.open("c")  # t=20: a idle 20 s < 25 s
        renderer.open("b")      # t=30: b used again
        renderer.open("c")      # t=40: a idle 40 s: reclaimed
        assert renderer.holds("b") and renderer.holds("c") and not renderer.holds("a")
    finally:
        renderer.shutdown()


# -- the app without Ray ----------------------------------------------------------------------
NO_RAY = """
import sys
sys.modules["ray"] = None  # as if ray were not installed: `import ray` raises ImportError
import numpy as np
import app
from ui.server import create_service

engine, notice = app.load_engine("tiny", None)
service = create_service(engine, size=64)
service.warm_up()
rendered = service.render("s", np.full((64, 64, 3), 200, np.uint8), service.base)
assert rendered.image.shape == (64, 64, 3) and service.recorded("s") == 1
loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.split(".")[0] == "ray")
assert not loaded and "ui.ray_renderer" not in sys.modules, loaded
service.close()
try:
    app.main(["--ray", "local"])
except SystemExit as error:
    print(error)
"""


def test_the_app_runs_in_process_without_ray_and_says_what_ray_mode_needs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", NO_RAY], cwd=Path(__file__).parent.parent, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("cannot start: --ray needs Ray Serve")
    assert "pip install -r requirements-ray.txt" in result.stdout


def test_the_idle_timeout_frees_a_session_s_stream_with_its_recording():
    from bench.echo import EchoEngine
    from ui.recording import Recorder
    from ui.service import CanvasService
    from ui.sessions import SessionRegistry

    now = [0.0]
    registry = SessionRegistry(Recorder, idle_timeout=60.0, clock=lambda: now[0])
    service = CanvasService(EchoEngine(0), registry, LATENCY)
    try:
        service.render("gone", frames(1, 15)[0], LATENCY)
        assert service.renderer.holds("gone")
        now[0] = 61.0
        service.render("other", frames(1, 16)[0], LATENCY)  # any access evicts the idle ones
        assert "gone" not in registry and not service.renderer.holds("gone")
        assert service.renderer.sessions() == 1
    finally:
        service.close()


NO_BANK = LATENCY.replace(bank_mode="none")


def test_a_comparison_renders_the_same_frames_on_a_second_stream_without_the_bank(renderer, session_ids, engine):
    """The page's compare view: each frame also renders on the session's comparison stream, bank off."""
    session_id = session_ids()
    inputs = frames(5, 8)
    replies = run(renderer, session_id, LATENCY, inputs[:2])  # not comparing yet
    replies += run(renderer, session_id, LATENCY, inputs[2:], compare=NO_BANK)
    assert [reply.compare_image is None for reply in replies] == [True, True, False, False, False]
    for reply, image in zip(replies, reference(engine, LATENCY, inputs)):  # the banked stream as if alone
        np.testing.assert_array_equal(reply.image, image)
    for reply, image in zip(replies[2:], reference(engine, NO_BANK, inputs[2:])):
        np.testing.assert_array_equal(reply.compare_image, image)
    assert not all(np.array_equal(reply.image, reply.compare_image) for reply in replies[2:]), \
        "the two sides are the same: the comparison stream is not without the bank, or the bank does nothing"


def test_a_replay_renders_the_frame_as_a_fresh_bank_would_after_those_frames(renderer, session_ids, engine):
    """After a bank change the app replays recent frames from an empty bank: the render is what a stream
    with the new setting gives for those frames and this one."""
    replayed, plain = session_ids(), session_ids()
    inputs = frames(6, 10)
    queue = LATENCY.replace(bank_mode="queue", bank_size=2)
    for session_id in (replayed, plain):
        run(renderer, session_id, LATENCY, inputs[:5])  # a DyMe bank that has seen five frames
    (reply,) = run(renderer, replayed, queue, inputs[5:], replay=tuple((frame, None) for frame in inputs[2:5]))
    np.testing.assert_array_equal(reply.image, reference(engine, queue, inputs[2:])[-1])
    (unreplayed,) = run(renderer, plain, queue, inputs[5:])  # the new mode's bank starts empty: no bank at all
    assert not np.array_equal(unreplayed.image, reply.image), "the replay left nothing in the bank"


def test_the_comparison_stream_has_the_bank_off_and_goes_with_the_comparison(engine):
    renderer = local_renderer(engine)
    try:
        run(renderer, "artist", LATENCY, frames(3, 11), compare=NO_BANK)
        banked, plain = renderer.stream_state("artist"), renderer.compare_state("artist")
        assert banked.config.bank.mode == "dyme" and banked.bank.stored == 1
        assert plain.config.bank.mode == "none" and plain.bank.stored == 0 and plain.frames_in == 3
        assert renderer.reset("artist").result(TIMEOUT) and banked.bank.stored == 0
        run(renderer, "artist", LATENCY, frames(1, 12))
        assert renderer.compare_state("artist") is None, "a frame without a comparison keeps its stream"
    finally:
        renderer.shutdown()
