"""The benchmark's CPU smoke test: the tiny model at a small size, a few
frames, every row; JSON and markdown written, ratios computed.  No timing
assertions (CPU timings on a shared machine mean little)."""

import json

import numpy as np
import pytest

from sv2v_core import bench, images
from sv2v_core.config import BankConfig


def test_synthetic_frames_move_without_looking_like_a_scene_cut():
    frames = bench.synthetic_frames(6, 64)
    for a, b in zip(frames, frames[1:]):
        similarity = images.similarity(images.thumbnail(a), images.thumbnail(b))
        assert 0.8 < similarity < 0.995  # never skipped, never a bank reset
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)


def test_warmup_fills_the_bank():
    cpu = bench.torch.device("cpu")
    assert bench.default_warmup(BankConfig(mode="queue", size=4), cpu, False) == 4 * 3 + 2
    assert bench.default_warmup(BankConfig(mode="dyme"), cpu, False) == 4 + 2
    assert bench.default_warmup(BankConfig(mode="none"), bench.torch.device("cuda"), False) == 10


@pytest.mark.parametrize("interleave", ["--interleave", "--no-interleave"])
def test_bench_writes_every_row_with_ratios(tmp_path, interleave, capsys):
    code = bench.main(["--model", "tiny", "--size", "64", "--steps", "2", "--frames", "2", "--warmup", "1",
                       "--device", "cpu", interleave, "--output", str(tmp_path), "--quiet"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    assert [(r["key"], r["mode"]) for r in rows] == [(k, m) for m in ("stream", "latency") for k in bench.ROWS]
    for row in rows:
        assert row["fps"] > 0 and row["latency_median_ms"] > 0 and row["latency_p95_ms"] >= row["latency_median_ms"]
        assert row["ratio_time"] is not None and row["ratio_time"] > 0
        assert row["frames"] == 2 and row["steps"] == 2
    for mode in ("stream", "latency"):
        by_key = {r["key"]: r for r in rows if r["mode"] == mode}
        assert by_key["none"]["ratio_time"] == 1.0
        assert by_key["none"]["bank_mib"] == 0
        assert by_key["dyme1"]["bank_mib"] > 0 and by_key["queue1"]["bank_mib"] > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert "| DyMe(1) |" in markdown and "| queue(4) |" in markdown and "time / no bank" in markdown
    assert "2-step LCM, stream batch" in markdown and "2-step LCM, latency mode" in markdown
    assert "| DyMe(1) |" in capsys.readouterr().out


def test_bench_profile_and_peer(tmp_path, capsys):
    code = bench.main(["--model", "tiny", "--size", "64", "--steps", "1", "--modes", "stream", "--rows", "none",
                       "dyme1", "--frames", "1", "--warmup", "1", "--profile", "--profile-frames", "1", "--peer",
                       "--device", "cpu", "--output", str(tmp_path), "--quiet"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    profiles = {p["row"]: p for p in result["profiles"]}
    assert set(profiles) == {"none", "dyme1"}
    dyme = profiles["dyme1"]["ms_per_frame"]
    for stage in ("frame (total)", "autoencoder encode", "UNet call (+ LCM step)", "autoencoder decode (+ to host)",
                  "bank update (commit)", "host work (rest of the frame)"):
        assert stage in dyme
    assert "  feature fusion (cosine, argmax, lerp)" in dyme  # the bank is read from the second frame on
    keys = [r["key"] for r in result["rows"]]
    if bench.peer_problem() is None:
        assert "peer" in keys
        assert "streamdiffusion" in result["peer_note"]
    else:  # not installed: said plainly, and the rest still runs
        assert "peer" not in keys
        assert "not usable" in result["peer_note"]
        assert "peer: not run" in capsys.readouterr().err
