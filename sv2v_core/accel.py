"""The fast path: half precision, channels-last, flash attention, torch.compile.

    engine = StreamV2V(load_components("sd15-random", device="cuda"))
    report = accelerate(engine, dtype=torch.float16, compile=True)
    print(report)                     # what was applied, and what was not and why
    state = engine.new_stream(...)    # make streams after accelerating

None of it changes what is computed beyond the tolerance of the chosen
dtype; in particular it never switches the feature bank off.

- dtype / channels-last: the model's weights are converted in place.
- Attention: `BankAttnProcessor` already calls PyTorch's
  `scaled_dot_product_attention`, which picks the flash or memory-efficient
  kernel on CUDA.  xformers is used instead only when it is importable and
  CUDA is present; asking for it (`xformers=True`) where it is missing is an
  error, not a silent fallback.
- torch.compile: the UNet is compiled as a *pure function of its inputs and
  the banked features* (`BankUNet`): the bank's tensors go in as explicit
  inputs and the current frame's keys, values and block outputs come out as
  explicit outputs, with extended attention and feature fusion inside the
  graph and the bank update (DyMe merge, queue) outside it, in PyTorch.  A
  pure function with static shapes is what CUDA graphs need
  (mode="reduce-overhead" or "max-autotune"): the bank's tensors are copied
  into the graph's static input buffers on each replay (a few hundred MB/s of
  a GPU's TB/s), and the recorded outputs are cloned out of the graph's
  memory pool before the next replay can overwrite them.  Each signature
  (the bank's shapes, whether the call records, and every input's shape and
  dtype) compiles once: for one stream size and mode, no bank, then one per
  queue length (DyMe: one), each with and without recording.
  The same `BankUNet` is what `onnx_export` exports for ONNX and TensorRT.
- ControlNet: its residuals are explicit inputs of `BankUNet` too (one per
  down-block skip, then the mid block's), so a compiled, ONNX or TensorRT
  UNet keeps the conditioning; a call with residuals has its own signature.
  The ControlNet itself runs in PyTorch (eagerly, in the chosen dtype and
  memory format).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import BankAttnProcessor
from .bank import FusionInputs, KeysValues, layer_order

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------- the UNet as a pure function


class ExplicitBank:
    """Stands in for a `BatchView` inside `BankUNet`: serves the banked tensors
    it was given and collects what the processors and hooks record.  The
    tensors it serves are already arranged as the batch's rows."""

    def __init__(self, fusion: tuple[float, float], banked: dict[tuple[str, str], torch.Tensor]):
        self.fusion = fusion
        self.banked = banked
        self.recorded: dict[tuple[str, str], torch.Tensor] = {}

    def extended_keys_values(self, layer: str) -> KeysValues | None:
        k, v = self.banked.get((layer, "k")), self.banked.get((layer, "v"))
        return None if k is None or v is None else KeysValues(k, v)

    def fusion_inputs(self, layer: str) -> FusionInputs | None:
        o = self.banked.get((layer, "o"))
        return None if o is None else FusionInputs(o, None, *self.fusion)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        self.recorded[(layer, name)] = features


@dataclass(frozen=True)
class BankSpec:
    """The signature of one `BankUNet`: which banked tensors go in (with their
    shapes), how many ControlNet residuals follow them, and which recorded
    features come out, in order."""

    inputs: tuple[tuple[str, str], ...]
    input_shapes: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[str, str], ...]
    fusion: tuple[float, float]  # (α, threshold) of feature fusion
    control: int = 0             # ControlNet down-block residuals (0: no ControlNet; else a mid one follows)

    def input_names(self) -> list[str]:
        control = [f"control.down.{i}" for i in range(self.control)] + (["control.mid"] if self.control else [])
        return [f"bank.{layer}.{name}" for layer, name in self.inputs] + control

    def output_names(self) -> list[str]:
        return [f"new.{layer}.{name}" for layer, name in self.outputs]


def forward_order(layers: list[str]) -> list[str]:
    """`layers` in the order a UNet forward runs them (`bank.layer_order`)."""
    return layer_order(layers)


def bank_spec(view, layers: list[str]) -> tuple[BankSpec, list[torch.Tensor]]:
    """The spec of a call that reads and records through `view` (a BatchView
    or a BankView), and the banked tensors to pass, in spec order."""
    inputs, tensors = [], []
    for layer in layers:
        kv = view.extended_keys_values(layer)
        if kv is not None:
            inputs += [(layer, "k"), (layer, "v")]
            tensors += [kv.k, kv.v]
        o = view.fusion_features(layer)
        if o is not None:
            inputs.append((layer, "o"))
            tensors.append(o)
    outputs = [(layer, name) for layer in layers for name in ("k", "v", "o") if view.records(layer, name)]
    spec = BankSpec(tuple(inputs), tuple(tuple(t.shape) for t in tensors), tuple(outputs), tuple(view.fusion))
    return spec, tensors


class BankUNet(torch.nn.Module):
    """The patched UNet as a pure function:

        forward(sample, timestep, encoder_hidden_states, [timestep_cond], *banked, *residuals)
            -> (eps, *recorded)

    `banked` are the tensors named by `spec.inputs` (rows already matching the
    batch); `residuals` the ControlNet's `spec.control` down-block residuals
    and its mid-block one (none without a ControlNet); `recorded` are the
    current frame's features named by `spec.outputs`.  Extended attention and
    feature fusion run inside; the bank update does not.  The UNet must carry
    `attention.BankPatch`.
    """

    def __init__(self, unet: torch.nn.Module, spec: BankSpec) -> None:
        super().__init__()
        self.unet = unet
        self.spec = spec
        self.conditioned = unet.config.time_cond_proj_dim is not None

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        condition, rest = (rest[0], rest[1:]) if self.conditioned else (None, rest)
        banked, residuals = rest[:len(self.spec.inputs)], rest[len(self.spec.inputs):]
        down, mid = (list(residuals[:-1]), residuals[-1]) if self.spec.control else (None, None)
        bank = ExplicitBank(self.spec.fusion, dict(zip(self.spec.inputs, banked)))
        eps = self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=condition,
            cross_attention_kwargs={"bank": bank}, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]
        return (eps, *[bank.recorded[key] for key in self.spec.outputs])


def call_args(spec: BankSpec, sample, timestep, embeds, condition, banked, residuals) -> tuple[BankSpec, list]:
    """`BankUNet`'s arguments, in order, and `spec` counting the ControlNet
    residuals ((down, mid), or None without a ControlNet)."""
    args = [sample, timestep, embeds, *([condition] if condition is not None else []), *banked]
    if residuals is not None:
        down, mid = residuals
        spec = dataclasses.replace(spec, control=len(down))
        args += [*down, mid]
    return spec, args


class BankRunner:
    """An engine backend (`engine.backend`): runs each UNet call through a
    function made per `BankSpec` by `make(spec)` (a compiled `BankUNet`, an
    ONNX or TensorRT session) and records its outputs into the stream's bank.

    make(spec, args) returns f(sample, timestep, embeds, [condition], *banked,
    *residuals) -> sequence (eps, *recorded); `args` are the first call's
    arguments (for their shapes and dtypes).  `clone_outputs`: copy the recorded features
    (needed when f returns memory it reuses, e.g. CUDA graphs).
    """

    def __init__(self, layers: list[str], make: Callable[[BankSpec, list], Callable], *, clone_outputs: bool = False,
                 step_marker: Callable[[], None] | None = None) -> None:
        self.layers = forward_order(layers)
        self.make = make
        self.clone_outputs = clone_outputs
        self.step_marker = step_marker
        self.functions: dict[tuple, Callable] = {}

    def __call__(self, sample, timestep, embeds, condition, view, residuals=None):
        spec, banked = bank_spec(view, self.layers)
        spec, args = call_args(spec, sample, timestep, embeds, condition, banked, residuals)
        # A function is made for one signature: the bank's and every input's shape, dtype and device
        # (a graph built for batch 4 at 512² must never run a batch of 1 at 256²).
        key = (spec, *((tuple(a.shape), a.dtype, a.device) for a in args))
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = self.make(spec, args)
        if self.step_marker is not None:
            self.step_marker()
        eps, *recorded = function(*args)
        for (layer, name), features in zip(spec.outputs, recorded):
            view.record(layer, name, features.clone() if self.clone_outputs else features)
        return eps.clone() if self.clone_outputs else eps


# ---------------------------------------------------------------- accelerate


@dataclass
class AccelReport:
    device: str
    dtype: str
    channels_last: bool = False
    attention: str = "sdpa"
    sdpa_backends: str = ""
    compiled: str = "no"
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"device {self.device}", f"dtype {self.dtype}", f"attention {self.attention}",
                 f"channels-last {'on' if self.channels_last else 'off'}", f"compile {self.compiled}"]
        if self.sdpa_backends:
            parts.append(f"SDPA backends {self.sdpa_backends}")
        text = ", ".join(parts)
        return text + "".join(f"\n  note: {note}" for note in self.notes)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _xformers_kernel():
    import xformers.ops

    def attention(query, key, value, attn_mask=None, scale=None):
        if attn_mask is not None:  # same maths, through PyTorch; never drops keys
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)

    return attention


def _bank_processors(unet) -> list[BankAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, BankAttnProcessor)]


def accelerate(target, *, dtype: torch.dtype | None = None, channels_last: bool = True, compile: bool = False,
               compile_mode: str = "reduce-overhead", compile_backend: str = "inductor",
               xformers: bool | str = "auto") -> AccelReport:
    """Speed up `target` (a `StreamV2V` engine, or `Components` before an
    engine is made from them) in place; returns what was applied.

    Call it before making streams: a stream's noise and prompt embeddings
    take the dtype the model has when the stream starts.
    compile needs an engine (it installs `engine.backend`).
    """
    from .engine import StreamV2V

    engine = target if isinstance(target, StreamV2V) else None
    components = engine.components if engine is not None else target
    unet, vae = components.unet, components.vae
    device = unet.device
    cuda = device.type == "cuda"
    if dtype is not None and dtype != unet.dtype:
        components.to(device, dtype)
    report = AccelReport(device=str(device), dtype=str(unet.dtype).replace("torch.", ""))

    if channels_last:
        for module in components.modules():
            if module is not components.text_encoder:
                module.to(memory_format=torch.channels_last)
        report.channels_last = True

    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest conv kernels once
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        report.sdpa_backends = "flash, memory-efficient, math (PyTorch picks per call)"
    else:
        report.sdpa_backends = "CPU kernels"

    processors = _bank_processors(unet)
    if xformers is True:
        if not xformers_available():
            raise RuntimeError("xformers was requested but is not installed; install it on a CUDA host "
                               "(pip install xformers) or leave xformers off: PyTorch SDPA is used otherwise")
        if not cuda:
            raise RuntimeError("xformers was requested but the model is not on a CUDA device; "
                               "its kernels run on CUDA only")
        use_xformers = True
    elif xformers == "auto":
        # SDPA's flash kernel is as fast on recent GPUs, and compiles without a graph break.
        use_xformers = cuda and not compile and xformers_available()
        if cuda and not compile and not use_xformers:
            report.notes.append("xformers is not installed; using PyTorch SDPA (flash / memory-efficient)")
    else:
        use_xformers = False
    if use_xformers and processors:
        kernel = _xformers_kernel()
        for processor in processors:
            processor.kernel = kernel
        report.attention = "xformers (bank kept: extended attention runs through it)"
    if not processors:
        report.notes.append("the UNet carries no bank processors yet (make the engine first to use the bank)")
    if components.controlnet is not None:
        report.notes.append("ControlNet: its residuals enter the UNet as explicit inputs; the ControlNet itself "
                            "runs eagerly in PyTorch" + (" (not compiled)" if compile else ""))

    if compile:
        if engine is None:
            raise ValueError("compile needs the engine: call accelerate(engine, compile=True)")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        engine.backend = compiled_backend(engine, mode=compile_mode, backend=compile_backend)
        graphs = cuda and compile_backend == "inductor" and compile_mode in ("reduce-overhead", "max-autotune")
        report.compiled = f"torch.compile(mode={compile_mode!r}, backend={compile_backend!r}" + (
            ", CUDA graphs)" if graphs else ")")
        if compile_mode in ("reduce-overhead", "max-autotune") and not cuda:
            report.notes.append("CUDA graphs need a CUDA device; on CPU the compiled graph runs without them")
    return report


def accelerate_for_serving(engine) -> AccelReport | None:
    """What the app's engine gets on a CUDA device: channels-last weights,
    cuDNN's autotuned convolutions and SDPA's fast kernels, no compiling (a
    server's batches change size from tick to tick, and each size would be a
    new graph); what it gains: docs/performance.md.  On a CPU: nothing (None)."""
    if engine.device.type != "cuda":
        return None
    return accelerate(engine)


def compiled_backend(engine, *, mode: str = "reduce-overhead", backend: str = "inductor") -> BankRunner:
    """A `BankRunner` whose functions are `torch.compile`d `BankUNet`s (one per bank shape)."""
    graphs = engine.device.type == "cuda" and backend == "inductor" and mode in ("reduce-overhead", "max-autotune")
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}

    def make(spec: BankSpec, args):
        module = BankUNet(engine.unet, spec).eval()
        return torch.compile(module, backend=backend, fullgraph=True, dynamic=False, **options)

    marker = torch.compiler.cudagraph_mark_step_begin if graphs else None
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return BankRunner(engine.patch.layers, make, clone_outputs=graphs, step_marker=marker)


def eager_backend(engine) -> BankRunner:
    """The functional path without compiling (checks that `BankUNet` matches the hooks)."""
    return BankRunner(engine.patch.layers, lambda spec, args: BankUNet(engine.unet, spec).eval())
