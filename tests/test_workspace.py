"""The artist's workspace in a real browser (Debian chromium through Playwright, as tests/test_browser.py).

- One screen: at 1280×720 and at 1920×1080, with the built-in model, the
  canvas and the render are side by side at the same size with their tops
  aligned, larger on the larger screen, and everything an artist changes
  while drawing is in view without scrolling; a screenshot of each (with
  SV2V_UPDATE_SCREENSHOT=1: docs/screenshot.png and docs/screenshot-1920.png,
  the README's pictures).  The dice and the history's bar move nothing.
- The render's state on the render (a mark: rendering, up to date, waiting
  for a pause or for the pen to lift), the brush outline, the figures in
  words ("idle" when idle).
- Every settings change re-renders once, from the keyboard too: arrow keys
  on Strength, a seed typed + Enter, a number typed + Enter in the
  conditioning box (the built-in `--controlnet tiny`).
- The bank at work: a bank change re-renders the drawing at once, after
  replaying the recent snapshots; compare shows the render with the bank and
  without it from the same snapshots, on both channels, and the other side's
  stream really has the bank off.
- An empty export says so on the page.

Most run on the echo engine (bench.echo: the render is the snapshot), served in
this process, so the service's streams can be checked from here.  Strokes are
short (software WebGL makes pointer moves slow) and nothing asserts on timing.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from tests.test_app_api import start_app, stop_app
from tests.test_browser import (
    ECHO_SIZE, ROOT, final_render_matches_canvas, open_advanced, open_page, picture,
    renders, sent, serve_echo, shown_render, stroke, stroke_until_rendered, wait_for,
)
from tests.test_browser import browser  # noqa: F401  (the fixture: a headless Chromium)
from ui.sessions import RECENT_SNAPSHOTS

SCREENS = {(1280, 720): ROOT / "docs" / "screenshot.png", (1920, 1080): ROOT / "docs" / "screenshot-1920.png"}
MARK = "#sv2v-render .sv2v-mark"
COMPARE = "Compare: with and without the bank"


@pytest.fixture(scope="module")
def tiny_url(tmp_path_factory):
    """`python app.py --model tiny` at its default size (what a newcomer runs)."""
    process, url = start_app(tmp_path_factory.mktemp("workspace-app"), None)
    yield url
    stop_app(process)


@pytest.fixture(scope="module")
def echo():
    url, service, stop = serve_echo("latency")
    yield url, service
    stop()


def in_view(page) -> dict:
    """What must be in view without scrolling: name -> its box."""
    settings = page.locator("#sv2v-settings")
    required = {
        "canvas": page.locator("canvas.sv2v-canvas"),
        "render": page.locator("#sv2v-render .sv2v-render-box"),
        "history": page.locator("#sv2v-render .sv2v-history"),
        "update policy": page.get_by_role("radiogroup", name="When to render"),
        "prompt": page.get_by_label("Subject (prompt)"),
        "style preset": settings.get_by_label("Style preset"),
        "strength": page.get_by_role("slider", name="range slider for Strength"),
        "seed": page.get_by_label("Seed"),
        "dice": page.locator("#sv2v-dice"),
        "figures": page.locator("#sv2v-render .sv2v-stats"),
        "compare": page.get_by_label(COMPARE),
        "pop-out": page.locator("#sv2v-popout a.sv2v-popout"),
    }
    return {name: locator.bounding_box() for name, locator in required.items()}


def test_one_screen_at_laptop_and_desktop_sizes_canvas_and_render_side_by_side(browser, tiny_url, tmp_path):
    update_readme = os.environ.get("SV2V_UPDATE_SCREENSHOT") == "1"
    sides = {}
    for (width, height), readme_picture in SCREENS.items():
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(tiny_url)
        page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
        page.get_by_role("button", name="Demo picture").click()
        assert wait_for(lambda: renders(page) >= 1, 60), "the demo picture was never rendered"
        boxes = in_view(page)
        for name, box in boxes.items():
            assert box is not None, f"{name} is not shown"
            assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width + 0.5 \
                and box["y"] + box["height"] <= height + 0.5, f"at {width}×{height}, {name} is out of view: {box}"
        canvas, render = boxes["canvas"], boxes["render"]
        assert abs(canvas["y"] - render["y"]) <= 3, f"the tops are {abs(canvas['y'] - render['y']):.0f} px apart"
        assert abs(canvas["width"] - render["width"]) <= 1 and abs(canvas["height"] - render["height"]) <= 1
        assert canvas["x"] + canvas["width"] <= render["x"], "the canvas and the render are not side by side"
        assert page.evaluate("() => window.scrollY") == 0
        sides[width] = canvas["width"]

        box = page.locator("canvas.sv2v-canvas").bounding_box()  # mid-stroke, for the README
        x, y = box["x"] + 0.2 * box["width"], box["y"] + 0.3 * box["height"]
        page.mouse.move(x, y)
        page.mouse.down()
        count = renders(page)
        for step in range(1, 6):
            page.mouse.move(x + step * 0.1 * box["width"], y + (step % 2) * 0.04 * box["height"])
        assert wait_for(lambda: renders(page) > count, 60), "nothing rendered mid-stroke"
        page.screenshot(path=str(readme_picture if update_readme else tmp_path / readme_picture.name))
        page.mouse.up()
        page.close()
    assert sides[1920] > 1.4 * sides[1280] and sides[1280] >= 400, f"the canvas does not scale with the window: {sides}"


def positions(page) -> dict:
    """Where the things around the render are (nothing may move when the history bar or the dice act)."""
    return {name: page.locator(selector).bounding_box() for name, selector in {
        "canvas": "canvas.sv2v-canvas", "render": "#sv2v-render .sv2v-render-box",
        "history": "#sv2v-render .sv2v-history", "figures": "#sv2v-render .sv2v-stats",
        "pop-out": "#sv2v-popout a.sv2v-popout", "settings": "#sv2v-settings"}.items()}


def test_the_dice_and_the_history_bar_move_nothing(browser, echo):
    url, service = echo
    page = open_page(browser, url, "ws", viewport=(1280, 720))
    stroke(page, [(60, 100), (250, 110), (450, 100)], "#dc1414")
    up_to_date(page)
    before, count = positions(page), renders(page)
    page.locator("#sv2v-dice").click()
    assert wait_for(lambda: renders(page) == count + 1, 30), "the new seed was not rendered"
    assert page.evaluate("() => window.scrollY") == 0 and positions(page) == before, "the dice moved the page"
    page.locator(".sv2v-history button").first.click()
    page.get_by_role("button", name="Back to live").wait_for(timeout=10_000)
    assert positions(page) == before, "the history's bar moved what is around it"
    page.get_by_role("button", name="Back to live").click()
    assert positions(page) == before


def mark(page) -> tuple[str, str]:
    """The render's state mark: (state, its words)."""
    return page.locator(MARK).get_attribute("data-state"), page.locator(MARK).inner_text().strip()


def up_to_date(page) -> None:
    """Wait until the page has nothing more to send and its last render is shown (the mark says so)."""
    assert wait_for(lambda: mark(page) == ("current", "up to date"), 30), mark(page)
    final_render_matches_canvas(page)


@pytest.mark.parametrize("channel", ["ws", "gradio"])
def test_the_mark_on_the_render_says_rendering_up_to_date_or_waiting(browser, echo, channel):
    url, service = echo
    page = open_page(browser, url, channel)
    assert mark(page)[0] == "" and page.locator(MARK).is_hidden(), "a mark before anything was drawn"

    release = threading.Event()
    holding = service.renderer.call(release.wait)  # the model is busy: the snapshot's render is on its way
    try:
        page.get_by_role("button", name="Fill").click()  # one snapshot, and nothing more to send
        assert wait_for(lambda: mark(page) == ("rendering", "rendering"), 10), mark(page)
    finally:
        release.set()
        holding.result(30)
    assert wait_for(lambda: mark(page) == ("current", "up to date"), 30), mark(page)

    page.get_by_label("on pen-up").check()
    box = page.locator("canvas.sv2v-canvas").bounding_box()
    page.mouse.move(box["x"] + 60, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 160, box["y"] + 310)
    assert wait_for(lambda: mark(page) == ("penup", "waiting for the pen to lift"), 10), mark(page)
    page.mouse.up()
    assert wait_for(lambda: mark(page) == ("current", "up to date"), 30), mark(page)

    page.get_by_label("on pause").check()
    seen = page.evaluate("""async () => {  // the drawing changes every 100 ms: the mark waits for a pause
      const live = document.querySelector("#sv2v-canvas [data-ready='1']").sv2vLive;
      const seen = [];
      for (let i = 0; i < 5; i++) {
        live.changed(false, false);
        await new Promise((r) => setTimeout(r, 100));
        seen.push(document.querySelector("#sv2v-render .sv2v-mark").innerText.trim());
      }
      return seen;
    }""")
    assert set(seen) == {"waiting for a pause"}, seen
    assert wait_for(lambda: mark(page) == ("current", "up to date"), 30), mark(page)


def test_the_brush_outline_and_the_figures_in_words(browser, echo):
    page = open_page(browser, echo[0], "ws")
    canvas = page.locator("canvas.sv2v-canvas")
    box = canvas.bounding_box()
    outline = page.locator("#sv2v-canvas .sv2v-brush")
    assert outline.is_hidden()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    scale = box["width"] / 512
    size = lambda: outline.bounding_box()["width"]  # noqa: E731
    assert outline.is_visible() and size() == pytest.approx(14 * scale, abs=1), "no outline at the brush's size"
    canvas.focus()
    page.keyboard.press("]")
    assert size() == pytest.approx(16 * scale, abs=1), "the outline does not follow the brush's size"
    centre = outline.bounding_box()
    assert abs(centre["x"] + centre["width"] / 2 - (box["x"] + 200)) <= 1.5, "the outline is not at the pointer"
    page.mouse.move(box["x"] - 40, box["y"] - 40)
    assert outline.is_hidden(), "the outline stays when the pointer leaves"

    figures = page.locator("#sv2v-render .sv2v-stats")
    assert figures.text_content() == "idle"
    stroke_until_rendered(page, moves=6)
    assert wait_for(lambda: "ms delay" in figures.text_content() and "steady" in figures.text_content(), 10), \
        figures.text_content()
    assert "renders/s" not in figures.text_content() and "latency" not in figures.text_content()
    assert wait_for(lambda: figures.text_content() == "idle", 15), "the figures keep old numbers when idle"


def test_arrow_keys_a_seed_typed_with_enter_and_a_preset_each_render_once(browser, echo):
    url, service = echo
    page = open_page(browser, url, "ws")
    session = page.evaluate("() => window.__gradio_session_hash__")
    stroke_until_rendered(page, moves=2)
    up_to_date(page)
    count = renders(page)
    page.get_by_role("slider", name="range slider for Strength").focus()
    for _ in range(3):  # as a person presses: a few a second
        page.keyboard.press("ArrowRight")
        time.sleep(0.15)
    assert wait_for(lambda: renders(page) == count + 1, 30), "arrow keys on Strength did not re-render"
    assert service.renderer.stream_state(session).config.strength == pytest.approx(0.55)
    time.sleep(1.0)
    assert renders(page) == count + 1, "three key presses rendered more than once"

    seed = page.get_by_label("Seed")
    seed.click()
    page.keyboard.press("Control+a")
    page.keyboard.type("4321")
    page.keyboard.press("Enter")
    assert wait_for(lambda: renders(page) == count + 2, 30), "a seed typed with Enter did not re-render"
    assert service.renderer.stream_state(session).config.seed == 4321
    time.sleep(1.0)
    assert renders(page) == count + 2, "typing a seed rendered more than once"

    page.get_by_label("Style preset").click()  # a preset sets the strength and the steps too: still once
    page.get_by_role("option", name="Watercolor").click()
    assert wait_for(lambda: renders(page) == count + 3, 30), "the preset did not re-render"
    assert "watercolor" in service.renderer.stream_state(session).config.prompt
    time.sleep(1.0)
    assert renders(page) == count + 3, "a preset rendered more than once"


def test_enter_in_the_conditioning_box_renders_once_with_the_built_in_controlnet(browser, tmp_path):
    process, url = start_app(tmp_path, 64, "--controlnet", "tiny")
    try:
        page = open_page(browser, url, "ws", viewport=(1280, 720))
        box = page.get_by_role("spinbutton", name="number input for Conditioning")
        for name, shown in {**in_view(page), "conditioning": box.bounding_box()}.items():  # one more in the row
            assert shown["y"] + shown["height"] <= 720 and shown["x"] + shown["width"] <= 1280, f"{name}: {shown}"
        stroke(page, [(60, 256), (250, 256), (450, 260)], "#1d3f8c")
        assert wait_for(lambda: mark(page) == ("current", "up to date"), 60), mark(page)
        before, count = shown_render(page), renders(page)
        box.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("0")
        page.keyboard.press("Enter")
        assert wait_for(lambda: renders(page) == count + 1, 60), "Enter in the conditioning box did not re-render"
        time.sleep(1.5)
        assert renders(page) == count + 1 and shown_render(page) != before, \
            "the conditioning change rendered more than once, or with the old scale"
    finally:
        stop_app(process)


def test_a_bank_change_re_renders_the_drawing_with_the_new_bank_at_once(browser, echo):
    url, service = echo
    page = open_page(browser, url, "ws")
    session = page.evaluate("() => window.__gradio_session_hash__")
    stroke(page, [(60, 100), (250, 110), (450, 100)])
    stroke(page, [(60, 300), (250, 310), (450, 300)])
    up_to_date(page)
    state = service.renderer.stream_state(session)
    frames, resets, count = state.frames_in, state.bank_resets, renders(page)
    open_advanced(page)
    page.get_by_label("queue", exact=True).check()
    assert wait_for(lambda: renders(page) == count + 1, 30), "the bank change was not rendered"
    state = service.renderer.stream_state(session)
    assert state.config.bank.mode == "queue"
    # The recent snapshots ran through the stream again, from an empty bank, before the drawing.
    assert state.bank_resets == resets + 1 and state.frames_in == frames + min(RECENT_SNAPSHOTS, sent(page))
    final_render_matches_canvas(page)


@pytest.mark.parametrize("channel", ["ws", "gradio"])
def test_compare_shows_the_render_with_the_bank_and_without_from_the_same_snapshots(browser, echo, channel):
    url, service = echo
    page = open_page(browser, url, channel)
    session = page.evaluate("() => window.__gradio_session_hash__")
    stroke(page, [(60, 100), (250, 110), (450, 100)], "#dc1414")
    up_to_date(page)
    count = renders(page)
    page.get_by_label(COMPARE).check()
    render_box = page.locator("#sv2v-render .sv2v-render-box")
    assert wait_for(lambda: render_box.get_attribute("data-compare") == "1", 30), "compare shows one render"
    banked, plain = service.renderer.stream_state(session), service.renderer.compare_state(session)
    assert banked.config.bank.mode == "dyme" and plain.config.bank.mode == "none", \
        "the other side's stream does not have the bank off"
    assert renders(page) == count + 1

    frames = banked.frames_in, plain.frames_in
    stroke(page, [(60, 380), (250, 390), (450, 380)], "#1414dc")
    up_to_date(page)
    assert banked.frames_in - frames[0] == plain.frames_in - frames[1] > 0, "the two streams got different frames"
    drawn = picture(page.evaluate("() => document.querySelector('canvas.sv2v-canvas').toDataURL()"), ECHO_SIZE)
    other = picture(page.evaluate("() => document.querySelector('canvas.sv2v-compare-canvas').toDataURL()"))
    assert np.abs(other - drawn).mean() < 6, "the render without the bank does not show the same snapshot"
    captions = page.locator("#sv2v-render .sv2v-caption")
    assert wait_for(lambda: all("flicker" in caption for caption in captions.all_inner_texts()), 10), \
        captions.all_inner_texts()
    assert "with the bank (dyme" in captions.all_inner_texts()[0] and "without the bank" in captions.all_inner_texts()[1]
    assert "built-in" in page.locator("#sv2v-render .sv2v-compare-note").inner_text()

    page.get_by_label(COMPARE).uncheck()
    stroke(page, [(60, 200), (250, 210)])
    up_to_date(page)
    assert render_box.get_attribute("data-compare") == "" and service.renderer.compare_state(session) is None


def test_an_empty_export_says_so_on_the_page(browser, echo):
    page = open_page(browser, echo[0], "ws")
    assert page.locator("#sv2v-export").count() == 0 or page.locator("#sv2v-export").is_hidden(), \
        "an empty download box takes room"
    page.get_by_role("button", name="Export", exact=True).click()
    assert wait_for(lambda: page.get_by_text("nothing has been rendered yet").count() > 0, 30), \
        "the page does not say why there is no video"
