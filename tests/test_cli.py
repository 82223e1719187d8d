"""`python -m sv2v_core translate|metrics` end to end (sv2v_core/cli.py)."""

import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from sv2v_core import cli
from sv2v_core.cli import main, output_size
from sv2v_core.loader import DEFAULT_MODEL
from sv2v_core.video import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
FPS = Fraction(30000, 1001)
FRAMES = 6
SMALL = ["--model", "tiny", "--width", "64", "--height", "64", "--prompt", "a red fox"]


def scene(n=FRAMES, height=96, width=128, step=3):
    """A smooth random texture panning `step` pixels per frame."""
    rng = np.random.default_rng(0)
    big = rng.random((height, width + n * step, 3)).astype(np.float32) * 255
    big = cv2.normalize(cv2.GaussianBlur(big, (0, 0), 4), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return [np.ascontiguousarray(big[:, i * step : i * step + width]) for i in range(n)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("in") / "in.mp4", scene(), FPS)


def run_cli(*args):
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sv2v_core", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_video(path, count, fps, size):
    frames, info = read_video(path)
    frames = list(frames)
    assert len(frames) == count
    assert info.fps == fps
    assert frames[0].shape == (size[1], size[0], 3)


def test_translate_subprocess(clip, tmp_path):
    out = tmp_path / "out.mp4"
    done = run_cli("translate", clip, out, "--model", "tiny", "--width", "128", "--height", "128", "--prompt", "a fox")
    assert done.returncode == 0, done.stderr
    assert "not art" in done.stderr
    assert "model: tiny (named by whoever started it)" in done.stderr.splitlines()
    assert_video(out, FRAMES, FPS, (128, 128))
    assert done.stdout.startswith("wrote")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_without_a_model_the_cli_picks_by_the_app_s_rule_and_says_so(clip, tmp_path, capsys, monkeypatch):
    """One default-model rule (sv2v_core.loader.choose_model) for the app and the CLI: without a CUDA GPU
    both pick the built-in model, with one real weights, and print one line saying what and why."""
    from sv2v_core.loader import choose_model

    assert choose_model(None, cuda=True).model == DEFAULT_MODEL
    code = main(["translate", str(clip), str(tmp_path / "out.mp4"), "--width", "64", "--height", "64", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    expected = choose_model(None, cuda=False)
    assert f"model: {expected.model} ({expected.why})" in err.splitlines()


def test_translate_latency_mode_queue_bank_to_webm(clip, tmp_path, capsys):
    out = tmp_path / "out.webm"
    code = main(["translate", str(clip), str(out), *SMALL, "--mode", "latency", "--steps", "2",
                 "--bank", "queue", "--bank-size", "2", "--no-ff", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert_video(out, FRAMES, FPS, (64, 64))


def test_translate_without_bank(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["translate", str(clip), str(out), *SMALL, "--bank", "none", "--steps", "1", "--quiet"]) == 0
    assert_video(out, FRAMES, FPS, (64, 64))


def test_translate_with_the_builtin_controlnet(clip, tmp_path, capsys):
    """--controlnet conditions the render (scale 0 is the plain render; the
    default strength rises with a ControlNet)."""
    renders = {}
    runs = {"plain": [], "off": ["--controlnet", "tiny", "--control-scale", "0"], "on": ["--controlnet", "tiny"],
            "lines": ["--controlnet", "tiny", "--control-image", "lines"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.mp4"
        code = main(["translate", str(clip), str(out), *SMALL, "--mode", "latency", *extra])
        err = capsys.readouterr().err
        assert code == 0, err
        assert_video(out, FRAMES, FPS, (64, 64))
        renders[name] = np.stack(list(read_video(out)[0])).astype(int)
        if name != "plain":
            assert "ControlNet runs offline" in err
    assert np.array_equal(renders["off"], renders["plain"])  # scale 0: no ControlNet, the plain default strength
    assert np.abs(renders["on"] - renders["plain"]).mean() > 1
    assert np.abs(renders["lines"] - renders["on"]).mean() > 0.5  # canny (default) vs lines


@pytest.mark.parametrize("controlnet", ["missing.safetensors", "sv2v-nobody/no-controlnet"])
def test_an_unloadable_controlnet_is_one_line_in_a_subprocess(clip, tmp_path, controlnet):
    done = run_cli("translate", clip, tmp_path / "out.mp4", *SMALL, "--controlnet", controlnet, "--quiet")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line: no warning, no traceback
    assert done.stderr.startswith(f"error: could not load ControlNet '{controlnet}'")
    assert list(tmp_path.iterdir()) == []


def test_default_size_follows_the_input_aspect():
    assert output_size(128, 96, None, None, 64) == (512, 384)
    assert output_size(1920, 1080, None, None, 64) == (512, 320)
    assert output_size(1080, 1920, None, 256, 64) == (128, 256)
    assert output_size(640, 480, 320, None, 64) == (320, 256)
    assert output_size(64, 2000, None, None, 64) == (64, 512)
    with pytest.raises(cli.UsageError, match="multiple of 64"):
        output_size(128, 96, 100, None, 64)


def bad_inputs(tmp_path, clip):
    text = tmp_path / "text.mp4"
    text.write_text("not a video at all")
    half = tmp_path / "half.mp4"
    data = clip.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.mp4"
    return {
        "missing input": ([str(tmp_path / "missing.mp4"), str(out), *SMALL], 1),
        "text file": ([str(text), str(out), *SMALL], 1),
        "truncated": ([str(half), str(out), *SMALL], 1),
        "missing folder": ([str(clip), str(tmp_path / "no" / "out.mp4"), *SMALL], 1),
        "bad extension": ([str(clip), str(tmp_path / "out.txt"), *SMALL], 1),
        "strength": ([str(clip), str(out), *SMALL, "--strength", "5"], 2),
        "bank": ([str(clip), str(out), *SMALL, "--bank", "bogus"], 2),
        "dyme size": ([str(clip), str(out), *SMALL, "--bank-size", "3"], 2),
        "width": ([str(clip), str(out), *SMALL, "--width", "100"], 2),  # tiny needs multiples of 32
        "model": ([str(clip), str(out), *SMALL, "--model", "/nonexistent"], 1),
        "controlnet": ([str(clip), str(out), *SMALL, "--controlnet", str(tmp_path / "scribble.safetensors")], 1),
        "controlnet id": ([str(clip), str(out), *SMALL, "--controlnet", "lllyasviel/sd-controlnet-scribble"], 1),
        "control scale": ([str(clip), str(out), *SMALL, "--controlnet", "tiny", "--control-scale", "5"], 2),
        "scale alone": ([str(clip), str(out), *SMALL, "--control-scale", "1"], 2),
        "control image": ([str(clip), str(out), *SMALL, "--controlnet", "tiny", "--control-image", "depth"], 2),
    }


@pytest.mark.parametrize("case", ["missing input", "text file", "truncated", "missing folder", "bad extension",
                                  "strength", "bank", "dyme size", "width", "model", "controlnet", "controlnet id",
                                  "control scale", "scale alone", "control image"])
def test_bad_input_gives_one_error_line_and_no_output(case, clip, tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    args, status = bad_inputs(folder, clip)[case]
    before = set(folder.iterdir())
    code = main(["translate", *args, "--quiet"])
    err = capsys.readouterr().err
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert set(folder.iterdir()) == before  # no output, no temporary file


def test_ctrl_c_removes_the_partial_output(clip, tmp_path, monkeypatch, capsys):
    def interrupted(self, state, frames):
        yield np.zeros((64, 64, 3), np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.StreamV2V, "translate", interrupted)
    assert main(["translate", str(clip), str(tmp_path / "out.mp4"), *SMALL, "--quiet"]) == 130
    assert capsys.readouterr().err.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_metrics_prints_numbers(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SV2V_CLIP", raising=False)
    monkeypatch.delenv("SV2V_RAFT_WEIGHTS", raising=False)
    flicker = [np.clip(f.astype(int) + (40 if i % 2 else -40), 0, 255).astype(np.uint8) for i, f in enumerate(scene())]
    result = write_video(tmp_path / "flicker.mp4", flicker, FPS)

    assert main(["metrics", str(clip), str(clip)]) == 0
    steady = capsys.readouterr().out
    assert main(["metrics", str(clip), str(result)]) == 0
    flickering = capsys.readouterr().out

    def value(text):
        return float(re.search(r"warp error: ([0-9.]+)", text).group(1))

    # H.264 noise alone gives the steady video a small error; flicker a large one
    assert 5 * value(steady) < value(flickering) and value(flickering) > 100
    assert "DIS" in steady and "RAFT weights not found, used DIS" in steady
    assert "CLIP weights not found" in steady
