"""Loading an engine: one recipe for the app, each Ray replica, the CLI and the benchmarks.

    from sv2v_core.loader import EngineOptions, load_engine
    loaded = load_engine(EngineOptions(model="tiny", controlnet="tiny"))
    engine = loaded.engine

`EngineOptions` says what to load (model, autoencoder, LoRA, ControlNet,
device, dtype) and how (`fallback`, `serving`, `compile`); `load_engine`
loads the components (sv2v_core.models), builds the `StreamV2V` engine and,
for serving, applies the fast path (sv2v_core.accel.accelerate_for_serving)
and the serving choice (`choose_serving`).
`load` stops before the engine, for a caller that needs the components
first (the benchmark's peer copies the UNet before the engine patches it).

The default model (`choose_model`): nobody named one, so real weights
(DEFAULT_MODEL, with the TAESD autoencoder) where there is a CUDA GPU, and
the built-in offline model 'tiny' where there is none: a full-size model
renders a frame in tens of seconds on a CPU and may not be downloadable.
`Loaded.choice` says what was picked and why, `Loaded.fell_back` why it fell
back (if it did) and `Loaded.fast_path` which fast path it got; the caller
shows them (the app logs them, the CLI prints them).

dtype "auto": float16 on CUDA, float32 on the CPU; the built-in 'tiny' in
float32 everywhere (it is small enough that half precision saves nothing).

The serving choice (`choose_serving`, for what serves people: the app and
each Ray replica): on CUDA the UNet runs as compiled serving graphs
(sv2v_core.serving: torch.compile with CUDA graphs, at a few static shapes,
warmed up before serving; shapes nobody warmed up run eagerly); on ZeroGPU,
which does not support torch.compile, and on a CPU, where compiling gains
little at the app's sizes and takes minutes (docs/serving.md), the plain
eager engine.  `compile="on"` compiles on a CPU too, in the background while
serving eagerly; `"off"` never compiles.  `Loaded.serving` says what was
chosen and why.
Every failure raises `ModelLoadError` (a ControlNet's: `ControlNetLoadError`)
with one message naming what was tried and how to fix it.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch

from .accel import accelerate_for_serving
from .engine import StreamV2V
from .models import BUILTIN_MODELS, DEFAULT_VAE, Components, ControlNetLoadError, ModelLoadError, load_components
from .serving import compile_problem, serving_backend

DEFAULT_MODEL = "SimianLuo/LCM_Dreamshaper_v7"
FALLBACK_MODEL = "tiny"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
COMPILE_CHOICES = ("auto", "on", "off")

# Library chatter that is no help to a person starting the app or the CLI (diffusers passes
# huggingface_hub an argument it deprecated); silenced so that a failed hub lookup is one error line.
QUIET_WARNINGS = ("The `local_dir_use_symlinks` argument is deprecated",)


@contextlib.contextmanager
def quiet_library_warnings():
    """Silence QUIET_WARNINGS inside the block."""
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
        yield


@dataclass(frozen=True)
class ModelChoice:
    """The model to load and why it was picked."""

    model: str
    why: str


def choose_model(model: str | None, cuda: bool) -> ModelChoice:
    """The model named, or the default: real weights on a CUDA GPU, the built-in 'tiny' without one."""
    if model is not None and model.strip():
        return ModelChoice(model.strip(), "named by whoever started it")
    if cuda:
        return ModelChoice(DEFAULT_MODEL, f"the default on a CUDA GPU (real weights, autoencoder {DEFAULT_VAE})")
    return ModelChoice(FALLBACK_MODEL, "the default without a CUDA GPU, where a full-size model takes tens of "
                                       "seconds a frame; name a model to override")


@dataclass(frozen=True)
class ServingChoice:
    """How a serving engine runs its UNet: compiled serving functions (warmed
    up in the background, serving eagerly meanwhile, or before serving), or
    the plain eager engine; and why."""

    compiled: bool
    background: bool
    why: str


def choose_serving(compile: str, device: torch.device, *, zero_gpu: bool = False) -> ServingChoice:
    """The serving choice for `compile` ("auto", "on", "off") on `device` (see the module docstring)."""
    eager = "eager (the plain engine)"
    if zero_gpu:
        return ServingChoice(False, False, f"{eager}: ZeroGPU does not support torch.compile")
    if compile == "off":
        return ServingChoice(False, False, f"{eager}: compiling is off")
    if compile == "auto" and device.type != "cuda":
        return ServingChoice(False, False, f"{eager}: on a CPU compiling gains little at the app's sizes and "
                                           "takes minutes (--compile on to compile anyway)")
    problem = compile_problem()
    if problem:
        return ServingChoice(False, False, f"{eager}: {problem}")
    if device.type == "cuda":
        return ServingChoice(True, False, "compiled serving graphs (torch.compile, CUDA graphs), every bucket "
                                          "warmed up before serving")
    return ServingChoice(True, True, "compiled serving functions (torch.compile, inductor), compiled in the "
                                     "background while serving eagerly")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": CUDA where there is a GPU, else the CPU; ValueError when CUDA is asked for and absent."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, model: str) -> torch.dtype:
    """"auto": float16 on CUDA, float32 on the CPU, and float32 for the built-in 'tiny' everywhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    return torch.float16 if device.type == "cuda" and model != FALLBACK_MODEL else torch.float32


@dataclass(frozen=True)
class EngineOptions:
    """What to load and how.

    model: "tiny", "sd15-random", a Hugging Face id, a diffusers folder or a
        .safetensors file; None: `choose_model` picks.
    vae, lora: the TAESD autoencoder (default DEFAULT_VAE) and an LCM-LoRA,
        for real weights.
    controlnet: an SD1.5 ControlNet ("tiny" with the built-in model), or None.
    device: "auto", "cpu", "cuda" (taken as given: the app on ZeroGPU names
        a GPU that appears only inside requests).
    dtype: "auto" (see the module docstring), "float32", "float16",
        "bfloat16", or a torch dtype.
    fallback: for what must start anyway (the app, each Ray replica): a
        model that cannot be loaded falls back to the built-in 'tiny', and
        vae and lora, which are for real weights, are left out for a
        built-in model.  A ControlNet that cannot be loaded still fails.
    serving: make the engine for serving people: the fast path
        (accelerate_for_serving: on CUDA, channels-last, cuDNN autotuning,
        fast attention) and the serving choice (`choose_serving`).
    compile: with serving, "auto", "on" or "off" (`choose_serving`).
    zero_gpu: with serving, the app runs on ZeroGPU (never compiled there).
    """

    model: str | None = None
    vae: str | None = None
    lora: str | None = None
    controlnet: str | None = None
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    fallback: bool = False
    serving: bool = False
    compile: str = "auto"
    zero_gpu: bool = False

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")


@dataclass
class Loaded:
    """What was loaded: the components (and, from `load_engine`, the engine), the model chosen and why,
    why it fell back to the built-in model (None: it did not), the serving fast path (None: none) and
    the serving choice (None: not for serving)."""

    components: Components
    choice: ModelChoice
    device: torch.device
    fell_back: str | None = None
    engine: StreamV2V | None = None
    fast_path: str | None = None
    serving: ServingChoice | None = None


def load(options: EngineOptions) -> Loaded:
    """The components `options` describe (no engine yet); ModelLoadError."""
    device = resolve_device("auto") if options.device == "auto" else torch.device(options.device)
    choice = choose_model(options.model, device.type == "cuda")
    try:
        components = _components(choice.model, options, device)
    except ControlNetLoadError:
        raise
    except ModelLoadError as error:
        if not options.fallback or choice.model == FALLBACK_MODEL:
            raise
        why = (f"could not load {choice.model}: {' '.join(str(error).split())}; "
               f"falling back to the built-in model '{FALLBACK_MODEL}'")
        return Loaded(_components(FALLBACK_MODEL, options, device), choice, device, fell_back=why)
    return Loaded(components, choice, device)


def load_engine(options: EngineOptions) -> Loaded:
    """The engine `options` describe (in `Loaded.engine`), made for serving if asked; ModelLoadError."""
    loaded = load(options)
    engine = loaded.engine = StreamV2V(loaded.components)
    if not options.serving:
        return loaded
    if (report := accelerate_for_serving(engine)) is not None:
        loaded.fast_path = str(report)
    loaded.serving = choice = choose_serving(options.compile, engine.device, zero_gpu=options.zero_gpu)
    if choice.compiled:
        engine.backend = serving_backend(engine, compile=True, eager_fallback=True, background=choice.background)
    return loaded


def _components(model: str, options: EngineOptions, device: torch.device) -> Components:
    real = {"vae": options.vae, "lora": options.lora}
    if options.fallback and model in BUILTIN_MODELS:
        real = {}  # a built-in model has its own autoencoder and takes no LoRA
    with quiet_library_warnings():
        return load_components(model, **real, controlnet=options.controlnet, device=device,
                               dtype=resolve_dtype(options.dtype, device, model))
