"""Only its own pages: the fast channel checks where a connection comes from and whose key it has.

A browser sends the page's Origin: only the app's own (the Origin's host and
port are the request's Host) and those allowed with --allow-origin (a proxy,
an embedding page) get in; any other is refused before the WebSocket opens
(HTTP 403).  Every connection needs its session's key: a missing or wrong
key, or another session's, is refused (1008).  A client without an Origin
(not a browser) gets in with its key.  The pop-out view keeps working with
its own token.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from bench.channel_client import channel_url, session_key  # noqa: E402
from bench.echo import EchoEngine  # noqa: E402
from ui.live import Live, Refused  # noqa: E402
from ui.presets import load_presets  # noqa: E402
from ui.server import create_service, free_port, serve  # noqa: E402

TIMEOUT = 20
PROXY = "https://canvas.example.org"


@pytest.fixture(scope="module")
def app():
    service = create_service(EchoEngine(0), size=64)
    running = serve(service, load_presets(), port=free_port(), block=False, allowed_origins=[PROXY + "/"])
    yield service, running.url
    running.close()
    service.close()


def opened(url: str, session: str, *, key: str | None = None, origin: str | None = None) -> dict:
    """The first message a connection gets (the server's "ready", or why it is refused)."""
    with connect(channel_url(url, session, key), origin=origin, open_timeout=TIMEOUT) as ws:
        return json.loads(ws.recv(TIMEOUT))


def refused_with(url: str, session: str, key: str) -> tuple[str, int]:
    """The message and the close code of a connection the server refuses once it is open."""
    ws = connect(channel_url(url, session, key), open_timeout=TIMEOUT)
    message = json.loads(ws.recv(TIMEOUT))["message"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(TIMEOUT)
    return message, closed.value.rcvd.code


def test_the_app_s_own_pages_and_allowed_origins_get_in(app):
    _, url = app
    own = url.rstrip("/")  # http://127.0.0.1:PORT: what a page the app served sends
    assert opened(url, "own", origin=own)["type"] == "ready"
    assert opened(url, "proxied", origin=PROXY)["type"] == "ready"  # a proxy in front, its origin allowed
    assert opened(url, "script")["type"] == "ready"  # no Origin: not a browser; its key lets it in


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1:1", "null", "http://canvas.example.org"])
def test_a_foreign_origin_is_refused_before_the_socket_opens(app, origin):
    service, url = app
    with pytest.raises(InvalidStatus) as refused:
        opened(url, "victim", origin=origin)
    assert refused.value.response.status_code == 403


def test_a_missing_or_wrong_key_or_another_session_s_key_is_refused(app):
    _, url = app
    assert refused_with(url, "alice", "") == ("connect with the page's key (?key=...)", 1008)
    assert refused_with(url, "alice", "0" * 32) == ("the key is not this session's", 1008)
    assert refused_with(url, "alice", session_key("bob")) == ("the key is not this session's", 1008)
    assert opened(url, "alice")["type"] == "ready"  # with its own key


def test_keys_are_the_session_s_own_and_the_app_s_secret_s():
    live, other = Live(None, {}, secret=b"one"), Live(None, {}, secret=b"two")
    assert live.channel_key("alice") != live.channel_key("bob")
    assert live.channel_key("alice") != other.channel_key("alice")
    assert live.connect_channel("alice", live.channel_key("alice")).session_id == "alice"
    with pytest.raises(Refused):
        live.connect_channel("alice", other.channel_key("alice"))
    with pytest.raises(ValueError):
        live.channel_key("../../etc")


def test_allow_origin_takes_origins_only(capsys):
    from app import parse_args

    assert parse_args(["--allow-origin", PROXY, "--allow-origin", "http://localhost:8080"]).allow_origin == [
        PROXY, "http://localhost:8080"]
    with pytest.raises(SystemExit) as refused:
        parse_args(["--allow-origin", "canvas.example.org"])
    assert refused.value.code == 2 and "not an origin" in capsys.readouterr().err
