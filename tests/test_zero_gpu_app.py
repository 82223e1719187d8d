"""The app on a stand-in ZeroGPU: `python app.py --model tiny` with tests/fake_spaces on the path
and SPACES_ZERO_GPU=1, so every piece of model work runs in the stand-in's worker process, whose
arguments and results are pickled and which is replaced every few calls (a lost worker).  The
canvas (the API and a page on Gradio's events), the webcam render and the Video tab's translation.
And with the same package installed but SPACES_ZERO_GPU unset, the app is the app of any machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the app launcher lives beside this file
from test_app_api import images, render, start_app, stop_app  # noqa: E402,F401

FAKE_SPACES = Path(__file__).resolve().parent / "fake_spaces"
SIZE = 128


def start_on(tmp: Path, zero: str | None, replace_every: int = 0):
    """The app with the stand-in `spaces` importable and SPACES_ZERO_GPU=`zero` (None: unset)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(FAKE_SPACES))
        patch.setenv("FAKE_SPACES_REPLACE_EVERY", str(replace_every))
        if zero is None:
            patch.delenv("SPACES_ZERO_GPU", raising=False)
        else:
            patch.setenv("SPACES_ZERO_GPU", zero)
        return start_app(tmp, SIZE, "--render-mode", "latency")


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zero-app")


@pytest.fixture(scope="module")
def app_url(app_dir):
    process, url = start_on(app_dir, "true", replace_every=4)
    yield url
    stop_app(process)


def test_on_zero_gpu_the_api_renders_each_client_its_own_stream(app_url, app_dir, images):
    from gradio_client import Client

    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    renders = {name: [render(client, images[picture]) for picture in ("one", "two", "three")]
                for name, client in (("first", first), ("second", second))}
    for name in renders:
        assert all(image.shape == (SIZE, SIZE, 3) for image in renders[name])
    again = Client(app_url, verbose=False)  # the same pictures in the same order: the same renders
    for picture, expected in zip(("one", "two", "three"), renders["first"]):
        np.testing.assert_array_equal(render(again, images[picture]), expected)
    log = (app_dir / "app.log").read_text(errors="replace")
    assert "ZeroGPU" in log and "fast channel off" in log
    assert "Traceback" not in log


def test_on_zero_gpu_the_page_renders_through_gradio_events_and_the_webcam_tab(app_url):
    browser_tests = pytest.importorskip("test_browser")
    sync_api = browser_tests.sync_api
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(browser_tests.CHROMIUM),
                                             args=browser_tests.CHROMIUM_ARGS)
        try:
            def open_page():
                page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
                page.goto(app_url)
                page.wait_for_selector("#sv2v-canvas [data-ready='1']", timeout=60_000)
                return page

            page = open_page()
            page.get_by_role("button", name="Demo picture").click()
            assert browser_tests.wait_for(lambda: browser_tests.renders(page) >= 1, 90), "the canvas never rendered"
            assert page.evaluate("() => window.sv2vStats.channel") == "gradio"
        finally:
            browser.close()
    browser_tests.test_webcam_streams_renders(app_url)


def test_on_zero_gpu_the_video_tab_translates_a_video(tmp_path):
    """A fresh app on the stand-in, its worker replaced at every call: the Video tab's translation
    runs in the GPU worker, 8 frames a call, and gives a video of the input's length.  (The app
    reads the video's details first: a worker forked after that must not inherit decoder threads
    to free, tests/test_video.py.)"""
    from sv2v_core.video import read_video, write_video

    browser_tests = pytest.importorskip("test_browser")
    frames = [np.full((SIZE, SIZE, 3), 40 + 12 * i, np.uint8) for i in range(12)]
    source = write_video(tmp_path / "clip.mp4", frames, fps=8)
    process, url = start_on(tmp_path, "1", replace_every=1)
    try:
        with browser_tests.sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(browser_tests.CHROMIUM),
                                                 args=browser_tests.CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.get_by_role("tab", name="Video").click()
                page.locator("#sv2v-video-in input[type=file]").set_input_files(str(source))
                page.wait_for_selector("#sv2v-video-in video", timeout=60_000)
                page.get_by_role("button", name="Translate").click()
                page.wait_for_selector("#sv2v-video-out video[src]", timeout=180_000)
            finally:
                browser.close()
        translated = sorted((tmp_path / "gradio").rglob("translated-*.mp4"))  # Gradio's copy of the output
        log = (tmp_path / "app.log").read_text(errors="replace")
        assert "Traceback" not in log
        assert translated, "no translated video reached the page"
        rendered, _ = read_video(translated[-1], threaded=False)
        assert len(list(rendered)) == len(frames)
    finally:
        stop_app(process)


def test_with_spaces_installed_but_zero_gpu_unset_the_app_is_as_anywhere(tmp_path, images):
    from gradio_client import Client

    process, url = start_on(tmp_path, None)
    try:
        image = render(Client(url, verbose=False), images["one"])
        assert image.shape == (SIZE, SIZE, 3)
    finally:
        stop_app(process)
    log = (tmp_path / "app.log").read_text(errors="replace")
    assert "warm-up done" in log, "the warm-up was skipped"
    assert "ZeroGPU" not in log
    assert "fast channel off" not in log
