"""bench/gpu_check.sh's app stage runs end to end on the CPU (the built-in model, small), so a GPU's
time is spent measuring, not debugging: every row rendered, without errors, and was written out."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_app_stage_runs_end_to_end_on_a_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DEVICE="cpu", GPU_CHECK_MODEL="tiny", GPU_CHECK_SIZE="64",
               GPU_CHECK_APP_SECONDS="1", PYTHON=os.environ.get("PYTHON", "python"))
    done = subprocess.run(["bash", "bench/gpu_check.sh", "app"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0 and "stage app ended with exit status 0" in log, log[-3000:]
    with tarfile.open(tmp_path / "results.tgz") as results:
        result = json.load(results.extractfile("./app/appcheck.json"))
        table = results.extractfile("./app/appcheck.md").read().decode()
    rows = result["rows"]
    assert [(row["artists"], row["mode"], row["steps"]) for row in rows] == [
        (1, "latency", 4), (8, "latency", 4), (1, "latency", 1), (1, "stream", 4), (1, "stream", 1)]
    for row in rows:
        assert row["renders"] > 0 and not row["errors"], row
        assert row["frame_ms"]["max"] >= row["frame_ms"]["p95"] >= row["frame_ms"]["p50"] > 0
    assert max(int(size) for size in rows[1]["batches"]) > 1  # the 8 artists shared ticks
    assert not result["on_target"] and "the targets are shown, not meant" in table
    assert "frame p95" in table and "renders/s each" in table  # the targets, checked row by row
