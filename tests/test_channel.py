"""The fast channel (ui.channel) through a real server and a Python WebSocket client.

The app runs in this process with the echo engine (bench.echo), whose render is
the snapshot itself, so a render's colour tells whose snapshot it shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading

import numpy as np
import pytest
from PIL import Image

websockets = pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from ui import wire  # noqa: E402
from bench.echo import EchoEngine  # noqa: E402
from ui.presets import load_presets  # noqa: E402
from ui.server import create_service, free_port, serve  # noqa: E402
from bench.channel_client import session_key  # noqa: E402

SIZE = 64
TIMEOUT = 20



@pytest.fixture(scope="module")
def app():
    service = create_service(EchoEngine(0), size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    yield service, running.url.replace("http://", "ws://") + "sv2v/ws"
    running.close()
    service.close()


def jpeg(colour, size=128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def open_channel(url: str, session: str):
    ws = connect(f"{url}?session={session}&key={session_key(session)}", open_timeout=TIMEOUT)
    ready = json.loads(ws.recv(TIMEOUT))
    assert ready["type"] == "ready" and (ready["width"], ready["height"]) == (SIZE, SIZE)
    return ws


def render(ws, seq: int, colour, **flags):
    """Send one snapshot; the decoded render and its header fields."""
    ws.send(wire.pack_snapshot(seq, 1000.0 + seq, jpeg(colour), **flags))
    message = ws.recv(TIMEOUT)
    assert isinstance(message, bytes), f"expected a render, got {message!r}"
    reply, shows, stamp, timings, skipped, picture = wire.unpack_render(message)
    with Image.open(io.BytesIO(picture)) as image:
        return np.asarray(image.convert("RGB")), reply, shows, stamp, timings


def near(pixels: np.ndarray, colour) -> bool:
    return np.abs(pixels.reshape(-1, 3).mean(axis=0) - np.array(colour)).max() < 12


def error_of(ws) -> dict:
    message = json.loads(ws.recv(TIMEOUT))
    assert message["type"] == "error", message
    return message


def test_a_snapshot_comes_back_as_its_render_with_timings(app):
    service, url = app
    with open_channel(url, "roundtrip") as ws:
        for seq, colour in enumerate([(200, 30, 30), (30, 200, 30)], start=1):
            picture, reply, shows, stamp, timings = render(ws, seq, colour, end=True)
            assert picture.shape == (SIZE, SIZE, 3) and near(picture, colour)
            assert (reply, shows, stamp) == (seq, seq, 1000.0 + seq)
            assert timings.total >= timings.model >= 0 and timings.decode >= 0
    assert service.renderer.stream_state("roundtrip").frames_in == 2
    assert service.recorded("roundtrip") == 2  # the channel records like the Gradio path


def test_settings_from_the_page_reach_the_fast_channel(app):
    service, url = app
    service.set_config("settings", service.base.replace(prompt="a watercolor", steps=2, strength=0.6))
    with open_channel(url, "settings") as ws:
        render(ws, 1, (10, 10, 200))
    config = service.renderer.stream_state("settings").config
    assert (config.prompt, config.steps, config.strength) == ("a watercolor", 2, 0.6)


def test_settings_travel_on_the_fast_channel_itself(app):
    """A settings message (what static/live.js sends on connecting and on every change) sets the stream's settings."""
    from ui.presets import load_presets
    from ui.settings import Settings

    service, url = app
    preset = next(iter(load_presets()))
    settings = Settings("a lighthouse", preset, 0.55, 3, 42, "queue", True, False)
    with open_channel(url, "ws-settings") as ws:
        ws.send(wire.settings_message(settings))
        render(ws, 1, (10, 200, 10))
        ws.send(wire.settings_message(Settings("a lighthouse", preset, 7.0, 3, 42, "queue", True, False)))
        error = error_of(ws)  # a bad value: said, and the settings stay as they were
        assert error["seq"] is None and "strength" in error["message"]
        render(ws, 2, (10, 200, 10))
    config = service.renderer.stream_state("ws-settings").config
    assert "a lighthouse" in config.prompt and (config.strength, config.steps, config.seed) == (0.55, 3, 42)
    assert (config.bank.mode, config.bank.extended_attention, config.bank.feature_fusion) == ("queue", True, False)


def test_with_compare_on_a_render_message_carries_the_render_without_the_bank(app):
    from ui.settings import Settings

    service, url = app
    preset = next(iter(load_presets()))
    with open_channel(url, "ws-compare") as ws:
        ws.send(wire.settings_message(Settings("", preset, 0.4, 4, 0, "dyme", True, True, None, True)))
        ws.send(wire.pack_snapshot(1, 1001.0, jpeg((200, 30, 30)), end=True))
        message = ws.recv(TIMEOUT)
        reply, shows, *_, picture = wire.unpack_render(message)
        compared = wire.unpack_compare(message)
        assert reply == shows == 1 and compared is not None
        for part in (picture, compared):  # echo: both sides show the snapshot
            with Image.open(io.BytesIO(part)) as image:
                assert near(np.asarray(image.convert("RGB")), (200, 30, 30))
        ws.send(wire.settings_message(Settings("", preset, 0.4, 4, 0, "dyme", True, True)))  # compare left out: off
        ws.send(wire.pack_snapshot(2, 1002.0, jpeg((30, 200, 30)), end=True))
        assert wire.unpack_compare(ws.recv(TIMEOUT)) is None
    assert service.renderer.compare_state("ws-compare") is None


@pytest.mark.parametrize("text", ['{"type": "settings", "subject": "x"}', '{"type": "hello"}', "[1, 2]"])
def test_text_that_is_not_a_whole_settings_message_closes_the_connection(app, text):
    _, url = app
    ws = open_channel(url, "bad-settings")
    ws.send(text)
    assert "settings" in error_of(ws)["message"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == 1003


def test_bad_pictures_and_order_get_an_error_and_the_connection_goes_on(app):
    _, url = app
    with open_channel(url, "bad-input") as ws:
        ws.send(wire.pack_snapshot(1, 0.0, b"not a picture at all"))
        assert "not a readable image" in error_of(ws)["message"]
        ws.send(wire.pack_snapshot(5, 0.0, jpeg((0, 0, 0))))
        assert isinstance(ws.recv(TIMEOUT), bytes)
        ws.send(wire.pack_snapshot(4, 0.0, jpeg((0, 0, 0))))
        error = error_of(ws)
        assert error["seq"] == 4 and "must increase" in error["message"]
        oversized = wire.pack_snapshot(6, 0.0, os.urandom(wire.MAX_SNAPSHOT_BYTES + 1))
        ws.send(oversized)
        error = error_of(ws)
        assert error["seq"] == 6 and "limit is 2 MB" in error["message"]
        picture, *_ = render(ws, 7, (250, 250, 0))
        assert near(picture, (250, 250, 0))


@pytest.mark.parametrize("message, code, text", [
    (b"GARBAGE" * 4, 1002, "bad magic"),
    (b"SV", 1002, "header"),
    (struct.pack("<2sBBId", b"SV", 9, 0, 1, 0.0) + b"x", 1002, "version 9"),
    ("hello", 1003, "binary"),
])
def test_a_malformed_message_is_refused_with_a_reason_and_a_clean_close(app, message, code, text):
    _, url = app
    ws = open_channel(url, "malformed")
    ws.send(message)
    assert text in error_of(ws)["message"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == code
    with open_channel(url, "malformed") as again:  # the server, and the session, carry on
        assert near(render(again, 1, (0, 0, 250))[0], (0, 0, 250))


def test_a_message_beyond_the_websocket_limit_closes_the_connection(app):
    _, url = app
    ws = open_channel(url, "huge")
    with pytest.raises(ConnectionClosed) as closed:
        ws.send(wire.pack_snapshot(1, 0.0, bytes(2 * wire.MAX_SNAPSHOT_BYTES + 10)))
        ws.recv(TIMEOUT)
    # 1009 (message too big); under load the server may close the socket while
    # the client is still sending, and then no close frame reaches it.
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    with open_channel(url, "huge") as again:  # the server and the session carry on
        assert near(render(again, 1, (180, 0, 0))[0], (180, 0, 0))


def test_a_bad_session_id_is_refused(app):
    _, url = app
    ws = connect(f"{url}?session=../../etc", open_timeout=TIMEOUT)
    assert "session" in error_of(ws)["message"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(TIMEOUT)
    assert closed.value.rcvd.code == 1008


def test_a_connection_dropped_mid_frame_harms_nobody(app):
    """Another page keeps rendering while a client vanishes halfway through a frame."""
    _, url = app
    with open_channel(url, "bystander") as bystander:
        render(bystander, 1, (0, 180, 0))
        raw = raw_channel(url, "dropper")
        # A masked binary frame announcing 1000 bytes, of which only 100 are sent.
        raw.sendall(bytes([0x82, 0x80 | 126]) + struct.pack(">H", 1000) + os.urandom(4) + os.urandom(100))
        raw.close()
        assert near(render(bystander, 2, (0, 0, 180))[0], (0, 0, 180))
    with open_channel(url, "dropper") as again:
        assert near(render(again, 1, (180, 0, 0))[0], (180, 0, 0))


def test_a_reconnect_continues_the_same_stream(app):
    service, url = app
    with open_channel(url, "reconnect") as ws:
        render(ws, 1, (100, 0, 0))
        render(ws, 2, (0, 100, 0))
    state = service.renderer.stream_state("reconnect")
    with open_channel(url, "reconnect") as ws:  # a new connection starts its sequence afresh
        render(ws, 1, (0, 0, 100))
    assert service.renderer.stream_state("reconnect") is state and state.frames_in == 3
    assert service.recorded("reconnect") == 3


def test_two_pages_drawing_at_once_never_get_each_others_renders(app):
    url = app[1]
    colours = {"red-page": (220, 20, 20), "blue-page": (20, 20, 220)}
    wrong: list = []

    def draw(session, colour):
        with open_channel(url, session) as ws:
            for seq in range(1, 16):
                picture, reply, *_ = render(ws, seq, colour)
                if not near(picture, colour) or reply != seq:
                    wrong.append((session, seq))

    threads = [threading.Thread(target=draw, args=item) for item in colours.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not wrong
    service, _ = app
    for session in colours:  # and each page drew into its own stream
        assert service.renderer.stream_state(session).frames_in == 15


def raw_channel(url: str, session: str, receive_buffer: int | None = None) -> socket.socket:
    """A bare TCP client that has done the WebSocket handshake and does nothing else by itself."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    raw = socket.socket()
    if receive_buffer:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(TIMEOUT)
    raw.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall((f"GET /sv2v/ws?session={session}&key={session_key(session)} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 101")
    return raw


def masked_frame(payload: bytes) -> bytes:
    """One client-to-server binary WebSocket frame (clients must mask)."""
    mask = os.urandom(4)
    body = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
    length = bytes([0x80 | 126]) + struct.pack(">H", len(payload)) if len(payload) < 65536 else \
        bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
    return bytes([0x82]) + length + mask + body


@pytest.fixture(scope="module")
def big_app():
    """An app rendering at 512²: renders of noise are ~150 KB, so a client that reads none backs up soon."""
    service = create_service(EchoEngine(0), size=512)
    running = serve(service, load_presets(), port=free_port(), block=False)
    yield service, running.url.replace("http://", "ws://") + "sv2v/ws"
    running.close()
    service.close()


def test_a_client_that_never_reads_its_renders_is_dropped_and_harms_nobody(big_app):
    """Its renders would pile up on the server: once its answers back up, it is disconnected."""
    service, url = big_app
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)).save(
        buffer, format="JPEG", quality=90)
    picture = buffer.getvalue()
    with connect(f"{url}?session=bystander-2&key={session_key('bystander-2')}", open_timeout=TIMEOUT) as bystander:
        bystander.recv(TIMEOUT)  # ready
        deaf = raw_channel(url, "deaf", receive_buffer=4096)
        deaf.settimeout(3)  # a server that stopped reading us shows as a send that cannot finish
        dropped = False
        for seq in range(1, 400):
            try:
                deaf.sendall(masked_frame(wire.pack_snapshot(seq, 0.0, picture)))
            except OSError:  # reset, or no longer read: the server hung up
                dropped = True
                break
        deaf.close()
        assert dropped, "the server kept taking snapshots from a client that reads nothing"
        frames = service.renderer.stream_state("deaf").frames_in
        assert frames < 399  # it stopped rendering for it
        bystander.send(wire.pack_snapshot(1, 0.0, jpeg((0, 120, 0))))
        _, _, _, _, _, shown = wire.unpack_render(bystander.recv(TIMEOUT))
        with Image.open(io.BytesIO(shown)) as image:
            assert near(np.asarray(image.convert("RGB")), (0, 120, 0))


def test_a_closed_session_frees_its_state_and_a_new_connection_starts_afresh(app):
    service, url = app
    with open_channel(url, "leaver") as ws:
        render(ws, 1, (10, 200, 10))
    folder = service.registry.get("leaver").recorder.folder
    assert folder.exists()
    service.close_session("leaver")  # what the page's unload does
    assert "leaver" not in service.registry and not folder.exists()
    with open_channel(url, "leaver") as ws:
        render(ws, 1, (10, 200, 10))
    assert service.renderer.stream_state("leaver").frames_in == 1


def test_a_restarted_stream_is_announced_once_and_the_recording_keeps_every_frame(app):
    from ui.live import RESTARTED_NOTICE

    service, url = app
    with open_channel(url, "restart") as ws:
        render(ws, 1, (200, 0, 0))
        render(ws, 2, (0, 200, 0))
        service.renderer.close("restart")  # the renderer lost the stream, as when its worker dies
        ws.send(wire.pack_snapshot(3, 1003.0, jpeg((0, 0, 200))))
        assert json.loads(ws.recv(TIMEOUT)) == {"type": "notice", "message": RESTARTED_NOTICE}
        reply, shows, _, _, _, picture = wire.unpack_render(ws.recv(TIMEOUT))
        assert (reply, shows) == (3, 3)
        picture, reply, shows, _, _ = render(ws, 4, (200, 200, 0))  # a render, no second notice
        assert near(picture, (200, 200, 0)) and (reply, shows) == (4, 4)
    assert service.recorded("restart") == 4
    assert service.renderer.stream_state("restart").frames_in == 2  # the fresh stream's own frames
