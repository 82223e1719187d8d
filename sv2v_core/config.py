"""Settings of one stream, validated on construction.

`StreamConfig` says how frames are rendered (prompt, size, strength, steps,
seed, stream-batch or latency mode); `BankConfig` says how the feature bank of
past frames is used (paper §4).  Both are frozen: change them with
`dataclasses.replace` and hand the new value to `StreamV2V.configure`.
Every bad value raises `ValueError` with a sentence a person can act on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

BANK_MODES = ("none", "queue", "dyme")
RENDER_MODES = ("stream", "latency")
CONTROL_IMAGES = ("lines", "canny", "image")  # see control.py
MAX_CONTROL_SCALE = 2.0
MAX_PROMPT_CHARS = 1000
MAX_SIDE = 2048


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class BankConfig:
    """How past frames feed the current one.

    mode: "none" (plain StreamDiffusion), "queue" (FIFO of `size` frames) or
        "dyme" (dynamic merging: one frame's worth of tokens, forever).
    size: frames kept by the queue; DyMe always keeps exactly one frame.
    extended_attention: EA, eq. 1, in every self-attention layer.
    feature_fusion: FF, eq. 2, in the low-resolution decoder blocks.
    fusion_alpha, fusion_threshold: α and the cosine threshold of eq. 2.
    merge_every: DyMe merges the new frame into the bank every this many
        frames (the first frame is always stored).
    fusion_blocks: top-level UNet blocks whose transformer blocks fuse.
    """

    mode: str = "dyme"
    size: int = 1
    extended_attention: bool = True
    feature_fusion: bool = True
    fusion_alpha: float = 0.75
    fusion_threshold: float = 0.98
    merge_every: int = 4
    fusion_blocks: tuple[str, ...] = ("mid_block", "up_blocks.0", "up_blocks.1")

    def __post_init__(self) -> None:
        if self.mode not in BANK_MODES:
            raise ValueError(f"bank mode must be one of {', '.join(BANK_MODES)}, got {self.mode!r}")
        _check_int("bank size", self.size, 1, 16)
        if self.mode == "dyme" and self.size != 1:
            raise ValueError("a DyMe bank always holds one frame; use --bank queue for a larger bank")
        _check_range("fusion alpha", self.fusion_alpha, 0.0, 1.0)
        _check_range("fusion threshold", self.fusion_threshold, -1.0, 1.0)
        _check_int("merge interval", self.merge_every, 1, 1000)
        object.__setattr__(self, "fusion_blocks", tuple(self.fusion_blocks))

    @property
    def enabled(self) -> bool:
        """True when the bank is read by at least one of EA and FF."""
        return self.mode != "none" and (self.extended_attention or self.feature_fusion)


@dataclass(frozen=True)
class StreamConfig:
    """How one stream renders its frames.

    mode "stream" batches the `steps` denoising steps of consecutive frames in
    one UNet call (output lags input by steps−1 frames; use `flush`);
    "latency" runs the steps of each frame in turn (no lag).
    similarity_skip: an input at least this similar to the previous one is
        not rendered again once the stream has caught up (None: never skip).
    scene_cut: an input less similar than this to the previous one empties
        the bank (None: never).  Similarity is 1 − mean absolute difference
        of 32×32 thumbnails in [0, 1]: 0.8 means a fifth of the full range.
    guidance_scale: None picks the model's default: no classifier-free
        guidance for plain UNets (LCM-LoRA), 8.5 in the guidance embedding of
        LCM-distilled UNets.  Above 1 on a plain UNet it runs real CFG (the
        batch doubles); on an LCM-distilled UNet it sets the embedding.
    control_scale: how strongly the engine's ControlNet conditions the render
        (it multiplies the ControlNet's residuals, as diffusers'
        `controlnet_conditioning_scale`); 0 is off (exactly the render without
        a ControlNet), None picks 1.0 when the engine has a ControlNet.  An
        engine without one refuses a positive scale.
    control_image: the control image the ControlNet gets from each frame:
        "lines" (a canvas's strokes as white lines on black), "canny" (Canny
        edges, for video) or "image" (the frame as it is); see control.py.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    strength: float = 0.4
    steps: int = 4
    guidance_scale: float | None = None
    seed: int = 0
    mode: str = "stream"
    bank: BankConfig = field(default_factory=BankConfig)
    similarity_skip: float | None = 0.995
    scene_cut: float | None = 0.8
    reset_on_prompt_change: bool = True
    control_scale: float | None = None
    control_image: str = "lines"

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name.replace('_', ' ')} must be text, got {type(value).__name__}")
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name.replace('_', ' ')} is longer than {MAX_PROMPT_CHARS} characters")
        _check_int("width", self.width, 64, MAX_SIDE)
        _check_int("height", self.height, 64, MAX_SIDE)
        _check_range("strength", self.strength, 0.02, 1.0)
        _check_int("steps", self.steps, 1, 8)
        if self.guidance_scale is not None:
            _check_range("guidance scale", self.guidance_scale, 0.0, 20.0)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.mode not in RENDER_MODES:
            raise ValueError(f"mode must be one of {', '.join(RENDER_MODES)}, got {self.mode!r}")
        if not isinstance(self.bank, BankConfig):
            raise ValueError("bank must be a BankConfig")
        if self.similarity_skip is not None:
            _check_range("similarity skip threshold", self.similarity_skip, 0.0, 1.0)
        if self.scene_cut is not None:
            _check_range("scene cut threshold", self.scene_cut, 0.0, 1.0)
        if self.control_scale is not None:
            _check_range("control scale", self.control_scale, 0.0, MAX_CONTROL_SCALE)
        if self.control_image not in CONTROL_IMAGES:
            raise ValueError(f"control image must be one of {', '.join(CONTROL_IMAGES)}, got {self.control_image!r}")

    def replace(self, **changes) -> "StreamConfig":
        """A copy with `changes`; bank fields may be given as `bank_<name>`."""
        bank_changes = {k[5:]: changes.pop(k) for k in list(changes) if k.startswith("bank_")}
        if bank_changes:
            changes["bank"] = dataclasses.replace(changes.get("bank", self.bank), **bank_changes)
        return dataclasses.replace(self, **changes)
