"""The pop-out view (ui.popout) and the canvas's ink layer as the control source, without a browser.

The app runs in this process with the echo engine (its render is the
snapshot itself), so a picture's colour tells whose drawing it shows.  The
browser side (the page's link, the view following a drawing) is in
test_browser.py.
"""

from __future__ import annotations

import gc
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

websockets = pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from ui import wire  # noqa: E402
from bench.echo import EchoEngine  # noqa: E402
from ui.inputs import parse_snapshot  # noqa: E402
from ui.feeds import ViewLinks  # noqa: E402
from ui.presets import load_presets  # noqa: E402
from ui.recording import Recorder  # noqa: E402
from ui.server import create_service, serve  # noqa: E402
from ui.sessions import SessionRegistry  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other test modules live beside this file
from ui.server import free_port  # noqa: E402
from bench.channel_client import session_key  # noqa: E402

SIZE = 64
TIMEOUT = 20


class InkEngine(EchoEngine):
    """The echo engine posing as one with a ControlNet: it keeps every control source it is given."""

    controlnet = "a stand-in"

    def __init__(self) -> None:
        super().__init__(0)
        self.controls: list[np.ndarray | None] = []

    def render(self, jobs):  # the app renders its batches through `render`
        for _, _, *control in jobs:
            self.controls.append(None if not control or control[0] is None else np.array(control[0]))
        return super().render(jobs)


@pytest.fixture(scope="module")
def app():
    engine = InkEngine()
    service = create_service(engine, size=SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    yield service, engine, running.url.replace("http://", "ws://")
    running.close()
    service.close()


def picture(colour, size=128, fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def open_view(url: str, token: str):
    ws = connect(url + "sv2v/view", open_timeout=TIMEOUT)
    ws.send(json.dumps({"token": token}))
    return ws


def test_view_tokens_are_per_session_unguessable_and_end_with_the_session(tmp_path):
    registry = SessionRegistry(lambda: Recorder(parent=str(tmp_path)))
    links = ViewLinks()
    a, b = registry.get("a"), registry.get("b")
    token = links.token_for(a)
    assert links.token_for(a) == token and links.token_for(b) != token
    assert len(token) >= 32 and "a" != token
    assert links.find(token) is a.feed
    for bad in ("", "nope", token + "x", None, 42, "x" * 10_000):
        assert links.find(bad) is None
    registry.close("a")
    assert links.find(token) is None, "a closed session's link still leads somewhere"
    b_token = links.token_for(b)
    del a, b
    registry.close("b")
    gc.collect()
    assert links.find(b_token) is None and len(links._feeds) == 0, "a dropped session's feed is still held"


def test_a_view_gets_its_own_sessions_renders_and_nothing_else(app):
    service, _, url = app
    red, blue = "view-red", "view-blue"
    with open_view(url, service.view_token(red)) as view_red, open_view(url, service.view_token(blue)) as view_blue:
        for view in (view_red, view_blue):
            assert json.loads(view.recv(TIMEOUT))["type"] == "ready"
        config = service.config_of(red)
        service.render(red, np.full((SIZE, SIZE, 3), (220, 20, 20), np.uint8), config)
        shown = decoded(view_red.recv(TIMEOUT))
        assert shown.shape == (SIZE, SIZE, 3) and np.abs(shown.mean(axis=(0, 1)) - (220, 20, 20)).max() < 12
        with pytest.raises(TimeoutError):  # the other session's view got nothing
            view_blue.recv(1.0)
        service.render(red, np.full((SIZE, SIZE, 3), (20, 220, 20), np.uint8), config)
        shown = decoded(view_red.recv(TIMEOUT))
        assert np.abs(shown.mean(axis=(0, 1)) - (20, 220, 20)).max() < 12, "the view did not follow the drawing"
    with open_view(url, service.view_token(red)) as late:  # a view opened later starts with the newest render
        assert json.loads(late.recv(TIMEOUT))["type"] == "ready"
        assert np.abs(decoded(late.recv(TIMEOUT)).mean(axis=(0, 1)) - (20, 220, 20)).max() < 12


@pytest.mark.parametrize("hello", [{"token": "made-up-token-made-up-token-made-up"}, {"token": "view-red"},
                                   {"nothing": 1}, "not json"])
def test_a_made_up_token_or_a_session_id_gets_an_error_and_no_picture(app, hello):
    service, _, url = app
    service.view_token("view-red")
    with connect(url + "sv2v/view", open_timeout=TIMEOUT) as ws:
        ws.send(hello if isinstance(hello, str) else json.dumps(hello))
        message = json.loads(ws.recv(TIMEOUT))
        assert message["type"] == "error" and "not valid" in message["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(TIMEOUT)
        assert closed.value.rcvd.code == 1008


def test_a_view_ends_when_its_session_ends(app):
    service, _, url = app
    token = service.view_token("leaving")
    with open_view(url, token) as view:
        assert json.loads(view.recv(TIMEOUT))["type"] == "ready"
        service.close_session("leaving")
        assert "ended" in json.loads(view.recv(TIMEOUT))["message"]
    with open_view(url, token) as again:
        assert json.loads(again.recv(TIMEOUT))["type"] == "error"


def test_the_view_page_is_served(app):
    import urllib.request

    _, _, url = app
    with urllib.request.urlopen(url.replace("ws://", "http://") + "view", timeout=TIMEOUT) as response:
        assert b"sv2v/view" in response.read()
        assert response.headers["Referrer-Policy"] == "no-referrer"


# -- the ink layer as the control source ------------------------------------------------

def test_the_ink_layer_travels_with_a_snapshot_on_both_channels():
    ink = picture((255, 255, 255), 32, "PNG")
    message = wire.unpack_snapshot(wire.pack_snapshot(3, 1.5, picture((9, 9, 9)), end=True, control=ink))
    assert (message.seq, message.end, message.control) == (3, True, ink) and decoded(message.image).shape[0] == 128
    assert wire.unpack_snapshot(wire.pack_snapshot(4, 0.0, picture((9, 9, 9)))).control is None
    for broken in (wire.SNAPSHOT_HEADER.pack(b"SV", 1, 4, 1, 0.0) + b"\x01",
                   wire.SNAPSHOT_HEADER.pack(b"SV", 1, 4, 1, 0.0) + wire.PICTURE_LENGTH.pack(99) + b"short"):
        with pytest.raises(wire.ProtocolError, match="length"):
            wire.unpack_snapshot(broken)
    import base64

    url = "data:image/png;base64," + base64.b64encode(ink).decode()
    snapshot = parse_snapshot(json.dumps({"image": url, "control": url, "seq": 1}))
    assert snapshot.control.shape == (32, 32, 3) and snapshot.control.min() == 255
    with pytest.raises(ValueError, match="control"):
        parse_snapshot(json.dumps({"image": url, "control": 5}))


def test_the_fast_channel_hands_the_ink_layer_to_the_engine_and_a_rerender_reuses_it(app):
    service, engine, url = app
    ink = np.zeros((128, 128, 3), np.uint8)
    ink[60:68, 10:120] = 255  # one white line on black
    buffer = io.BytesIO()
    Image.fromarray(ink).save(buffer, format="PNG")
    with connect(f"{url}sv2v/ws?session=inked&key={session_key('inked')}", open_timeout=TIMEOUT) as ws:
        assert json.loads(ws.recv(TIMEOUT))["type"] == "ready"
        engine.controls.clear()
        ws.send(wire.pack_snapshot(1, 0.0, picture((30, 60, 200)), end=True, control=buffer.getvalue()))
        assert isinstance(ws.recv(TIMEOUT), bytes)
    control = engine.controls[-1]
    assert control is not None and control.shape == (SIZE, SIZE, 3)  # at the render size
    assert control[30:34, 10:50].min() > 200 and control[:20].max() < 30
    service.rerender("inked")  # a settings change renders the same frame with the same ink
    assert np.array_equal(engine.controls[-1], control)


def test_with_a_controlnet_the_api_and_settings_carry_the_conditioning_scale(app):
    service, _, _ = app
    assert service.controlled and service.base.control_scale == 1.0 and service.base.strength == 0.6
    from ui.settings import make_config

    config = make_config(service.base, prompt="", strength=0.6, steps=2, seed=0, bank="dyme", ea=True, ff=True,
                         control_scale=0.25)
    assert config.control_scale == 0.25
    with pytest.raises(ValueError, match="control scale"):
        make_config(service.base, prompt="", strength=0.6, steps=2, seed=0, bank="dyme", ea=True, ff=True,
                    control_scale=7)
