"""The session layer (ui.live) without any transport: what an adapter gets for each snapshot and setting.

The service renders with the echo engine (bench.echo), whose render is the snapshot itself.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from bench.echo import EchoEngine
from sv2v_core.config import StreamConfig
from ui import wire
from ui.live import (
    MAX_UNANSWERED, RESTARTED_NOTICE, BusyReply, Dropped, Failed, Live, Notice, Overrun, Pending, RenderReply,
)
from ui.presets import load_presets
from ui.recording import Recorder
from ui.service import CanvasService
from ui.sessions import SessionRegistry
from ui.settings import Settings

SIZE = 64
TIMEOUT = 30


@pytest.fixture()
def live():
    base = StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None)
    service = CanvasService(EchoEngine(0), SessionRegistry(Recorder, max_active=1), base)
    yield Live(service, load_presets())
    service.close()


def snapshot(seq: int, colour=(200, 30, 30), **flags) -> wire.SnapshotMessage:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), colour).save(buffer, format="JPEG", quality=90)
    return wire.SnapshotMessage(seq, 1000.0 + seq, flags.get("end", True), False, buffer.getvalue())


def answered(page, message) -> list:
    outcome = page.snapshot(message)
    return page.answer(outcome) if isinstance(outcome, Pending) else outcome


def test_a_snapshot_is_decoded_queued_and_answered_with_its_render_and_timings(live):
    page = live.connect("artist")
    assert page.render_size() == (SIZE, SIZE)
    outcome = page.snapshot(snapshot(1))
    assert isinstance(outcome, Pending) and outcome.future.result(TIMEOUT) is not None
    (reply,) = page.answer(outcome)
    assert isinstance(reply, RenderReply) and reply.seq == 1 and reply.rendered.seq == 1
    assert reply.rendered.image.shape == (SIZE, SIZE, 3) and reply.rendered.jpeg.startswith(b"\xff\xd8")
    assert reply.timings.total >= reply.timings.decode >= 0


def test_sequence_decode_and_settings_problems_are_replies_not_exceptions(live):
    page = live.connect("careful")
    answered(page, snapshot(5))
    assert answered(page, snapshot(5)) == [Failed(5, "snapshot 5 arrived after snapshot 5; sequence numbers must "
                                                     "increase")]
    broken = wire.SnapshotMessage(6, 0.0, True, False, b"not a picture")
    (failed,) = answered(page, broken)
    assert failed.seq == 6 and failed.unreadable and "not a readable image" in failed.message
    preset = next(iter(live.presets))
    (bad,) = page.settings(Settings("x", preset, 9.0, 4, 0, "dyme", True, True))
    assert bad.seq is None and "strength" in bad.message
    assert page.settings(Settings("a fox", preset, 0.5, 2, 3, "dyme", True, True)) == []
    assert live.service.config_of("careful").steps == 2
    assert live.connect("careful").snapshot(snapshot(1)) is not None  # a new connection counts afresh


def test_a_connection_that_never_reads_is_an_overrun(live):
    page = live.connect("deaf")
    release = threading.Event()
    holding = live.service.renderer.call(release.wait)  # the model is busy: snapshots wait
    try:
        for seq in range(1, MAX_UNANSWERED + 1):
            assert isinstance(page.snapshot(snapshot(seq)), Pending)
        with pytest.raises(Overrun):
            page.snapshot(snapshot(MAX_UNANSWERED + 1))
    finally:
        release.set()
        holding.result(TIMEOUT)


def test_a_newer_snapshot_drops_the_waiting_one_and_a_full_app_says_busy(live):
    page = live.connect("fast")
    release = threading.Event()
    holding = live.service.renderer.call(release.wait)
    first, second = page.snapshot(snapshot(1)), page.snapshot(snapshot(2))
    release.set()
    holding.result(TIMEOUT)
    assert page.answer(first) == [Dropped(1)]
    assert isinstance(page.answer(second)[0], RenderReply)
    (busy,) = answered(live.connect("second-artist"), snapshot(1))  # max_active=1: "fast" holds the place
    assert isinstance(busy, BusyReply) and busy.ahead == 0 and "busy" in busy.message


def test_a_restarted_stream_is_a_notice_before_the_render(live):
    page = live.connect("restart")
    answered(page, snapshot(1))
    live.service.renderer.close("restart")  # the renderer lost the stream, as when its worker dies
    notice, render = answered(page, snapshot(2))
    assert notice == Notice(RESTARTED_NOTICE) and isinstance(render, RenderReply)


def test_decoded_pictures_render_through_the_same_replies_and_reach_the_pop_out(live):
    page = live.connect("api")
    token = page.view_token()
    assert live.watch(token) is not None and live.watch("made-up") is None
    assert page.rerender() == []  # nothing drawn yet
    frame = np.full((SIZE, SIZE, 3), 90, np.uint8)
    (reply,) = page.render(frame, live.service.base)
    assert isinstance(reply, RenderReply) and np.abs(reply.rendered.image.astype(int) - 90).max() < 8
    assert isinstance(page.rerender()[0], RenderReply)
    with pytest.raises(ValueError, match="session"):
        live.connect("../etc")


def test_a_snapshot_is_decoded_only_when_the_model_takes_it_and_a_corrupt_one_fails_alone(monkeypatch):
    """Decode on take: snapshots wait encoded; the ones a newer snapshot replaced are never decoded, and
    a picture that cannot be decoded fails only its own frame of the batch."""
    from ui import inputs

    decoded = []
    decode = inputs.decode_image_bytes
    monkeypatch.setattr(inputs, "decode_image_bytes", lambda data, size=None: (decoded.append(data), decode(data, size))[1])
    base = StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None)
    service = CanvasService(EchoEngine(0), SessionRegistry(Recorder), base)
    try:
        live = Live(service, load_presets())
        fast, careless, calm = live.connect("fast"), live.connect("careless"), live.connect("calm")
        release = threading.Event()
        holding = service.renderer.call(release.wait)  # the model is busy: every snapshot waits
        red, green, blue, grey = (snapshot(seq, colour) for seq, colour in
                                  ((1, (200, 30, 30)), (2, (30, 200, 30)), (3, (30, 30, 200)), (1, (90, 90, 90))))
        waiting = [fast.snapshot(message) for message in (red, green, blue)]
        broken = careless.snapshot(wire.SnapshotMessage(1, 0.0, True, False, b"not a picture"))
        fine = calm.snapshot(grey)
        assert decoded == []  # nothing is decoded on arrival
        release.set()
        holding.result(TIMEOUT)
        assert [fast.answer(pending) for pending in waiting[:2]] == [[Dropped(1)], [Dropped(2)]]
        (newest,) = fast.answer(waiting[2])
        assert isinstance(newest, RenderReply) and newest.rendered.image[..., 2].mean() > 150  # blue
        assert newest.timings.decode > 0
        (failed,) = careless.answer(broken)
        assert failed == Failed(1, failed.message, unreadable=True) and "not a readable image" in failed.message
        (render,) = calm.answer(fine)
        assert isinstance(render, RenderReply) and abs(render.rendered.image.mean() - 90) < 8
        assert sorted(decoded) == sorted([blue.image, b"not a picture", grey.image])  # red and green never
        assert service.stats().batches == {3: 1}  # the corrupt one was in the batch and failed alone
    finally:
        service.close()


def test_a_bank_change_or_turning_compare_on_replays_the_recent_snapshots_before_the_re_render(live):
    """A fresh bank is empty: the re-render after a bank change runs the page's last snapshots through it
    first (from an empty bank), so the render shown has the bank the new setting builds while drawing."""
    page = live.connect("replay")
    preset = next(iter(live.presets))
    engine_state = lambda: live.service.renderer.stream_state("replay")  # noqa: E731 - the echo engine's
    for seq in range(1, 4):
        answered(page, snapshot(seq, (40 * seq, 30, 30)))
    frames, resets = engine_state().frames_in, engine_state().bank_resets
    assert page.settings(Settings("", preset, 0.45, 4, 0, "dyme", True, True)) == []    # not the bank: once
    assert isinstance(page.rerender()[0], RenderReply)
    assert (engine_state().frames_in, engine_state().bank_resets) == (frames + 1, resets)
    assert page.settings(Settings("", preset, 0.45, 4, 0, "dyme", False, True)) == []   # EA off: replayed
    assert isinstance(page.rerender()[0], RenderReply)
    assert (engine_state().frames_in, engine_state().bank_resets) == (frames + 1 + 3, resets + 1)
    assert isinstance(page.rerender()[0], RenderReply)                                   # nothing new: once
    assert engine_state().frames_in == frames + 5

    assert page.settings(Settings("", preset, 0.45, 4, 0, "dyme", False, True, None, True)) == []  # compare on
    (reply,) = page.rerender()
    compared = live.service.renderer.compare_state("replay")
    assert compared.config.bank.mode == "none" and compared.frames_in == 3, "the comparison replays too"
    assert engine_state().config.bank.mode == "dyme" and engine_state().frames_in == frames + 5 + 3
    assert reply.rendered.compare_jpeg.startswith(b"\xff\xd8") and reply.rendered.compare_image is not None
    np.testing.assert_array_equal(reply.rendered.compare_image, reply.rendered.image)  # echo: the same snapshot

    (render,) = answered(page, snapshot(4))  # while comparing, every snapshot renders on both streams
    assert render.rendered.compare_jpeg and compared.frames_in == 4
    assert page.settings(Settings("", preset, 0.45, 4, 0, "dyme", False, True, None, False)) == []  # compare off
    (render,) = answered(page, snapshot(5))
    assert render.rendered.compare_jpeg == b"" and live.service.renderer.compare_state("replay") is None
