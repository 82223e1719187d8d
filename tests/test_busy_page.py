"""The page when every place is taken: it says "busy: N people ahead of you" and gets in when one leaves.

A real headless Chromium (tests/test_browser.py's helpers) on an app in this
process with the echo engine and `max_sessions=1`, the one place held by a
Python client of the fast channel; on both channels.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_browser import ECHO_SIZE, browser, open_page, renders, wait_for  # noqa: E402,F401 (a fixture)


@pytest.fixture()
def full_app():
    from bench.echo import EchoEngine
    from ui.presets import load_presets
    from ui.server import create_service, serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = create_service(EchoEngine(5), size=ECHO_SIZE, max_sessions=1)
    running = serve(service, load_presets(), port=port, block=False)
    yield running.url, service
    running.close()
    service.close()


@pytest.mark.parametrize("channel", ["ws", "gradio"])
def test_a_page_that_finds_every_place_taken_says_so_and_gets_in_when_one_leaves(browser, full_app, channel):  # noqa: F811
    from tests.test_many_users import jpeg
    from bench.channel_client import ChannelClient

    url, service = full_app
    with ChannelClient(url, "holder", [jpeg((200, 0, 0), ECHO_SIZE)], depth=1) as holder:
        holder.start()
        assert holder.receive() == "render"
    page = open_page(browser, url, channel)
    box = page.locator("canvas.sv2v-canvas").bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 200, box["y"] + 240)
    page.mouse.up()
    message = page.locator("#sv2v-render .sv2v-message")
    assert wait_for(lambda: "busy: 0 people ahead of you" in (message.text_content() or ""), 30), \
        message.text_content()
    assert page.locator("#sv2v-render [data-busy='1']").count() == 1 and renders(page) == 0
    service.close_session("holder")  # the other artist leaves
    assert wait_for(lambda: renders(page) >= 1, 30), "the page never got in after the place freed"
    assert page.locator("#sv2v-render [data-busy]").count() == 0
    assert "busy" not in (message.text_content() or "")
