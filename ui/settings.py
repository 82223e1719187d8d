"""The page's render settings, and what they mean for a stream.

`Settings` is what the page's controls show (subject, style preset,
strength, steps, seed, bank, EA, FF, with a ControlNet its scale, and the
compare view: the same frames without the bank beside the render), as
they arrive from any transport (Gradio's events, the fast channel's
settings message, ui.wire).  `Settings.config` turns them into the
session's `StreamConfig`: the preset's template around the subject, the
values checked.  `make_config` does the checking for the API, which takes a
prompt as it is.  Every problem is a ValueError with a readable message.
`served_variants` lists the settings the page can give a stream that may
change the shapes of its model calls, for the serving warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sv2v_core.config import StreamConfig
from sv2v_core.control import CONTROLLED_STRENGTH

from .presets import Preset

# Plain img2img strength -> strength with a ControlNet holding the lines (0.4 -> 0.6).
PLAIN_STRENGTH = StreamConfig.strength
CONTROL_STRENGTH_BOOST = CONTROLLED_STRENGTH - PLAIN_STRENGTH
MAX_PRESET_STRENGTH = 0.8  # above it the drawing's colours are mostly gone, even with conditioning
PAGE_STEPS = (1, 2, 3, 4)  # the steps the page's slider offers
PAGE_BANKS = ("dyme", "queue", "none")  # the bank modes the page offers


@dataclass(frozen=True)
class Settings:
    """The page's controls, as sent (values are checked by `config`)."""

    subject: Any
    preset: Any
    strength: Any
    steps: Any
    seed: Any
    bank: Any
    ea: Any
    ff: Any
    control_scale: Any = None
    compare: Any = False

    def config(self, base: StreamConfig, presets: dict[str, Preset], *, controlled: bool) -> StreamConfig:
        """`base` with these settings (the control scale only with a ControlNet); ValueError."""
        preset = presets.get(self.preset) if isinstance(self.preset, str) else None
        if preset is None:
            raise ValueError(f"unknown style preset {self.preset!r}")
        return make_config(base, prompt=preset.prompt(self.subject or ""), strength=self.strength, steps=self.steps,
                           seed=self.seed, bank=self.bank, ea=self.ea, ff=self.ff,
                           control_scale=self.control_scale if controlled else None)


def preset_strength(preset: Preset, controlled: bool) -> float:
    """The preset's strength, raised when a ControlNet holds the lines (the page's default for it)."""
    if not controlled:
        return preset.strength
    return round(min(MAX_PRESET_STRENGTH, max(preset.strength, preset.strength + CONTROL_STRENGTH_BOOST)), 2)


def served_variants(base: StreamConfig, *, controlled: bool) -> list[StreamConfig]:
    """`base` with each choice of the page that may change the shapes of a stream's model calls: steps,
    bank mode and, with a ControlNet, its scale at 0 (which leaves the ControlNet out).  What the
    serving warm-up prepares (sv2v_core.serving; settings of equal call shapes share one function, so
    most of these coincide: in latency mode the steps change nothing)."""
    scales = (base.control_scale, 0.0) if controlled else (base.control_scale,)
    return [base.replace(steps=steps, bank_mode=bank, control_scale=scale)
            for steps in PAGE_STEPS for bank in PAGE_BANKS for scale in scales]


def make_config(base: StreamConfig, *, prompt, strength, steps, seed, bank, ea, ff,
                control_scale=None) -> StreamConfig:
    """`base` with the visitor's settings; ValueError with a readable message.

    control_scale: the ControlNet's conditioning scale (None: keep base's).
    """
    if prompt is None:
        prompt = ""
    steps_value = _whole("steps", steps)
    seed_value = _whole("seed", seed)
    try:
        strength_value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number, got {strength!r}") from None
    if control_scale is not None:
        try:
            control_scale = float(control_scale)
        except (TypeError, ValueError):
            raise ValueError(f"conditioning scale must be a number, got {control_scale!r}") from None
    return base.replace(
        prompt=str(prompt).strip(), strength=strength_value, steps=steps_value, seed=seed_value,
        bank_mode=str(bank), bank_extended_attention=bool(ea), bank_feature_fusion=bool(ff),
        control_scale=base.control_scale if control_scale is None else control_scale,
    )


def _whole(name: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)
