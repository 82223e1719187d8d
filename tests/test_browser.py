"""The canvas in a real browser: Debian chromium driven by Playwright's Python API.

Draws a stroke and checks that the render changes *before* the mouse button
is released (live rendering, not only at stroke end), undoes it, exports and
downloads a video that PyAV decodes, and saves a screenshot of the page in
the middle of a stroke (with SV2V_UPDATE_SCREENSHOT=1 into docs/screenshot.png,
the README's picture; otherwise into the test's temporary folder). The Webcam tab
is driven by Chromium's synthetic camera (--use-fake-device-for-media-stream).

Software WebGL makes every pointer move slow (0.2–0.4 s), so strokes are
short and nothing here asserts on latency; the measured latency is printed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import sys

import av
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the app launcher lives beside this file
from test_app_api import start_app, stop_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
README_SCREENSHOT = ROOT / "docs" / "screenshot.png"
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


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def canvas_pixels(page) -> str:
    return page.evaluate("() => document.querySelector('canvas.sv2v-canvas').toDataURL()")


def test_draw_live_undo_and_export(page, tmp_path):
    page.get_by_role("button", name="Demo picture").click()
    assert wait_for(lambda: renders(page) >= 1, 60), "the demo picture was never rendered"
    before_stroke = canvas_pixels(page)
    shown_before = page.locator("img.sv2v-render-img").get_attribute("src")
    count_before = renders(page)

    box = page.locator("canvas.sv2v-canvas").bounding_box()
    x, y = box["x"] + 120, box["y"] + 140
    shown = lambda: page.locator("img.sv2v-render-img").get_attribute("src")  # noqa: E731
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
    update_readme = os.environ.get("SV2V_UPDATE_SCREENSHOT") == "1"
    page.screenshot(path=str(README_SCREENSHOT if update_readme else tmp_path / "screenshot.png"))
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
