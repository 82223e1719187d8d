"""Running model work on the GPU, on ZeroGPU Spaces or plainly.

On a ZeroGPU Space a GPU is attached only inside functions decorated with
`spaces.GPU`, which run in a worker process with pickled arguments and
results: changes they make to their arguments do not come back, and each
call is charged its `duration` against the visitor's quota.  The app is on
ZeroGPU exactly when `spaces` itself acts: the `SPACES_ZERO_GPU` variable
says so ("1", "t" or "true", any case, as the `spaces` package reads it) and
the package is installed.  With the package installed and the variable
unset, `spaces.GPU` does nothing, and neither does anything here: the app
behaves as on any machine.

`zero_gpu()` reads the environment when asked (nothing is decided at import
time); `on_gpu` wraps a function for it.  What crosses the process boundary
per call, and how little, is ui.crossing's.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Mapping, TypeVar

import torch

F = TypeVar("F", bound=Callable)

TRUE_VALUES = ("1", "t", "true")  # what `spaces` takes as set


def zero_gpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs on ZeroGPU: SPACES_ZERO_GPU is set (as `spaces` reads it) and
    the `spaces` package is installed."""
    value = (os.environ if environ is None else environ).get("SPACES_ZERO_GPU")
    return (value is not None and value.strip().lower() in TRUE_VALUES
            and importlib.util.find_spec("spaces") is not None)


def model_device(environ: Mapping[str, str] | None = None) -> str:
    """Where the app loads its model: "cuda" with a CUDA GPU; on ZeroGPU, where the GPU appears only
    inside `spaces.GPU` calls, "cuda" whenever torch is built for CUDA; else "cpu"."""
    if torch.cuda.is_available() or (zero_gpu(environ) and torch.backends.cuda.is_built()):
        return "cuda"
    return "cpu"


def import_spaces() -> None:
    """On ZeroGPU, import `spaces` now: before any model is moved to "cuda" (the package makes that
    possible before a GPU is attached, and refuses to load once CUDA has been initialised)."""
    if zero_gpu():
        import spaces  # noqa: F401


def on_gpu(fn: F, duration: int | Callable[..., int] | None = None) -> F:
    """`fn` wrapped in `spaces.GPU` on ZeroGPU (charged `duration` seconds: a number, or a function
    of `fn`'s arguments giving one); `fn` itself elsewhere."""
    if not zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=duration)(fn) if duration else spaces.GPU(fn)
