"""Many artists on one engine, through the app's own render path (ui.service, ui.scheduler).

- Batched equality: sessions whose frames the scheduler batches together get
  the renders each would get alone (to within the CPU's rounding, see
  tests/test_batching.py), with a session joining and one leaving, a prompt
  change, a bank reset and a cut while batched.
- A bad frame in a batch fails only itself, also when the batched call
  raises (each frame is then rendered on its own).
- Admission: the (N+1)th session is told it is busy and how many are ahead
  of it (service, fast channel, API), and gets in when one leaves or goes
  idle; an idle session's state leaves the GPU, and it is freed after the
  idle timeout.
- Under load (echo engine: each render is its own snapshot, so its colour
  says whose it is): no render ever carries another artist's colour; a
  client that disconnects mid-render, one that sends garbage and one that
  never reads leave the others unaffected, and their sessions are freed.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sv2v_core import StreamConfig
from tests.test_batching import BACKGROUNDS, assert_rounding_close, sketch
from bench.echo import EchoEngine
from ui.recording import Recorder
from ui.service import CanvasService
from ui.server import free_port
from ui.sessions import Busy, SessionRegistry

SIZE = 64
TIMEOUT = 30



class Held:
    """Keeps the scheduler's worker busy until released, so that frames submitted meanwhile share one tick."""

    def __init__(self, service: CanvasService) -> None:
        self.release = threading.Event()
        entered = threading.Event()
        self.task = service.renderer.call(lambda: entered.set() or self.release.wait(TIMEOUT))
        assert entered.wait(TIMEOUT)

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.task.result(TIMEOUT)


def make_service(engine, *, mode: str = "latency", clock=time.monotonic, max_active=None, release_after=30.0,
                 idle_timeout=1800.0, sweep_seconds=3600.0, size=SIZE) -> CanvasService:
    base = StreamConfig(width=size, height=size, mode=mode, similarity_skip=None, scene_cut=None)
    registry = SessionRegistry(Recorder, idle_timeout=idle_timeout, clock=clock, max_active=max_active,
                               release_after=release_after)
    return CanvasService(engine, registry, base, sweep_seconds=sweep_seconds)


# -- batched equality through the app path -------------------------------------------------
PROMPTS = ["a watercolor painting", "an oil painting", ""]
SPANS = [range(0, 8), range(0, 5), range(2, 8)]  # 0 throughout, 1 leaves after 4, 2 joins at 2
NEW_PROMPT = (0, 3, "a pencil drawing")         # session 0 changes its prompt at step 3
RESET = (2, 4)                                  # session 2's bank is emptied (Reset bank) before step 4
CUT = (1, 2)                                    # session 1's page replaced the picture at step 2


def settings(base: StreamConfig, index: int, step: int) -> StreamConfig:
    prompt = NEW_PROMPT[2] if (index, step >= NEW_PROMPT[1]) == (NEW_PROMPT[0], True) else PROMPTS[index]
    return base.replace(prompt=prompt, seed=index, strength=0.4 + 0.1 * (index == 1))


@pytest.mark.parametrize("mode", ["latency", "stream"])
def test_sessions_batched_by_the_app_render_what_each_renders_alone(engine, mode):
    service = make_service(engine, mode=mode)
    try:
        batched = {}
        for step in range(8):
            if step == RESET[1]:
                service.reset_bank(f"s{RESET[0]}")
            if step == SPANS[1].stop:
                service.close_session("s1")
            with Held(service):
                tickets = {index: service.submit(f"s{index}", sketch(step, BACKGROUNDS[index]),
                                                 settings(service.base, index, step), end=False,
                                                 cut=(index, step) == CUT)
                           for index, span in enumerate(SPANS) if step in span}
            for index, ticket in tickets.items():
                batched[index, step] = ticket.future.result(TIMEOUT).image
        batches = service.stats().batches
        assert batches == {2: 5, 3: 3}, batches  # every step's frames in one batch
    finally:
        service.close()

    for index, span in enumerate(SPANS):  # each session alone, with the same events
        state = engine.new_stream(settings(service.base, index, span.start))
        for step in span:
            engine.configure(state, settings(service.base, index, step))
            if (index, step) in (RESET, CUT):
                state.reset_bank()
            assert_rounding_close(batched[index, step], engine(state, sketch(step, BACKGROUNDS[index])).image,
                                  (index, step))


def test_a_strokes_end_in_a_batch_is_flushed_to_its_own_last_snapshot():
    """Stream mode lags by steps - 1 frames; a frame marked `end` comes back showing itself (the flush),
    also when it shares its batch with sessions that are still drawing."""
    service = make_service(EchoEngine(0), mode="stream")
    try:
        for seq in range(1, 6):
            with Held(service):
                ending = service.submit("ending", np.full((SIZE, SIZE, 3), 10 * seq, np.uint8), service.base,
                                        seq=seq, end=seq == 5)
                drawing = service.submit("drawing", np.full((SIZE, SIZE, 3), 10 * seq, np.uint8), service.base,
                                         seq=seq, end=False)
            ended, going = ending.future.result(TIMEOUT), drawing.future.result(TIMEOUT)
        assert service.stats().batches == {2: 5}
    finally:
        service.close()
    assert ended.seq == 5 and ended.image.mean() == 50  # the stroke's end, flushed
    assert going.seq == 2  # still steps - 1 = 3 frames behind


class Poisoned:
    """The tiny engine, but any call with an all-black frame in it fails as a whole (as an out of
    memory error would): in a batch, and alone too."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, jobs):
        if any(not np.asarray(frame).any() for _, frame, *_ in jobs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.engine.render(jobs)


def test_a_frame_that_breaks_its_batch_gets_the_error_and_the_others_their_renders(engine):
    service = make_service(Poisoned(engine))
    frames = {"good0": sketch(1, BACKGROUNDS[0]), "poison": np.zeros((SIZE, SIZE, 3), np.uint8),
              "bad-picture": np.zeros((SIZE, SIZE, 5), np.uint8), "bad-settings": sketch(2),
              "good1": sketch(3, BACKGROUNDS[1])}
    try:
        with Held(service):
            tickets = {}
            for name, frame in frames.items():
                config = service.base.replace(prompt=name)
                if name == "bad-settings":
                    config = config.replace(strength=0.05, steps=4)  # too low for 4 steps: the engine refuses it
                tickets[name] = service.submit(name, frame, config)
        results = {name: ticket.future.exception(TIMEOUT) or ticket.future.result() for name, ticket in tickets.items()}
        assert service.stats().batches.get(5) == 1
        # and the sessions go on
        assert service.render("poison", sketch(4), service.base).image.shape == (SIZE, SIZE, 3)
    finally:
        service.close()
    assert isinstance(results["poison"], RuntimeError) and "out of memory" in str(results["poison"])
    assert isinstance(results["bad-picture"], ValueError) and "H×W×3" in str(results["bad-picture"])
    assert isinstance(results["bad-settings"], ValueError) and "strength" in str(results["bad-settings"])
    for name in ("good0", "good1"):
        state = engine.new_stream(service.base.replace(prompt=name))
        assert_rounding_close(results[name].image, engine(state, frames[name]).image, name)


# -- admission and idle release -----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_next_session_waits_in_line_and_gets_in_when_one_leaves():
    service = make_service(EchoEngine(0), max_active=2)
    frame = np.full((SIZE, SIZE, 3), 200, np.uint8)
    try:
        for session in ("a", "b"):
            service.render(session, frame, service.base)
        with pytest.raises(Busy, match="busy: 0 people ahead of you") as first:
            service.render("c", frame, service.base)
        with pytest.raises(Busy, match="busy: 1 person ahead of you"):
            service.render("d", frame, service.base)
        assert (first.value.ahead, first.value.places) == (0, 2)
        service.close_session("a")  # a's page closed
        with pytest.raises(Busy, match="busy: 1 person ahead of you"):
            service.render("d", frame, service.base)  # the free place is c's: c was first in line
        assert service.render("c", frame, service.base).image.shape == (SIZE, SIZE, 3)
        assert service.render("b", frame, service.base).image.shape == (SIZE, SIZE, 3)  # b never waits
        assert (service.registry.active(), service.registry.waiting()) == (2, 1)
    finally:
        service.close()


def test_an_idle_session_releases_its_state_and_place_and_is_freed_after_the_idle_timeout():
    clock = Clock()
    service = make_service(EchoEngine(0), clock=clock, max_active=1, release_after=10, idle_timeout=100)
    frame = np.full((SIZE, SIZE, 3), 200, np.uint8)
    try:
        service.render("a", frame, service.base)
        state, folder = service.renderer.stream_state("a"), service.registry.get("a").recorder.folder
        with pytest.raises(Busy):
            service.render("b", frame, service.base)
        clock.now += 11
        service.sweep()
        service.renderer.call(lambda: None).result(TIMEOUT)  # the release runs on the scheduler
        assert state.device == "cpu" and service.registry.active() == 0
        service.render("b", frame, service.base)  # a's place
        with pytest.raises(Busy):
            service.render("a", frame, service.base)  # a comes back: b holds the place now
        clock.now += 11
        service.sweep()
        assert service.render("a", frame, service.base).image.shape == (SIZE, SIZE, 3)
        assert service.renderer.stream_state("a") is state  # a's stream went on where it was
        clock.now += 101
        service.sweep()
        assert "a" not in service.registry and "b" not in service.registry and not folder.exists()
    finally:
        service.close()


def test_a_session_is_not_freed_while_it_exports_however_long_that_takes():
    """Found by the soak: an export outlasting the idle timeout had its recording deleted under it."""
    clock = Clock()
    registry = SessionRegistry(Recorder, idle_timeout=100, clock=clock)
    folder = registry.get("a").recorder.folder
    with registry.hold("a"):
        clock.now += 500
        assert registry.evict_idle() == [] and folder.exists()
    clock.now += 50
    assert registry.evict_idle() == []  # idle since the export ended, not since it began
    clock.now += 51
    assert registry.evict_idle() == ["a"] and not folder.exists()


@pytest.fixture()
def full_app():
    """The real server, at most one session: echo engine, 64²."""
    from ui.presets import load_presets
    from ui.server import create_service, serve

    service = create_service(EchoEngine(0), size=SIZE, max_sessions=1)
    running = serve(service, load_presets(), port=free_port(), block=False)
    yield service, running.url
    running.close()
    service.close()


def jpeg(colour, size=SIZE) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_full_app_says_busy_on_the_fast_channel_and_the_api_and_lets_them_in_when_one_leaves(full_app, tmp_path):
    pytest.importorskip("websockets")
    gradio_client = pytest.importorskip("gradio_client")
    from PIL import Image

    from bench.channel_client import ChannelClient

    service, url = full_app
    with ChannelClient(url, "first", [jpeg((200, 0, 0))], depth=1) as first:
        first.start()
        assert first.receive() == "render"
        with ChannelClient(url, "second", [jpeg((0, 200, 0))], depth=1) as second:
            second.start()
            assert second.receive() == "busy" and second.log.busy == 1
            path = tmp_path / "sketch.png"
            Image.new("RGB", (SIZE, SIZE), (0, 0, 200)).save(path)
            client = gradio_client.Client(url, verbose=False)
            try:
                with pytest.raises(Exception, match=r"busy: 1 person ahead of you"):
                    client.predict(gradio_client.handle_file(str(path)), "", 0.4, 4, 0, "dyme", True, True,
                                   api_name="/render")
            finally:
                client.close()
            service.close_session("first")  # the first page is closed
            second.start()
            assert second.receive() == "render"
    assert not second.log.errors and not first.log.errors


# -- under load -------------------------------------------------------------------------------------
@pytest.fixture()
def loaded_app():
    """The real server (in this process), echo engine at 8 ms + 3 ms per frame, 512², stream mode, so
    each stream's state carries its frames from call to call; short idle release and timeout."""
    from ui.presets import load_presets
    from ui.server import serve

    service = make_service(EchoEngine(3, call_ms=8), mode="stream", release_after=0.5, idle_timeout=1.5,
                           sweep_seconds=0.2, size=512)
    running = serve(service, load_presets(), port=free_port(), block=False)
    yield service, running.url
    running.close()
    service.close()


def test_artists_under_load_only_ever_see_their_own_colour(loaded_app):
    """Six artists, each drawing in its own colour: no render ever shows another artist's colour."""
    from bench.loadtest import Artist

    service, url = loaded_app
    artists = [Artist(url, user, 6, 512, check_colour=True) for user in range(6)]
    for artist in artists:
        artist.thread.start()
    time.sleep(3.0)
    for artist in artists:
        artist.stop.set()
    for artist in artists:
        artist.thread.join(TIMEOUT)
    for artist in artists:
        assert artist.failure is None and not artist.client.log.errors
        assert len(artist.client.log.renders) > 5 and artist.leaks == 0, (artist.user, artist.leaks)
    assert any(size > 1 for size in service.stats().batches)  # they did share batches


def test_an_artist_with_a_page_rate_sends_no_faster_than_it(loaded_app):
    """--page-rate: a page on a 20 Hz display sends at most 20 snapshots a second, however fast the answers."""
    from bench.loadtest import Artist

    _, url = loaded_app
    artist = Artist(url, 0, 1, 512, check_colour=True, page_rate=20)
    artist.thread.start()
    time.sleep(1.5)
    artist.stop.set()
    artist.thread.join(TIMEOUT)
    sent = sorted(artist.client.sent.values())
    assert artist.failure is None and len(sent) >= 10
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert min(gaps) >= 0.05 - 0.002 and len(sent) <= 1.5 * 20 + 2


def test_a_short_soak_exports_every_artists_frames():
    """CI's version of the 30-minute soak: artists come, draw, export and go; no errors, no leaks,
    every export decodes with one frame per render its artist received."""
    pytest.importorskip("gradio_client")
    from bench.loadtest import run_soak

    soak = run_soak(0.3, users=3, session_seconds=6, warmup_minutes=0.1)
    assert soak.sessions >= 6 and soak.renders > 0
    assert not soak.errors and not soak.exports_bad and soak.leaks == 0, soak
    assert soak.exports_ok == soak.sessions


def test_bad_clients_under_load_harm_nobody_and_are_freed(loaded_app):
    """Three artists draw while one client disconnects mid-render, one sends garbage and one never reads."""
    import io
    import os

    from PIL import Image

    from tests.test_channel import masked_frame, raw_channel
    from ui import wire
    from bench.loadtest import Artist, drawing

    service, url = loaded_app
    artists = [Artist(url, user, 3, 512, check_colour=True, session=f"good{user}") for user in range(3)]
    for artist in artists:
        artist.thread.start()
    ws_url = url.replace("http://", "ws://") + "sv2v/ws"
    picture = drawing(0, 1, 512, count=1)[0]
    try:
        time.sleep(0.5)
        # disconnects mid-render: one snapshot sent, the connection dropped while it renders
        vanishing = raw_channel(ws_url, "vanishing")
        vanishing.sendall(masked_frame(wire.pack_snapshot(1, 0.0, picture)))
        time.sleep(0.005)
        vanishing.close()
        # garbage: not a snapshot at all, then bytes that are not even a WebSocket frame
        garbage = raw_channel(ws_url, "garbage")
        garbage.sendall(masked_frame(b"GARBAGE" * 10) + os.urandom(64))
        garbage.close()
        # never reads: a small receive buffer, a stream of noise snapshots (large renders), no reads
        rng = np.random.default_rng(0)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), np.uint8)).save(buffer, format="JPEG", quality=90)
        noise = buffer.getvalue()
        deaf = raw_channel(ws_url, "deaf", receive_buffer=4096)
        try:
            for seq in range(1, 40):
                deaf.sendall(masked_frame(wire.pack_snapshot(seq, 0.0, noise)))
                time.sleep(0.02)
        except OSError:
            pass  # the server closed it (more than MAX_UNANSWERED unanswered)
        time.sleep(3.0)  # the idle release (0.5 s) and timeout (1.5 s) pass for the three that left
        gone = [session for session in ("vanishing", "garbage", "deaf") if session in service.registry]
        counts = [len(artist.client.log.renders) for artist in artists]
        time.sleep(0.5)
        still_drawing = all(len(artist.client.log.renders) > count for artist, count in zip(artists, counts))
    finally:
        for artist in artists:
            artist.stop.set()
        for artist in artists:
            artist.thread.join(TIMEOUT)
        deaf.close()
    assert not gone, f"not freed: {gone}"
    assert still_drawing
    for artist in artists:
        assert artist.failure is None and not artist.client.log.errors and artist.leaks == 0
        assert f"good{artist.user}" in service.registry
