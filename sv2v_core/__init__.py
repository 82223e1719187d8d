"""StreamV2V core: streaming video-to-video translation with a feature bank.

    from sv2v_core import StreamV2V, StreamConfig, load_components
    engine = StreamV2V(load_components("tiny"))
    state = engine.new_stream(StreamConfig(prompt="a watercolor painting"))
    for image in engine.translate(state, frames): ...
"""

from .config import BankConfig, StreamConfig
from .engine import StreamV2V
from .images import ImageError
from .models import (
    BUILTIN_CONTROLNETS, BUILTIN_MODELS, Components, ControlNetLoadError, ModelLoadError, load_components,
    load_controlnet,
)
from .stream import Output, StreamState

__all__ = [
    "BUILTIN_CONTROLNETS", "BUILTIN_MODELS", "BankConfig", "Components", "ControlNetLoadError", "ImageError", "ModelLoadError", "Output",
    "StreamConfig", "StreamState", "StreamV2V", "load_components", "load_controlnet",
]
