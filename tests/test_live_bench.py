"""The live-path benchmark (bench.live) runs end to end and writes its results.

A short run with the echo engine in a real headless Chromium, and one of the
built-in model through the Python client alone (no browser: how the GPU check
runs it); they check that the measurement happened and is written out, never
how fast it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.live import main


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium (/usr/bin/chromium) is not installed")
def test_the_benchmark_measures_a_drawing_session_and_writes_json_and_markdown(tmp_path):
    pytest.importorskip("playwright.sync_api")
    assert main(["--cases", "echo:5", "--channels", "ws", "python", "--seconds", "1.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "live.json").read_text())
    page, client = result["rows"]
    assert (page["case"], page["mode"], page["channel"], client["channel"]) == ("echo:5", "latency", "ws", "python")
    for row in (page, client):
        assert row["renders"] > 0 and row["final_shown"]
        assert row["latency_p50"] > 0 and 0 < row["model_busy"] <= 1
        frame = row["frame_ms"]  # the echo engine sleeps 5 ms a frame
        assert frame["max"] >= frame["p95"] >= frame["p50"] >= 5
    assert set(page["breakdown"]) == {"encode", "transfer", "decode", "wait", "model", "serverEncode", "display"}
    table = (tmp_path / "live.md").read_text()
    assert "| echo:5 | latency | ws |" in table and "| echo:5 | latency | python |" in table
    assert "| frame ms p50 | p95 | max |" in table
    assert "load average" in result["conditions"] and result["conditions"] in table


def test_a_built_in_model_row_without_a_browser_compares_with_the_engine_alone(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.live.CHROMIUM", str(tmp_path / "no-chromium"))  # the Python client needs no browser
    assert main(["--cases", "tiny:64", "--channels", "python", "--seconds", "1.5", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "live.json").read_text())["rows"]
    assert (row["case"], row["channel"]) == ("tiny:64", "python")
    assert row["renders"] > 0 and row["model_busy"] > 0
    assert len(row["engine_alone_runs"]) == 2 and row["engine_alone_fps"] > 0
    assert row["frame_ms"]["p50"] > 0
    assert "tiny:64 latency, Python client (no browser): renders/s / engine alone" in (tmp_path / "live.md").read_text()
