"""Style presets: a prompt template with {subject} plus render settings.

Loaded from assets/presets.json (see the comment in that file).  A preset
never carries a model or file path: only a template, strength and steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PRESETS_FILE = Path(__file__).resolve().parent.parent / "assets" / "presets.json"


@dataclass(frozen=True)
class Preset:
    name: str
    template: str
    strength: float = 0.4
    steps: int = 4

    def prompt(self, subject: str) -> str:
        """The template with {subject} filled in (literal braces elsewhere are kept)."""
        return self.template.replace("{subject}", (subject or "").strip()).strip(" ,")


def load_presets(path: Path = PRESETS_FILE) -> dict[str, Preset]:
    """Presets by name, in file order; ValueError if the file is malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        presets = [Preset(**entry) for entry in data["presets"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the style presets in {path}: {error}") from error
    for preset in presets:
        if "{subject}" not in preset.template:
            raise ValueError(f"preset {preset.name!r} has no {{subject}} in its template")
    return {preset.name: preset for preset in presets}
