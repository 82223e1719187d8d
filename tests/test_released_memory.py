"""Bounded host memory: a cap on what the streams of released (idle) sessions hold.

Past the cap the oldest released session's stream is freed (the comparison
stream counts too); that session's next frame starts a fresh stream, with
a notice, and its recording stays.  The others keep their streams.
"""

from __future__ import annotations

import numpy as np

from bench.echo import EchoEngine
from tests.test_many_users import make_service
from ui.live import Live, Notice, RenderReply
from ui.local_renderer import FREED_NOTICE, InProcessRenderer

TIMEOUT = 30
SIZE = 64
ONE = SIZE * SIZE * 3  # what one echo stream holds: its last render


def frame(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, np.uint8)


def released(service, *names) -> None:
    for name in names:
        service.renderer.release(name)
    service.renderer.call(lambda: None).result(TIMEOUT)  # the releases ran


def test_past_the_cap_the_oldest_released_stream_is_freed_and_starts_afresh_with_a_notice():
    service = make_service(EchoEngine(0))
    renderer: InProcessRenderer = service.renderer
    renderer.released_memory = int(2.5 * ONE)
    try:
        first = {name: service.render(name, frame(index * 50), service.base) for index, name in enumerate("abc")}
        epochs = {name: renderer.epoch_of(name) for name in "abc"}
        released(service, "a", "b")
        assert renderer.released_bytes() == 2 * ONE  # under the cap: both kept
        released(service, "c")
        assert renderer.released_bytes() == 2 * ONE  # over it: the oldest, a's, was freed
        assert renderer.stream_state("a") is None
        assert renderer.stream_state("b") is not None and renderer.stream_state("c") is not None
        again = service.render("a", frame(10), service.base)
        assert again.notice == FREED_NOTICE and renderer.epoch_of("a") != epochs["a"]
        assert renderer.stream_state("a").frames_in == 1  # a fresh stream
        assert service.recorded("a") == 2  # the recording stayed
        b = service.render("b", frame(60), service.base)
        assert b.notice is None and renderer.epoch_of("b") == epochs["b"]
        assert renderer.stream_state("b").frames_in == 2  # it went on
        assert renderer.released_bytes() == ONE  # c alone is still released
        replies = Live(service, {}).connect("a").render(frame(20), service.base)
        assert isinstance(replies[-1], RenderReply) and not any(isinstance(r, Notice) for r in replies)
        assert np.array_equal(first["b"].image, frame(50))
    finally:
        service.close()


def test_the_comparison_stream_counts_too_and_no_cap_keeps_everything():
    service = make_service(EchoEngine(0))
    renderer: InProcessRenderer = service.renderer
    try:
        service.set_config("a", service.base, compare=True)
        service.render("a", frame(1), service.base)
        service.render("b", frame(2), service.base)
        released(service, "a", "b")
        assert renderer.released_bytes() == 3 * ONE  # a's two streams and b's, no cap
        renderer.released_memory = int(2.5 * ONE)
        service.render("c", frame(3), service.base)
        released(service, "c")
        assert renderer.stream_state("a") is None and renderer.compare_state("a") is None
        assert renderer.released_bytes() == 2 * ONE
    finally:
        service.close()
