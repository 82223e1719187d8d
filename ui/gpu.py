"""Running model work on the GPU, on ZeroGPU Spaces or plainly.

On a ZeroGPU Space (the `spaces` package is installed) a GPU is attached
only inside functions decorated with `spaces.GPU`, which run in a forked
worker with pickled arguments: changes they make to their arguments do not
come back.  So GPU functions here take the stream state as an argument and
*return* it, and leave it on the CPU between calls.  Anywhere else the
decorator is the identity and the state simply stays where it is.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

ZERO_GPU = importlib.util.find_spec("spaces") is not None


def on_gpu(fn: F, duration: int | None = None) -> F:
    """`fn` wrapped in `spaces.GPU` on ZeroGPU; `fn` itself elsewhere."""
    if not ZERO_GPU:
        return fn
    import spaces

    return spaces.GPU(duration=duration)(fn) if duration else spaces.GPU(fn)
