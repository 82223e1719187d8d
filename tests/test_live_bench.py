"""The live-path benchmark (ui.bench) runs end to end and writes its results.

A short run with the echo engine in a real headless Chromium; it checks that
the measurement happened and is written out, never how fast it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ui.bench import main

if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian chromium (/usr/bin/chromium) is not installed", allow_module_level=True)
pytest.importorskip("playwright.sync_api")


def test_the_benchmark_measures_a_drawing_session_and_writes_json_and_markdown(tmp_path):
    assert main(["--cases", "echo:5", "--channels", "ws", "python", "--seconds", "1.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "live.json").read_text())
    page, client = result["rows"]
    assert (page["case"], page["mode"], page["channel"], client["channel"]) == ("echo:5", "latency", "ws", "python")
    for row in (page, client):
        assert row["renders"] > 0 and row["final_shown"]
        assert row["latency_p50"] > 0 and 0 < row["model_busy"] <= 1
    assert set(page["breakdown"]) == {"encode", "transfer", "decode", "wait", "model", "serverEncode", "display"}
    table = (tmp_path / "live.md").read_text()
    assert "| echo:5 | latency | ws |" in table and "| echo:5 | latency | python |" in table
    assert "load average" in result["conditions"] and result["conditions"] in table
