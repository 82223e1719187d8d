"""The app's named API endpoints, through gradio_client, against `python app.py --model tiny`.

One app process serves the whole module (start-up dominates the cost); every
test uses its own Client, i.e. its own session, stream and recording.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from ui.server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128  # render size for these tests (smaller than the app's default: faster on CPU)
SETTINGS = dict(strength=0.5, steps=2, seed=7, bank="dyme", ea=True, ff=True)



def start_app(tmp: Path, size: int | None, *extra: str, env: dict | None = None,
              wait: bool = True) -> tuple[subprocess.Popen, str]:
    """`python app.py --model tiny` on a free port, in its own process group; returns (process, url) once
    it answers (at once when not `wait`).

    size: the render size, or None for the app's default; extra: more options; env: its environment
    (None: this one, with Gradio's temporary folder under `tmp`).
    """
    port = free_port()
    if env is None:
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                   GRADIO_TEMP_DIR=str(tmp / "gradio"))
    log = open(tmp / "app.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "app.py", "--model", "tiny", "--port", str(port), *(["--size", str(size)] if size else []),
         *extra],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while wait and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited early:\n{(tmp / 'app.log').read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    if wait:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError("the app did not start within 180 s")
    return process, url


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    """The module's app's folder (its log is app.log)."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(app_dir):
    process, url = start_app(app_dir, SIZE)
    yield url
    stop_app(process)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Sketch-like test pictures, and a few awkward ones."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}

    def sketch(name, offset, size=(512, 512), mode="RGB"):
        image = Image.new("RGB", size, (255, 255, 255))
        pixels = np.asarray(image).copy()
        w, h = size
        pixels[h // 4 + offset: h // 2 + offset, w // 5: w // 2] = (30, 60, 160)
        pixels[h // 2: h // 2 + 12, w // 3 + offset: 4 * w // 5] = (200, 40, 30)
        path = folder / f"{name}.png"
        Image.fromarray(pixels).convert(mode).save(path)
        paths[name] = path

    sketch("one", 0)
    sketch("two", 30)
    sketch("three", 60)
    sketch("gray_odd", 10, size=(123, 77), mode="L")
    sketch("rgba", 20, size=(300, 200), mode="RGBA")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    paths["corrupt"] = folder / "corrupt.png"
    Image.new("RGB", (5000, 8), (255, 255, 255)).save(folder / "huge.png")
    paths["huge"] = folder / "huge.png"
    return paths


def render(client: Client, path: Path, prompt: str = "a house", **changes) -> np.ndarray:
    settings = {**SETTINGS, **changes}
    result = client.predict(handle_file(str(path)), prompt, settings["strength"], settings["steps"],
                            settings["seed"], settings["bank"], settings["ea"], settings["ff"], api_name="/render")
    with Image.open(result) as image:
        return np.asarray(image.convert("RGB"))


def test_api_lists_the_named_endpoints(app_url):
    endpoints = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/render", "/reset_bank", "/export"} <= set(endpoints)


def test_render_returns_an_image_of_the_render_size(app_url, images):
    client = Client(app_url, verbose=False)
    out = render(client, images["one"])
    assert out.shape == (SIZE, SIZE, 3)
    assert out.std() > 1.0  # a picture, not a blank


def test_awkward_but_valid_images_render(app_url, images):
    client = Client(app_url, verbose=False)
    for name in ("gray_odd", "rgba"):
        assert render(client, images[name], prompt="").shape == (SIZE, SIZE, 3)


def test_two_clients_keep_separate_streams(app_url, images):
    """B's output must not depend on what A does meanwhile: compare with C, who replays B alone."""
    a, b, c = (Client(app_url, verbose=False) for _ in range(3))
    render(b, images["one"], prompt="a sepia house")
    render(a, images["one"], prompt="a watercolor garden", seed=1)
    a.predict(api_name="/reset_bank")
    render(a, images["three"], prompt="an ink drawing")
    b_second = render(b, images["two"], prompt="a sepia house")

    render(c, images["one"], prompt="a sepia house")
    c_second = render(c, images["two"], prompt="a sepia house")
    assert np.abs(b_second.astype(int) - c_second.astype(int)).max() <= 1


PAGE_DEFAULTS = dict(strength=0.4, steps=4, seed=0, bank="dyme", ea=True, ff=True)


def api_defaults(url: str) -> dict:
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    return {p["parameter_name"]: p["parameter_default"] for p in info["named_endpoints"]["/render"]["parameters"]
            if p["parameter_has_default"]}


def test_render_needs_only_the_image_the_rest_are_the_pages_defaults(app_url, images):
    assert api_defaults(app_url) == {"prompt": "", **PAGE_DEFAULTS, "control_scale": 0}
    explicit = render(Client(app_url, verbose=False), images["one"], **PAGE_DEFAULTS)
    short = Client(app_url, verbose=False).predict(handle_file(str(images["one"])), "a house", api_name="/render")
    with Image.open(short) as image:
        assert np.abs(np.asarray(image.convert("RGB")).astype(int) - explicit.astype(int)).max() <= 1
    bare = Client(app_url, verbose=False).predict(handle_file(str(images["one"])), api_name="/render")
    with Image.open(bare) as image:
        assert image.size == (SIZE, SIZE)
    with pytest.raises(Exception, match="no ControlNet"):
        Client(app_url, verbose=False).predict(handle_file(str(images["one"])), "", 0.4, 4, 0, "dyme", True, True,
                                               1.0, api_name="/render")


def test_with_the_builtin_controlnet_the_api_conditions_on_the_drawing(tmp_path, images):
    """--controlnet tiny: strength 0.6 and scale 1.0 by default; scale 0 is plain img2img, 1 pulls toward the lines."""
    process, url = start_app(tmp_path, 64, "--controlnet", "tiny")
    try:
        assert api_defaults(url) == {"prompt": "", **PAGE_DEFAULTS, "strength": 0.6, "control_scale": 1.0}

        def conditioned(scale):
            path = Client(url, verbose=False).predict(handle_file(str(images["one"])), "", 0.6, 4, 0, "dyme",
                                                      True, True, scale, api_name="/render")
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")).astype(int)

        assert np.abs(conditioned(0.0) - conditioned(1.0)).mean() > 1.0, "the ControlNet changed nothing"
        with pytest.raises(Exception, match="control scale"):
            conditioned(5.0)
    finally:
        stop_app(process)


@pytest.mark.parametrize("args, code, message", [
    (["--model", "tiny", "--controlnet", "/nowhere/scribble.safetensors"], 1, "cannot start: could not load ControlNet"),
    (["--model", "tiny", "--controlnet", "lllyasviel/control_v11p_sd15_scribble"], 1, "cannot start:"),
    (["--model", "tiny", "--control-scale", "0.5"], 2, "--control-scale needs --controlnet"),
])
def test_a_controlnet_that_cannot_be_used_stops_the_start_with_one_line(args, code, message):
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "app.py", *args, "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == code
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert message in last, done.stderr[-2000:]


def test_export_returns_a_video_with_one_frame_per_render(app_url, images):
    client = Client(app_url, verbose=False)
    for name in ("one", "two", "three"):
        render(client, images[name])
    mp4 = client.predict("mp4", "timelapse", True, api_name="/export")
    with av.open(mp4) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 3
    assert frames[0].shape == (SIZE, 2 * SIZE, 3)  # sketch beside render
    gif = client.predict("gif", "timelapse", False, api_name="/export")
    with av.open(gif) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3
    real = client.predict("mp4", "real", False, api_name="/export")
    with av.open(real) as container:
        assert sum(1 for _ in container.decode(video=0)) >= 3


def test_export_before_any_render_is_a_clear_error_and_one_line_in_the_log(app_url, app_dir):
    client = Client(app_url, verbose=False)
    logged = (app_dir / "app.log").stat().st_size
    with pytest.raises(Exception, match="nothing has been rendered"):
        client.predict("mp4", "timelapse", False, api_name="/export")
    time.sleep(0.5)  # the log is written by the app's process
    with open(app_dir / "app.log", "rb") as log:
        log.seek(logged)
        lines = log.read().decode(errors="replace").splitlines()
    assert len(lines) == 1 and "export" in lines[0] and "nothing has been rendered" in lines[0], lines


def test_export_keeps_its_old_calls_and_takes_keep_pauses(app_url, images):
    client = Client(app_url, verbose=False)
    render(client, images["one"])
    time.sleep(2.5)  # a pause between two renders: shortened to MAX_PAUSE_SECONDS unless kept
    render(client, images["two"])
    lengths = {}
    for keep in (False, True):
        video = client.predict("mp4", "real", False, keep, api_name="/export")
        with av.open(video) as container:
            lengths[keep] = sum(1 for _ in container.decode(video=0))
    assert lengths[False] <= 1 + 25 * 1.0 + 1 < lengths[True], lengths  # 25 fps: REAL_PACE_FPS


@pytest.mark.parametrize(
    "image, changes, message",
    [
        ("corrupt", {}, "not a readable image"),
        ("huge", {}, "limit"),
        ("one", {"strength": 5.0}, "strength"),
        ("one", {"steps": 0}, "steps"),
        ("one", {"bank": "everything"}, "bank"),
        ("one", {"seed": -3}, "seed"),
    ],
)
def test_bad_input_is_an_error_and_the_session_keeps_working(app_url, images, image, changes, message):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match=f"(?i){message}"):
        render(client, images[image], **changes)
    assert render(client, images["one"]).shape == (SIZE, SIZE, 3)


def test_without_the_fast_channel_gradio_serves_the_page_and_the_api(tmp_path, images):
    """--no-fast-channel (what ZeroGPU gets): Gradio's own server, no WebSocket route, the API as before."""
    process, url = start_app(tmp_path, 64, "--no-fast-channel")
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"StreamV2V Canvas" in page.read()
        websockets = pytest.importorskip("websockets")
        from websockets.sync.client import connect

        with pytest.raises(websockets.exceptions.InvalidStatus):  # no such route: pages use Gradio's events
            connect(url.replace("http://", "ws://") + "sv2v/ws?session=abc", open_timeout=10)
        with urllib.request.urlopen(url + "view", timeout=10) as page:  # the pop-out view is served all the same
            assert b"sv2v/view" in page.read()
        with connect(url.replace("http://", "ws://") + "sv2v/view", open_timeout=10) as view:
            view.send('{"token": "made-up"}')
            assert "not valid" in view.recv(10)
        assert render(Client(url, verbose=False), images["one"]).shape == (64, 64, 3)
    finally:
        stop_app(process)


# -- the pieces behind the endpoints, without a server ---------------------------

def test_recorder_spills_to_disk_and_exports_every_frame(tmp_path):
    from ui.recording import Recorder, export_video

    recorder = Recorder(keep_in_memory=2, parent=str(tmp_path))
    for i in range(7):
        frame = np.full((64, 64, 3), i * 30, np.uint8)
        assert recorder.add(frame, np.full((32, 32, 3), 255, np.uint8), t=i * 0.1)
    assert len(list(recorder.folder.glob("*-render.jpg"))) == 5  # all but the newest two on disk
    frames = list(recorder.frames())
    assert [round(f.t, 1) for f in frames] == [round(i * 0.1, 1) for i in range(7)]
    assert abs(int(frames[3].render.mean()) - 90) <= 2
    out = export_video(recorder, tmp_path / "lapse.mp4", pace="timelapse", side_by_side=True)
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 7 and decoded[0].shape == (64, 128, 3)
    real = export_video(recorder, tmp_path / "real.mp4", pace="real", fps=20)
    with av.open(str(real)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 13  # 0.6 s at 20 fps, both ends included
    recorder.add(np.zeros((64, 64, 3), np.uint8), t=600.0)  # ten minutes later: a long pause, then one more
    recorder.add(np.zeros((64, 64, 3), np.uint8), t=600.1)
    real = export_video(recorder, tmp_path / "pause.mp4", pace="real", fps=20)
    with av.open(str(real)) as container:  # the pause is one second (MAX_PAUSE_SECONDS): 0.6 + 1 + 0.1 s
        assert sum(1 for _ in container.decode(video=0)) == 35
    kept = export_video(recorder, tmp_path / "kept.mp4", pace="real", fps=2, keep_pauses=True)
    with av.open(str(kept)) as container:  # ten minutes at 2 fps
        assert sum(1 for _ in container.decode(video=0)) == 1202
    folder = recorder.folder
    recorder.close()
    assert not folder.exists()


def test_registry_evicts_idle_sessions_and_frees_them(tmp_path):
    from ui.recording import Recorder
    from ui.sessions import SessionRegistry

    now = [0.0]
    registry = SessionRegistry(lambda: Recorder(parent=str(tmp_path)), idle_timeout=10, clock=lambda: now[0])
    first = registry.get("a")
    assert registry.get("a") is first and registry.get("b") is not first
    now[0] = 5.0
    registry.get("b")
    now[0] = 12.0
    assert registry.evict_idle() == ["a"]
    assert "a" not in registry and "b" in registry and not first.recorder.folder.exists()
    registry.close("b")
    assert len(registry) == 0


def test_video_translation_keeps_length_and_aspect(tmp_path):
    from sv2v_core.config import StreamConfig
    from sv2v_core.engine import StreamV2V
    from sv2v_core.models import load_components
    from sv2v_core.video import probe_video, write_video
    from ui.recording import Recorder
    from ui.service import CanvasService
    from ui.sessions import SessionRegistry

    source = tmp_path / "in.mp4"
    frames = [np.full((72, 128, 3), (20 * i, 120, 200), np.uint8) for i in range(6)]
    write_video(source, frames, fps=12)
    engine = StreamV2V(load_components("tiny"))
    service = CanvasService(engine, SessionRegistry(Recorder), StreamConfig(width=128, height=128, steps=2, strength=0.5))
    done = []
    out = service.translate_video(str(source), service.base, tmp_path / "out.mp4", lambda d, t: done.append(d))
    info = probe_video(out)
    assert (info.frame_count, info.width, info.height) == (6, 128, 64)  # aspect kept, sides a multiple of 64
    assert done[-1] == 6
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        service.translate_video(str(tmp_path / "junk.mp4"), service.base, tmp_path / "junk-out.mp4")
