"""The canvas in a real browser: Debian chromium driven by Playwright's Python API.

With the built-in model (`python app.py --model tiny`): draws a stroke and
checks that the render changes *before* the mouse button is released (live
rendering, not only at stroke end), undoes it, exports and downloads a video
that PyAV decodes, and saves a screenshot of the page in the middle of a
stroke into the test's temporary folder (the README's pictures come from
tests/test_workspace.py). The Webcam tab is driven by Chromium's synthetic
camera (--use-fake-device-for-media-stream).

With the echo engine (bench.echo: the render is the snapshot itself), served in
this process: both channels (the fast WebSocket channel, and the Gradio
event path forced with ?channel=gradio) render mid-stroke and end on a
render of the final canvas; two pages drawing different colours never see
each other's renders; a dropped connection falls back and reconnects.

Software WebGL makes every pointer move slow (0.2–0.4 s), so strokes are
short and nothing here asserts on latency; the measured latency is printed.
"""

from __future__ import annotations

import base64
import io
import socket
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the app launcher lives beside this file
from test_app_api import start_app, stop_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

if not CHROMIUM.exists():
    pytest.skip("Debian chromium (/usr/bin/chromium) is not installed", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    process, url = start_app(tmp_path_factory.mktemp("browser-app"), None)
    yield url
    stop_app(process)


@pytest.fixture()
def page(app_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
        page = context.new_page()
        page.goto(app_url)
        page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
        yield page
        browser.close()


def renders(page) -> int:
    return page.evaluate("() => (window.sv2vStats || {renders: 0}).renders")


def shown_render(page) -> str:
    """The render view's picture, as a data URL."""
    return page.evaluate("() => document.querySelector('canvas.sv2v-render-canvas').toDataURL()")


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def canvas_pixels(page) -> str:
    return page.evaluate("() => document.querySelector('canvas.sv2v-canvas').toDataURL()")


def open_advanced(page) -> None:
    """Open the "Advanced" section (the bank's controls, steps, the detailed figures) if it is closed."""
    if not page.locator("#sv2v-figures").count():
        page.locator("#sv2v-advanced").get_by_text("Advanced", exact=False).first.click()
        page.locator("#sv2v-figures .sv2v-figures").wait_for(timeout=10_000)


def detailed_figures(page) -> str:
    """The detailed figures line (under Advanced)."""
    open_advanced(page)
    return page.locator("#sv2v-figures .sv2v-figures").text_content()


def test_draw_live_undo_and_export(page, tmp_path):
    assert wait_for(lambda: page.evaluate("() => window.sv2vStats.channel") == "ws", 30), \
        "the page did not connect to the fast channel"
    page.get_by_role("button", name="Demo picture").click()
    assert wait_for(lambda: renders(page) >= 1, 60), "the demo picture was never rendered"
    before_stroke = canvas_pixels(page)
    shown_before = shown_render(page)
    count_before = renders(page)

    box = page.locator("canvas.sv2v-canvas").bounding_box()
    x, y = box["x"] + 120, box["y"] + 140
    shown = lambda: shown_render(page)  # noqa: E731
    page.mouse.move(x, y)
    page.mouse.down()
    # Draw with the button held until a changed render arrives (a few moves normally do).
    deadline, step = time.monotonic() + 45, 0
    while shown() == shown_before and time.monotonic() < deadline:
        step += 1
        if step <= 12:
            page.mouse.move(x + 25 * step, y + 15 * (step % 4))
        time.sleep(0.1)
    assert shown() != shown_before, "the render did not change while the stroke was still being drawn"
    assert renders(page) > count_before
    page.screenshot(path=str(tmp_path / "screenshot.png"))
    page.mouse.up()
    after_stroke = canvas_pixels(page)
    assert after_stroke != before_stroke

    count = renders(page)
    page.locator("canvas.sv2v-canvas").focus()
    page.keyboard.press("Control+z")
    assert canvas_pixels(page) == before_stroke, "undo did not restore the canvas"
    assert wait_for(lambda: renders(page) > count, 30), "the undone canvas was not rendered"
    page.keyboard.press("Control+Shift+z")
    assert canvas_pixels(page) == after_stroke, "redo did not bring the stroke back"

    latencies = page.evaluate("() => window.sv2vStats.latencies")
    print(f"browser snapshot-to-render latency (ms): {[round(v) for v in latencies]}"
          f" median {statistics.median(latencies):.0f}" if latencies else "no latency samples")

    page.get_by_role("button", name="Export", exact=True).click()
    link = page.locator("#sv2v-export a[download]").first
    link.wait_for(timeout=60_000)
    with page.expect_download() as info:
        link.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames >= 2


def test_tools_shortcuts_and_upload(page):
    canvas = page.locator("canvas.sv2v-canvas")
    canvas.focus()
    page.keyboard.press("e")
    assert "sv2v-active" in page.locator("[data-tool='eraser']").get_attribute("class")
    page.keyboard.press("b")
    assert "sv2v-active" in page.locator("[data-tool='brush']").get_attribute("class")
    blank = canvas_pixels(page)
    page.locator("input.sv2v-file").set_input_files(str(ROOT / "assets" / "start.png"))
    assert wait_for(lambda: canvas_pixels(page) != blank, 10), "the uploaded image was not drawn"
    assert wait_for(lambda: renders(page) >= 1, 60), "the uploaded image was not rendered"
    page.keyboard.press("Shift+Delete")
    assert wait_for(lambda: canvas_pixels(page) == blank, 10), "clear did not blank the canvas"


def test_webcam_streams_renders(app_url):
    """Chromium's synthetic camera streamed through the Webcam tab comes back rendered."""
    fake_camera = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + fake_camera)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1100}, permissions=["camera"])
            page = context.new_page()
            page.goto(app_url)
            page.get_by_role("tab", name="Webcam").click()
            page.get_by_role("button", name="Click to Access Webcam").click()
            page.wait_for_function("() => { const v = document.querySelector('video');"
                                   " return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=30_000)
            render = page.locator(".block:visible", has=page.get_by_text("Render", exact=True)).locator("img")
            assert render.count() == 0, "the render showed a picture before the webcam streamed"
            # Gradio's streaming webcam: a "Record" button (aria-label "capture photo") starts the stream.
            page.locator("button:visible", has_text="Record").click()
            shown = lambda: render.first.get_attribute("src") if render.count() else None  # noqa: E731
            assert wait_for(lambda: shown() is not None, 60), "no webcam render appeared"
            first = shown()
            assert wait_for(lambda: shown() not in (None, first), 60), "the webcam render never updated"
            assert wait_for(lambda: render.first.evaluate("img => img.complete && img.naturalWidth > 0"), 10), \
                "the webcam render is not a loadable image"
            print(f"webcam render {render.first.evaluate('img => [img.naturalWidth, img.naturalHeight]')}")
        finally:
            browser.close()


# -- both channels, with the echo engine -------------------------------------------------
ECHO_SIZE = 128
ECHO_MS = 20  # per frame: renders take a little while, as with a fast GPU
NO_RENDERS_BEFORE = "the page drew no render while the stroke was still being drawn"


def serve_echo(mode: str):
    """An app with the echo engine in this process: (url, service, stop)."""
    from bench.echo import EchoEngine
    from ui.presets import load_presets
    from ui.server import create_service, serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = create_service(EchoEngine(ECHO_MS), size=ECHO_SIZE, render_mode=mode)
    running = serve(service, load_presets(), port=port, block=False)
    return running.url, service, lambda: (running.close(), service.close())


@pytest.fixture(scope="module")
def echo_url():
    url, service, stop = serve_echo("latency")
    yield url, service
    stop()


@pytest.fixture(scope="module")
def echo_stream_url():
    url, _, stop = serve_echo("stream")
    yield url
    stop()


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


SETTLED = {  # what the render view's stats say once the page has picked its channel
    "ws": ["ws", ""],
    "gradio": ["gradio", "forced by ?channel=gradio"],
    "refused": ["gradio", "WebSocket refused"],
}


def open_page(browser, url: str, channel: str, viewport: tuple[int, int] = (1280, 1100)):
    """A page on `channel`: "ws", "gradio" (forced by the URL) or "refused" (its WebSocket is refused)."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    if channel == "refused":  # as a proxy that does not pass WebSockets: every connection closes at once
        page.route_web_socket("**/sv2v/ws*", lambda ws: ws.close(code=1006))
    page.goto(url + ("?channel=gradio" if channel == "gradio" else ""))
    page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
    settled = "() => window.sv2vStats && [window.sv2vStats.channel, window.sv2vStats.why]"
    assert wait_for(lambda: page.evaluate(settled) == SETTLED[channel], 30), \
        f"the page did not settle on the {channel} channel: {page.evaluate(settled)}"
    return page


def picture(data_url: str, size: int | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        image = image.convert("RGB")
        return np.asarray(image if size is None else image.resize((size, size), Image.Resampling.BILINEAR),
                          dtype=np.float32)


def set_colour(page, colour: str) -> None:
    page.evaluate("(c) => { const i = document.querySelector('input.sv2v-color'); i.value = c; }", colour)


def stroke_until_rendered(page, moves: int = 6) -> None:
    """Press, move, and keep the button down until a render of the stroke was drawn."""
    box = page.locator("canvas.sv2v-canvas").bounding_box()
    x, y = box["x"] + 100, box["y"] + 200
    page.mouse.move(x, y)
    page.mouse.down()
    count = renders(page)
    for step in range(1, moves + 1):
        page.mouse.move(x + 40 * step, y + 20 * (step % 3))
    assert wait_for(lambda: renders(page) > count, 30), NO_RENDERS_BEFORE
    page.mouse.up()


def final_render_matches_canvas(page) -> None:
    last = int(page.locator("canvas.sv2v-canvas").get_attribute("data-seq"))
    assert wait_for(lambda: page.evaluate("() => window.sv2vStats.shownSeq") >= last, 30), \
        "the last snapshot (the stroke's end) was never rendered"
    assert page.locator("canvas.sv2v-render-canvas").is_visible()
    assert page.locator(".sv2v-render-empty").is_hidden(), "the placeholder still covers the render"
    drawn = picture(canvas_pixels(page), ECHO_SIZE)
    shown = picture(shown_render(page))
    assert shown.shape == drawn.shape
    assert np.abs(shown - drawn).mean() < 6, "the last render does not show the final canvas"


@pytest.mark.parametrize("channel", ["ws", "gradio", "refused"])
def test_both_channels_render_mid_stroke_and_end_on_the_final_canvas(browser, echo_url, channel):
    page = open_page(browser, echo_url[0], channel)
    stroke_until_rendered(page)
    final_render_matches_canvas(page)
    label = detailed_figures(page)
    assert ("channel: WebSocket" in label) == (channel == "ws") and ("Gradio" in label) == (channel != "ws"), label
    print(f"{channel}: {renders(page)} renders, latencies (ms) "
          f"{[round(v) for v in page.evaluate('() => window.sv2vStats.latencies')]}")


def test_in_stream_mode_the_end_of_a_stroke_flushes_its_last_snapshot(browser, echo_stream_url):
    """Stream mode lags by steps - 1 frames: only the stroke's end snapshot (flushed) shows the final canvas."""
    page = open_page(browser, echo_stream_url, "ws")
    stroke_until_rendered(page)
    final_render_matches_canvas(page)


# Counts the pixels of every render drawn on this page that are close to `colour`.
WATCH_FOREIGN = """(colour) => {
  window.foreignPixels = 0;
  window.rendersSeen = 0;
  const canvas = new OffscreenCanvas(1, 1);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  document.addEventListener('sv2v:render', async (event) => {
    const bitmap = await createImageBitmap(event.detail.blob);
    canvas.width = bitmap.width; canvas.height = bitmap.height;
    ctx.drawImage(bitmap, 0, 0);
    const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - colour[0]) + Math.abs(data[i + 1] - colour[1]) + Math.abs(data[i + 2] - colour[2]) < 60)
        window.foreignPixels += 1;
    }
    window.rendersSeen += 1;
  });
}"""


def test_two_pages_drawing_at_once_only_ever_see_their_own_renders(browser, echo_stream_url):
    """In stream mode, where a render shows frames earlier in the page's own stream: shared
    streams would show the other page's strokes."""
    red, blue = open_page(browser, echo_stream_url, "ws"), open_page(browser, echo_stream_url, "ws")
    set_colour(red, "#dc1414")
    set_colour(blue, "#1414dc")
    red.evaluate(WATCH_FOREIGN, [20, 20, 220])
    blue.evaluate(WATCH_FOREIGN, [220, 20, 20])
    for page in (red, blue):
        box = page.locator("canvas.sv2v-canvas").bounding_box()
        page.mouse.move(box["x"] + 100, box["y"] + 100)
        page.mouse.down()
    for step in range(1, 6):  # interleaved strokes: both pages render at the same time
        for page in (red, blue):
            box = page.locator("canvas.sv2v-canvas").bounding_box()
            page.mouse.move(box["x"] + 100 + 50 * step, box["y"] + 100 + 30 * step)
    for page in (red, blue):
        page.mouse.up()
    for page in (red, blue):
        final_render_matches_canvas(page)
        assert page.evaluate("() => window.rendersSeen") >= 2
        assert page.evaluate("() => window.foreignPixels") == 0, "a page got a render of the other page's drawing"


def test_a_dropped_connection_falls_back_and_reconnects(browser, echo_url):
    page = open_page(browser, echo_url[0], "ws")
    stroke_until_rendered(page, moves=3)
    page.evaluate("() => document.querySelector(\"#sv2v-canvas [data-ready='1']\").sv2vLive.dropConnection()")
    assert wait_for(lambda: page.evaluate("() => window.sv2vStats.channel") == "gradio", 10)
    stroke_until_rendered(page, moves=3)  # drawn meanwhile: rendered through the Gradio path
    assert wait_for(lambda: page.evaluate("() => window.sv2vStats.channel") == "ws", 30), "no reconnect"
    stroke_until_rendered(page, moves=3)
    final_render_matches_canvas(page)


def test_settings_typed_on_the_page_reach_the_fast_channel(browser, echo_url):
    url, service = echo_url
    page = open_page(browser, url, "ws")
    page.get_by_label("Subject (prompt)").fill("a lighthouse at dusk")  # no Enter: still used by the next frame
    page.get_by_label("Style preset").click()
    page.get_by_role("option", name="Watercolor").click()
    session = page.evaluate("() => window.__gradio_session_hash__")
    prompt = lambda: service.config_of(session).prompt  # noqa: E731
    assert wait_for(lambda: "a lighthouse at dusk" in prompt() and "watercolor" in prompt(), 15), prompt()
    stroke_until_rendered(page, moves=2)
    final_render_matches_canvas(page)
    state = service.renderer.stream_state(session)
    assert state.config.prompt == prompt() and state.config.strength == 0.5  # the preset's strength


def test_the_page_sends_its_settings_on_the_fast_channel_itself(browser, echo_url):
    """On connecting and on every change, live.js sends the controls as a settings message (ui.wire)."""
    import json

    url, _ = echo_url
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    sent: list[dict] = []

    def watch(ws) -> None:
        if "/sv2v/ws" in ws.url:
            ws.on("framesent", lambda payload: sent.append(json.loads(payload)) if isinstance(payload, str) else None)

    page.on("websocket", watch)
    page.goto(url)
    page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)

    def seen(test) -> bool:
        page.wait_for_timeout(50)  # Playwright hands over the frames it saw while it runs
        return any(test(message) for message in sent)

    assert wait_for(lambda: seen(lambda m: m.get("type") == "settings"), 30), "no settings on connecting"
    page.get_by_label("Subject (prompt)").fill("a lighthouse at dusk")
    assert wait_for(lambda: seen(lambda m: m.get("subject") == "a lighthouse at dusk"), 15), sent[-3:]
    message = next(m for m in sent if m.get("subject") == "a lighthouse at dusk")
    assert set(message) == {"type", "subject", "preset", "strength", "steps", "seed", "bank", "ea", "ff",
                            "control_scale", "compare"}


def test_a_render_older_than_the_one_shown_is_never_drawn(browser, echo_url):
    """Renders that arrive out of order (say, a slow decode): the older one is dropped."""
    page = open_page(browser, echo_url[0], "ws")
    shown = page.evaluate("""async () => {
      const blob = async (colour) => {
        const c = new OffscreenCanvas(16, 16); const x = c.getContext('2d');
        x.fillStyle = colour; x.fillRect(0, 0, 16, 16);
        return await c.convertToBlob({type: 'image/jpeg', quality: 0.95});
      };
      const send = async (seq, colour) => document.dispatchEvent(new CustomEvent('sv2v:render', {detail:
        {blob: await blob(colour), seq, reply: seq, stamp: performance.now(), channel: 'ws', receivedAt: performance.now()}}));
      await send(1000005, '#00ff00');
      await new Promise((resolve) => setTimeout(resolve, 500));
      await send(1000003, '#ff0000');
      await new Promise((resolve) => setTimeout(resolve, 500));
      return window.sv2vStats.shownSeq;
    }""")
    assert shown == 1000005
    pixels = picture(shown_render(page))
    assert pixels.shape[:2] == (16, 16) and pixels[..., 1].mean() > 200 and pixels[..., 0].mean() < 60, \
        "an older render replaced a newer one"
    assert page.evaluate("() => window.sv2vStats.stale") == 1


# -- drawing assist: history, update policy, dice, pop-out, flicker, the ink layer -------------

def stroke(page, points, colour: str | None = None) -> None:
    """One stroke through `points` (canvas pixels of the 512² drawing), button released at the end."""
    if colour:
        set_colour(page, colour)
    box = page.locator("canvas.sv2v-canvas").bounding_box()
    scale = box["width"] / 512
    at = [(box["x"] + x * scale, box["y"] + y * scale) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point)
    page.mouse.up()


def sent(page) -> int:
    """How many snapshots the page has sent."""
    return int(page.locator("canvas.sv2v-canvas").get_attribute("data-seq") or 0)


def canvas_at(page, x: int, y: int) -> list[int]:
    return page.evaluate("([x, y]) => Array.from(document.querySelector('canvas.sv2v-canvas')"
                         ".getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))", [x, y])


def history_size(page) -> int:
    return page.locator(".sv2v-history button").count()


def test_history_click_keep_download_use_as_canvas_and_undo(browser, echo_url, tmp_path):
    page = open_page(browser, echo_url[0], "ws")
    page.context.set_default_timeout(30_000)
    stroke(page, [(60, 100), (250, 100), (450, 110)], "#dc1414")        # red, then wait for its end render
    assert wait_for(lambda: history_size(page) == 1, 30), "the stroke's end render did not enter the history"
    after_red = picture(canvas_pixels(page), ECHO_SIZE)
    stroke(page, [(60, 380), (250, 380), (450, 390)], "#1414dc")        # blue
    assert wait_for(lambda: history_size(page) == 2, 30)
    final_render_matches_canvas(page)
    count = renders(page)
    assert count > 2, "mid-stroke renders were drawn too; only the two ends are in the history"

    page.locator(".sv2v-history button").first.click()                  # show the red-only render large
    past = page.locator(".sv2v-render-past")
    assert past.is_visible() and past.bounding_box()["width"] > 300
    shown = picture(past.evaluate("img => { const c = document.createElement('canvas'); c.width = img.naturalWidth;"
                                  " c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);"
                                  " return c.toDataURL(); }"))
    assert np.abs(shown - after_red).mean() < 6, "the history does not show the first stroke's render"

    page.get_by_role("button", name="Keep", exact=True).click()
    assert "sv2v-kept" in page.locator(".sv2v-history button").first.get_attribute("class")
    assert page.get_by_role("button", name="Unkeep").is_visible()
    with page.expect_download() as info:
        page.get_by_role("button", name="Download PNG").click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (ECHO_SIZE, ECHO_SIZE)
        assert np.abs(np.asarray(png.convert("RGB"), np.float32) - shown).max() < 2

    before = canvas_pixels(page)
    page.get_by_role("button", name="Use as canvas").click()
    assert wait_for(lambda: page.locator("#sv2v-canvas [data-ready='1']").get_attribute("data-backgrounds") == "1", 10)
    assert past.is_hidden(), "the view did not go back to live"
    blue = canvas_at(page, 250, 380)
    assert blue[0] < 80 and blue[2] > 150, f"the ink (blue stroke) is gone: {blue}"
    page.keyboard.press("e")                                             # erase the blue stroke: the render shows
    stroke(page, [(40, 380), (250, 382), (470, 384)])                    # through (it has no blue stroke)
    assert min(canvas_at(page, 250, 380)) > 200, \
        "erasing the ink did not reveal the render underneath: the ink was flattened into the background"
    assert max(np.abs(np.array(canvas_at(page, 250, 100)) - (220, 20, 20))) < 40  # red: ink and background
    page.locator("canvas.sv2v-canvas").focus()
    page.keyboard.press("Control+z")                                     # undo the erasing
    page.keyboard.press("Control+z")                                     # undo "use as canvas"
    assert canvas_pixels(page) == before, "undo did not restore the canvas from before 'use as canvas'"
    kept = page.locator(".sv2v-history button.sv2v-kept")
    assert kept.count() == 1, "the kept render is gone"
    flicker = page.evaluate("() => window.sv2vStats.flicker")
    assert flicker and max(flicker) < 4, f"the echo engine's renders flicker where nothing was drawn: {flicker}"
    assert "flicker" in detailed_figures(page)


def test_on_pen_up_a_stroke_renders_once_and_on_pause_while_the_pen_rests(browser, echo_url):
    page = open_page(browser, echo_url[0], "ws")
    page.get_by_label("on pen-up").check()
    first_sent, first_renders = sent(page), renders(page)
    box = page.locator("canvas.sv2v-canvas").bounding_box()
    x, y = box["x"] + 60, box["y"] + 200
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 5):
        page.mouse.move(x + 40 * step, y + 10 * step)
    time.sleep(0.5)
    assert sent(page) == first_sent and renders(page) == first_renders, "rendered before the pen was lifted"
    page.mouse.up()
    assert wait_for(lambda: renders(page) > first_renders, 30), "the stroke was never rendered"
    time.sleep(0.5)
    assert (sent(page), renders(page)) == (first_sent + 1, first_renders + 1), "not exactly one render per stroke"
    final_render_matches_canvas(page)
    open_advanced(page)
    page.get_by_label("EA (extended attention)").uncheck()              # a settings change: rendered once
    assert wait_for(lambda: renders(page) == first_renders + 2, 30), "the settings change was not rendered"
    time.sleep(0.5)
    assert (sent(page), renders(page)) == (first_sent + 1, first_renders + 2)

    page.get_by_label("on pause").check()
    before = sent(page)
    page.evaluate("""async () => {  // the drawing changes every 100 ms for 0.8 s: nothing goes out meanwhile
      const live = document.querySelector("#sv2v-canvas [data-ready='1']").sv2vLive;
      for (let i = 0; i < 8; i++) { live.changed(false, false); await new Promise((r) => setTimeout(r, 100)); }
    }""")
    assert sent(page) == before, "on pause, a snapshot went out while the drawing was still changing"
    assert wait_for(lambda: sent(page) == before + 1, 10), "on pause, nothing went out once the drawing rested"
    count = renders(page)
    canvas = page.locator("canvas.sv2v-canvas")
    canvas.scroll_into_view_if_needed()  # the checkbox scrolled the page
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 60, box["y"] + 320)
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 330)
    assert wait_for(lambda: renders(page) > count, 30), "nothing was rendered while the pen rested"
    page.mouse.up()
    final_render_matches_canvas(page)


def test_the_dice_rolls_a_seed_shows_it_and_it_then_stays(browser, echo_url):
    url, service = echo_url
    page = open_page(browser, url, "ws")
    session = page.evaluate("() => window.__gradio_session_hash__")
    seed_box = page.get_by_label("Seed")
    stroke_until_rendered(page, moves=2)
    final_render_matches_canvas(page)
    count = renders(page)
    page.locator("#sv2v-dice").click()
    assert wait_for(lambda: seed_box.input_value() not in ("", "0"), 10), "the dice showed no new seed"
    seed = int(seed_box.input_value())
    assert wait_for(lambda: service.config_of(session).seed == seed, 10)
    assert wait_for(lambda: renders(page) == count + 1, 30), "the new seed was not rendered"
    stroke_until_rendered(page, moves=2)
    final_render_matches_canvas(page)
    assert int(seed_box.input_value()) == seed and service.renderer.stream_state(session).config.seed == seed, \
        "a fixed seed changed by itself"
    page.locator("#sv2v-dice").click()
    assert wait_for(lambda: seed_box.input_value() != str(seed), 10)


def view_state(view) -> tuple[str, int]:
    return tuple(view.evaluate("() => [document.body.dataset.state, Number(document.body.dataset.frames)]"))


def test_the_popout_view_follows_its_own_drawing_and_nothing_else(browser, echo_url):
    url, _ = echo_url
    drawer, other = open_page(browser, url, "ws"), open_page(browser, url, "ws")
    link = drawer.locator("#sv2v-popout a.sv2v-popout")
    link.wait_for(timeout=30_000)
    token = link.get_attribute("href").split("#", 1)[1]
    assert len(token) >= 32 and token != drawer.evaluate("() => window.__gradio_session_hash__")
    with drawer.context.expect_page() as opened:
        link.click()
    view = opened.value
    other_link = other.locator("#sv2v-popout a.sv2v-popout")
    other_link.wait_for(timeout=30_000)
    other_view = browser.new_page()
    other_view.goto(url + other_link.get_attribute("href"))
    made_up = browser.new_page()
    made_up.goto(url + "view#" + "A" * 32)
    assert wait_for(lambda: view_state(view)[0] == "ready" and view_state(other_view)[0] == "ready", 20)

    set_colour(drawer, "#dc1414")
    stroke_until_rendered(drawer, moves=3)
    final_render_matches_canvas(drawer)
    drawn = picture(canvas_pixels(drawer), ECHO_SIZE)
    shown = lambda: picture(view.evaluate("() => document.querySelector('canvas').toDataURL()"))  # noqa: E731
    assert wait_for(lambda: view_state(view)[1] >= 2 and shown().shape == drawn.shape
                    and np.abs(shown() - drawn).mean() < 6, 30), "the pop-out view does not show the drawing"
    assert view.locator("canvas").bounding_box()["width"] >= 1000, "the view is not full-window"
    assert view_state(other_view) == ("ready", 0), "another session's view got this session's render"
    assert view_state(made_up) == ("refused", 0) and "not valid" in made_up.locator("#message").text_content()


def test_with_a_controlnet_the_page_sends_its_ink_layer_whatever_the_background(browser):
    """The ControlNet's control source is the ink alone, white on black, on both channels; the slider shows."""
    from ui.server import free_port
    from test_popout import InkEngine
    from ui.presets import load_presets
    from ui.server import create_service, serve

    engine = InkEngine()
    service = create_service(engine, size=ECHO_SIZE)
    running = serve(service, load_presets(), port=free_port(), block=False)
    try:
        for channel in ("ws", "gradio"):
            page = open_page(browser, running.url, channel)
            assert page.get_by_role("slider", name="range slider for Conditioning").is_visible()
            assert page.get_by_role("spinbutton", name="number input for Strength").input_value() == "0.6"
            page.evaluate("() => { document.querySelector('input.sv2v-bg').value = '#204080'; }")
            page.get_by_role("button", name="Fill").click()
            stroke(page, [(60, 256), (250, 256), (450, 260)], "#f0e020")
            final_render_matches_canvas(page)
            control = engine.controls[-1]
            assert control is not None and control.shape == (ECHO_SIZE, ECHO_SIZE, 3)
            line, elsewhere = control[56:72, 30:100].max(axis=0), control[:40]  # the stroke: y 64 of 128
            assert line.min() > 150 and elsewhere.max() < 40, \
                f"{channel}: the control source is not the ink alone (white strokes on black)"
            page.close()
    finally:
        running.close()
        service.close()


FLICKER_CASE = """() => {
  const side = 8, cells = side * side;
  const grid = () => new Uint8ClampedArray(4 * cells).fill(255);
  const set = (a, x, y, v) => { const o = 4 * (y * side + x); a[o] = a[o + 1] = a[o + 2] = v; };
  const sketchBefore = grid(), sketchAfter = grid(), renderBefore = grid(), renderAfter = grid();
  set(sketchAfter, 0, 0, 155);           // a stroke in the corner cell
  set(renderAfter, 0, 0, 55);            // the render follows it there,
  set(renderAfter, 1, 1, 55);            // and next to it (the model's reach: not flicker),
  set(renderAfter, 7, 7, 225);           // and changes by 30 far away, where nothing was drawn: flicker
  const steady = window.sv2vFlicker(sketchBefore, sketchAfter, renderBefore, renderAfter, side);
  const everything = grid();
  for (let i = 0; i < cells; i++) set(everything, i % side, Math.floor(i / side), 0);
  return [steady, window.sv2vFlicker(sketchBefore, everything, renderBefore, renderAfter, side)];
}"""


def test_flicker_counts_only_where_the_drawing_did_not_change(browser, echo_url):
    page = open_page(browser, echo_url[0], "ws")
    steady, redrawn = page.evaluate(FLICKER_CASE)
    assert steady == pytest.approx(30 / 60), "flicker is the mean change over the 60 cells away from the stroke"
    assert redrawn is None, "a pair where the whole drawing changed has no steady part to measure"
    stroke_until_rendered(page, moves=3)
    final_render_matches_canvas(page)
    assert wait_for(lambda: "flicker " in detailed_figures(page), 10)
