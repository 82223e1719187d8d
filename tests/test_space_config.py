"""The README's front matter: the Hugging Face Space's configuration, checked against the Spaces
configuration reference (https://huggingface.co/docs/hub/spaces-config-reference)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sv2v_core.loader import DEFAULT_MODEL
from sv2v_core.models import DEFAULT_VAE

ROOT = Path(__file__).resolve().parent.parent
# The reference's hardware flavors.
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large",
            "a10g-largex2", "a10g-largex4", "a100-large", "v5e-1x1", "v5e-2x2", "v5e-2x4"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md starts with no front matter"
    return yaml.safe_load(match.group(1))


def test_the_space_runs_the_app_with_the_pinned_gradio_and_python():
    config = front_matter()
    assert config["sdk"] == "gradio"
    pinned = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert str(config["sdk_version"]) == pinned
    assert isinstance(config["python_version"], str) and re.fullmatch(r"3\.\d+(\.\d+)?", config["python_version"])
    assert (ROOT / config["app_file"]).is_file()
    assert config["suggested_hardware"] in HARDWARE


def test_the_short_description_fits():
    description = front_matter()["short_description"]
    assert isinstance(description, str) and 0 < len(description) <= 60


def test_the_weights_the_app_loads_by_default_are_preloaded_at_build_time():
    entries = front_matter()["preload_from_hub"]
    repos = {entry.split()[0] for entry in entries}  # "repo [files [revision]]"
    assert repos == {DEFAULT_MODEL, DEFAULT_VAE}
