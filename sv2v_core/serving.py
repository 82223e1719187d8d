"""Serving graphs at a few static shapes: the engine's UNet calls as pure
functions of fixed-shape inputs, one per *bucket*, ready to be compiled and
captured (CUDA graphs through torch.compile's "reduce-overhead").

    engine = StreamV2V(load_components(...))
    engine.backend = serving_backend(engine, compile=True)   # or compile=False: the same shapes, eagerly
    engine.warm_up([config_a, config_b])                       # every bucket × these settings, before serving

Why: an eager diffusion UNet on a GPU is bound by launching kernels, and a
captured graph needs every call to have the same shapes.  Three things moved
the shapes of the engine's UNet calls: how many streams share the call, how
full each stream's bank is, and whether the frame records into its bank.
Here none of them does:

- Buckets.  A call's streams are padded up to the next bucket (1, 2, 4 or 8
  streams by default) with rows that read nothing and record nothing (zero
  latents and prompts, an empty bank); a tick with more streams than the
  largest bucket is split.  The graph of a bucket is made for the rows per
  stream of its mode (stream batch: `steps`; latency: 1), times 2 under
  classifier-free guidance.
- The bank.  Each stream's bank lives in fixed-size buffers (`bank.py`); the
  call reads the whole buffer of every layer and a per-row count of the
  frames it holds.  Tokens beyond it are masked: extended attention never
  attends them (−inf logits) and feature fusion never picks them, so an empty
  or partly filled bank gives the result of having none, up to float
  rounding.  Whether a row's stream uses EA and FF, and its fusion α and
  threshold, are per-row data too, so streams with other bank settings, or
  no bank at all, share a graph (only the fusion blocks and the bank's
  capacity in frames are part of the graph).
- Recording.  Every call outputs the keys, values and block outputs a due
  frame would record, for every row; the backend keeps only the rows of the
  streams that are due (and never a padding row's).

ControlNet residuals are inputs of the graph (zeros for padding rows); the
ControlNet itself runs before it, in PyTorch.

The serving function of a bucket is `ServingUNet`, the patched diffusers UNet
(its attention processors and fusion hooks, no fork) called with a
`ServingBank` that serves the masked buffers: the same code runs eagerly, under
torch.compile on a CPU (inductor, no graphs) and on CUDA with graphs.

Warm-up (`ServingBackend.warm_up`) runs every bucket of every given setting
until it is compiled and captured (cuDNN's autotuning included), so no
artist waits for a compile mid-stroke; with `background=True` it does so in a
thread while calls whose graph is not ready run the same function eagerly
(the backend's `fallback`).  After `warm_up(..., freeze=True)` nothing is
compiled any more: a call of a shape that was not warmed up runs through the
fallback, eagerly, or, on a backend without one, raises `UnwarmedShape` (a
test's proof that no call leaves the buckets).  Warm-up reports its progress
on the "sv2v.serving" logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .bank import FusionInputs, KeysValues, as_index, fusion_block, layer_order
from .config import StreamConfig

BUCKETS = (1, 2, 4, 8)
ROW_FIELDS = ("frames", "ea", "ff", "alpha", "threshold")  # the per-row data, columns of one float32 tensor
NEVER = 2.0  # a fusion threshold no cosine similarity exceeds

log = logging.getLogger("sv2v.serving")


class UnwarmedShape(RuntimeError):
    """A call needed a graph that the warm-up did not make (the backend is frozen)."""


def bucket_for(streams: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `streams` streams."""
    for bucket in sorted(buckets):
        if bucket >= streams:
            return bucket
    raise ValueError(f"{streams} streams do not fit the largest bucket ({max(buckets)}); split the call")


@dataclass(frozen=True)
class ServingSpec:
    """What one serving function is made for (its inputs' shapes follow from
    it and the latent size).

    layers: every transformer block, in forward order: banked k and v go in,
        the current frame's k and v come out.
    fusion_layers: the layers whose block output o is banked and fused.
    capacity: frames each banked buffer holds.
    rows: batch rows of one copy, padding included (streams × rows per stream).
    copies: 2 under classifier-free guidance (unconditional rows first).
    control: the ControlNet's down-block residuals that go in (0: none; else a mid one follows).
    conditioned: the UNet takes a guidance embedding (LCM-distilled).
    """

    layers: tuple[str, ...]
    fusion_layers: tuple[str, ...]
    capacity: int
    rows: int
    copies: int = 1
    control: int = 0
    conditioned: bool = False

    def banked(self) -> list[tuple[str, str]]:
        """The banked inputs, in order (and the recorded outputs, in the same order)."""
        return [(layer, name) for layer in self.layers
                for name in ("k", "v", "o") if name != "o" or layer in self.fusion_layers]


class ServingBank:
    """Stands in for a stream's `BatchView` inside `ServingUNet`: serves the
    fixed-size banked tensors with masks over the tokens not stored (or not
    used by the row's stream), and collects what the processors and hooks
    record (the conditional copy's rows only)."""

    def __init__(self, spec: ServingSpec, row_data: torch.Tensor, banked: dict[tuple[str, str], torch.Tensor]):
        self.spec = spec
        copies = spec.copies
        self.frames, ea, ff, alpha, threshold = row_data.repeat(copies, 1).unbind(dim=1)
        self.ea, self.ff = ea > 0, ff > 0
        self.alpha, self.threshold = alpha.view(-1, 1, 1), threshold.view(-1, 1)
        self.banked = {key: t.repeat(copies, 1, 1) if copies > 1 else t for key, t in banked.items()}
        self.recorded: dict[tuple[str, str], torch.Tensor] = {}

    def _stored(self, tokens: int) -> torch.Tensor:
        """(B, tokens) bool: which banked tokens hold a stored frame (frames fill the buffer from the front)."""
        frame_of = torch.arange(tokens, device=self.frames.device) // (tokens // self.spec.capacity)
        return frame_of.unsqueeze(0) < self.frames.unsqueeze(1)

    def extended_keys_values(self, layer: str) -> KeysValues:
        k, v = self.banked[(layer, "k")], self.banked[(layer, "v")]
        return KeysValues(k, v, self._stored(k.shape[1]) & self.ea.unsqueeze(1))

    def fusion_inputs(self, layer: str) -> FusionInputs | None:
        o = self.banked.get((layer, "o"))
        if o is None:
            return None
        alpha = self.alpha.to(o.dtype)
        return FusionInputs(o, self._stored(o.shape[1]) & self.ff.unsqueeze(1), alpha, self.threshold)

    def record(self, layer: str, name: str, features: torch.Tensor) -> None:
        self.recorded[(layer, name)] = features[-self.spec.rows:]


class ServingUNet(torch.nn.Module):
    """The patched UNet as a pure function of fixed-shape inputs:

        forward(sample, timestep, encoder_hidden_states, [timestep_cond], row_data, *banked, *residuals)
            -> (eps, *recorded)

    row_data: (rows, 5) float32, per row of one copy: frames stored, EA on,
        FF on, α, threshold (`ROW_FIELDS`).
    banked: (rows, capacity · tokens, channels) per `spec.banked()`, one copy.
    residuals: the ControlNet's down-block residuals and its mid one (none without).
    recorded: the current frame's features per `spec.banked()`, the
        conditional copy's rows.
    The UNet must carry `attention.BankPatch`.
    """

    def __init__(self, unet: torch.nn.Module, spec: ServingSpec) -> None:
        super().__init__()
        self.unet = unet
        self.spec = spec

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        condition, rest = (rest[0], rest[1:]) if self.spec.conditioned else (None, rest)
        row_data, rest = rest[0], rest[1:]
        names = self.spec.banked()
        banked, residuals = rest[:len(names)], rest[len(names):]
        down, mid = (list(residuals[:-1]), residuals[-1]) if self.spec.control else (None, None)
        bank = ServingBank(self.spec, row_data, dict(zip(names, banked)))
        eps = self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=condition,
            cross_attention_kwargs={"bank": bank}, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, return_dict=False,
        )[0]
        return (eps, *[bank.recorded[key] for key in names])


class _ShapeProbe:
    """A bank that serves nothing and notes the shape of every feature recorded."""

    def __init__(self) -> None:
        self.shapes: dict[tuple[str, str], tuple[int, int]] = {}

    def extended_keys_values(self, layer):
        return None

    def fusion_inputs(self, layer):
        return None

    def record(self, layer, name, features):
        self.shapes[(layer, name)] = tuple(features.shape[1:])


@dataclass(frozen=True)
class CallShape:
    """The settings that decide a serving call's shapes, less the bucket."""

    height: int          # latent size
    width: int
    rows_per_stream: int
    cfg: bool
    controlled: bool
    capacity: int
    fusion_blocks: tuple[str, ...]


def eager_function(engine) -> Callable[[ServingSpec, list], Callable]:
    """Serving functions run as they are (no compiling)."""
    return lambda spec, args: ServingUNet(engine.unet, spec).eval()


def compiled_function(engine, *, mode: str | None = None, backend: str = "inductor") -> Callable:
    """Serving functions compiled with torch.compile (fullgraph, static
    shapes).  mode None: "reduce-overhead" (CUDA graphs) on CUDA, inductor's
    default on a CPU (there are no graphs there)."""
    if mode is None:
        mode = "reduce-overhead" if engine.device.type == "cuda" else "default"
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    # one compiled graph per bucket and setting, all through ServingUNet.forward's code
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def make(spec: ServingSpec, args):
        module = ServingUNet(engine.unet, spec).eval()
        return torch.compile(module, backend=backend, fullgraph=True, dynamic=False, **options)

    return make


def uses_graphs(engine, mode: str | None = None, backend: str = "inductor") -> bool:
    mode = mode or ("reduce-overhead" if engine.device.type == "cuda" else "default")
    return engine.device.type == "cuda" and backend == "inductor" and mode in ("reduce-overhead", "max-autotune")


class ServingBackend:
    """An engine backend (`engine.backend`) that runs every UNet call through
    the serving function of its bucket, made once per shape by
    `make(spec, args)` (`eager_function`, `compiled_function`, or a test's).

    Streams whose next frames have equal `batch_key` share a call (same
    latent size, rows per stream, guidance, ControlNet use, bank capacity and
    fusion blocks), whatever their banks hold and whether they record.

    clone_outputs: copy the outputs that are kept out of the function's memory
        (CUDA graphs reuse it on the next replay).
    step_marker: called before each call (CUDA graphs: a new step begins).
    fallback: made like `make`, used for a shape whose `make` function is not
        ready yet (a background warm-up) or was never warmed up (after a
        frozen warm-up), e.g. `eager_function`.
    background: `warm_up`'s default: make the functions in a thread while
        the fallback serves (needs a fallback).
    """

    def __init__(self, engine, make: Callable | None = None, *, buckets: Sequence[int] = BUCKETS,
                 clone_outputs: bool = False, step_marker: Callable[[], None] | None = None,
                 fallback: Callable | None = None, background: bool = False) -> None:
        if background and fallback is None:
            raise ValueError("a background warm-up needs a fallback to serve with meanwhile")
        self.engine = engine
        self.make = make or eager_function(engine)
        self.fallback = fallback
        self.background = background
        self.buckets = tuple(sorted(buckets))
        self.clone_outputs = clone_outputs
        self.step_marker = step_marker
        self.layers = tuple(layer_order(engine.patch.layers))
        self.functions: dict[tuple, Callable] = {}   # shape key -> ready function
        self._fallbacks: dict[tuple, Callable] = {}
        self._shapes: dict[tuple, dict[tuple[str, str], tuple[int, int]]] = {}
        self._zeros: dict[tuple, torch.Tensor] = {}
        self.frozen = False
        self.warming: threading.Thread | None = None
        self.warm_error: BaseException | None = None
        self.calls: deque[tuple] = deque(maxlen=1000)  # shape keys of the latest calls
        self._planned: set[tuple] = set()  # shape keys a background warm-up is still to make

    @property
    def max_streams(self) -> int:
        return self.buckets[-1]

    # -- grouping ---------------------------------------------------------------
    def call_shape(self, config: StreamConfig) -> CallShape:
        """What decides the shapes of a stream's calls, bucket aside."""
        engine, bank = self.engine, config.bank
        return CallShape(
            height=config.height // engine.latent_scale, width=config.width // engine.latent_scale,
            rows_per_stream=config.steps if config.mode == "stream" else 1,
            cfg=engine.cfg_of(config), controlled=engine.controlled_by(config),
            capacity=bank.size, fusion_blocks=bank.fusion_blocks)

    def batch_key(self, state) -> tuple:
        """Streams with equal keys share serving calls: equal call shapes, the
        same mode and step count.  What their banks hold, whether they record,
        EA, FF, α, threshold, prompts, strengths and seeds do not matter."""
        config = state.config
        return (self.call_shape(config), config.mode, config.steps)

    def spec_for(self, shape: CallShape, bucket: int) -> ServingSpec:
        fusion = tuple(layer for layer in self.layers if fusion_block(layer) in shape.fusion_blocks)
        control = len(self.engine.controlnet.controlnet_down_blocks) if shape.controlled else 0
        return ServingSpec(self.layers, fusion, shape.capacity, bucket * shape.rows_per_stream,
                           copies=2 if shape.cfg else 1, control=control,
                           conditioned=self.engine.guidance_embedded)

    # -- calls ------------------------------------------------------------------
    def __call__(self, sample, timestep, embeds, condition, view, residuals=None):
        """One UNet call of the streams of `view` (a `BatchView`), padded to
        its bucket; records the due streams' features into their banks."""
        views = view.views
        bank = views[0].bank
        shape = CallShape(height=sample.shape[-2], width=sample.shape[-1], rows_per_stream=len(views[0].slots),
                          cfg=view.copies > 1, controlled=residuals is not None, capacity=bank.capacity,
                          fusion_blocks=bank.config.fusion_blocks)
        spec = self.spec_for(shape, bucket_for(len(views), self.buckets))
        args = self.arguments(spec, shape, sample, timestep, embeds, condition, views, residuals)
        eps, *recorded = self._run(spec, args)
        real = len(views) * shape.rows_per_stream
        eps = torch.cat([part[:real] for part in eps.chunk(spec.copies)]) if real < spec.rows else eps
        if self.clone_outputs:
            eps = eps.clone()
        for (layer, name), features in zip(spec.banked(), recorded):
            start = 0
            for stream in views:
                end = start + len(stream.slots)
                if stream.records(layer, name):  # only due streams keep features; padding rows never do
                    part = features[start:end]
                    stream.bank.record(layer, name, part.clone() if self.clone_outputs else part)
                start = end
        return eps

    def _run(self, spec: ServingSpec, args: list[torch.Tensor]):
        key = (spec, *((tuple(a.shape), a.dtype, a.device) for a in args))
        function = self.functions.get(key)
        if function is None:
            if self.fallback is not None and (key in self._planned or self.frozen):
                function = self._fallback(key, spec, args)  # being made, or never to be: serve it eagerly
            elif self.frozen:
                raise UnwarmedShape(f"no serving function was warmed up for {describe(spec, args)}: warm this "
                                    "setting up before serving it")
            else:
                function = self.functions[key] = self.make(spec, args)
        self.calls.append(key)
        if self.step_marker is not None:
            self.step_marker()
        return function(*args)

    def _fallback(self, key: tuple, spec: ServingSpec, args: list[torch.Tensor]) -> Callable:
        """The fallback's function for a shape, made once (and said once when nobody warmed the shape up)."""
        function = self._fallbacks.get(key)
        if function is None:
            if key not in self._planned:
                log.info("serving %s eagerly: it was not warmed up", describe(spec, args))
            function = self._fallbacks[key] = self.fallback(spec, args)
        return function

    def _zeros_like(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A cached tensor of zeros (never written to)."""
        key = (shape, dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(shape, dtype=dtype, device=self.engine.device)
        return self._zeros[key]

    def _padded(self, tensor: torch.Tensor, spec: ServingSpec, copies: int) -> torch.Tensor:
        """`tensor`'s rows (`copies` repeats of the real rows) each padded with
        zero rows to `spec.rows`; always a fresh contiguous tensor."""
        parts = tensor.chunk(copies) if copies > 1 else [tensor]
        missing = spec.rows - parts[0].shape[0]
        pad = self._zeros_like((missing, *tensor.shape[1:]), tensor.dtype)
        return torch.cat([piece for part in parts for piece in (part, pad)])

    def feature_shapes(self, height: int, width: int) -> dict[tuple[str, str], tuple[int, int]]:
        """(tokens, channels) of every recorded feature at this latent size,
        from one probing call of the UNet (batch 1, no bank), made once."""
        key = (height, width)
        if key not in self._shapes:
            engine = self.engine
            probe = _ShapeProbe()
            embeds = engine.empty_prompt()
            condition = (torch.zeros(1, engine.unet.config.time_cond_proj_dim, device=engine.device,
                                     dtype=engine.dtype) if engine.guidance_embedded else None)
            sample = torch.zeros(1, engine.unet.config.in_channels, height, width, device=engine.device,
                                 dtype=engine.dtype)
            with torch.inference_mode():
                engine.unet(sample, torch.zeros(1, dtype=torch.long, device=engine.device),
                            encoder_hidden_states=embeds, timestep_cond=condition,
                            cross_attention_kwargs={"bank": probe}, return_dict=False)
            self._shapes[key] = probe.shapes
        return self._shapes[key]

    def arguments(self, spec: ServingSpec, shape: CallShape, sample, timestep, embeds, condition,
                  views, residuals) -> list[torch.Tensor]:
        """The serving function's arguments for the streams of `views` (the
        leading rows of each copy of sample, timestep, embeds, condition and
        residuals), padded to `spec.rows` rows per copy."""
        copies = spec.copies
        args = [self._padded(sample, spec, copies), self._padded(timestep, spec, copies),
                self._padded(embeds, spec, copies)]
        if spec.conditioned:
            args.append(self._padded(condition, spec, copies))
        data = []
        for stream in views:
            config = stream.bank.config
            on = config.enabled
            row = [float(stream.bank.stored if on else 0), float(on and config.extended_attention),
                   float(on and config.feature_fusion), float(config.fusion_alpha), float(config.fusion_threshold)]
            data += [row] * len(stream.slots)
        data += [[0.0, 0.0, 0.0, 0.0, NEVER]] * (spec.rows - len(data))
        args.append(torch.tensor(data, dtype=torch.float32).to(self.engine.device, non_blocking=True))
        features = self.feature_shapes(shape.height, shape.width)
        dtype = self.engine.dtype
        for layer, name in spec.banked():
            tokens, channels = features[(layer, name)]
            parts = []
            for stream in views:
                buffer = stream.bank.buffer(layer, name)
                rows = len(stream.slots)
                if buffer is None or not stream.bank.stored:
                    parts.append(self._zeros_like((rows, spec.capacity * tokens, channels), dtype))
                else:
                    parts.append(buffer[as_index(stream.slots)])
            missing = spec.rows - sum(part.shape[0] for part in parts)
            if missing:
                parts.append(self._zeros_like((missing, spec.capacity * tokens, channels), dtype))
            # always a fresh tensor: two inputs sharing memory (one cached block of zeros) would be
            # another graph to torch.compile, made mid-serving
            args.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
        if spec.control:
            down, mid = residuals
            args += [self._padded(residual, spec, copies) for residual in (*down, mid)]
        return args

    # -- warm-up ------------------------------------------------------------------
    def warm_up(self, configs: Iterable[StreamConfig], buckets: Sequence[int] | None = None, *,
                repeats: int | None = None, freeze: bool = False, background: bool | None = None) -> list[tuple]:
        """Make (compile, capture) the function of every bucket for each of
        `configs`' call shapes, by running each `repeats` times on padding
        rows (default: 3 with CUDA graphs, which record on the second run and
        replay from the third; else 1).  Returns the shape keys made.

        freeze: afterwards, make no function any more: a call of another
            shape runs the fallback's function (eager), or raises
            `UnwarmedShape` when there is no fallback.
        background: do it in a thread and return at once; until a shape is
            ready its calls run the fallback's function (eager).  None: the
            backend's default (`background`).
        A failure (a compile that fails) is logged and kept for `wait`; the
        shapes not made then run the fallback, and only a backend without
        one raises it from here."""
        background = self.background if background is None else background
        buckets = self.buckets if buckets is None else tuple(buckets)
        repeats = repeats or (3 if self.clone_outputs else 1)
        shapes = list(dict.fromkeys(self.call_shape(config) for config in configs))
        plan = {self._key_for(shape, bucket): (shape, bucket) for shape in shapes for bucket in buckets}
        if freeze:
            self.frozen = True
        self.warm_error = None
        if background:
            if self.fallback is None:
                raise ValueError("a background warm-up needs a fallback to serve with meanwhile")
            self._planned = set(plan) - set(self.functions)
            self.warming = threading.Thread(target=self._warm_all, args=(plan, repeats), daemon=True,
                                            name="serving-warm-up")
            self.warming.start()
        else:
            self._warm_all(plan, repeats)
            if self.fallback is None:
                self.wait()  # re-raises a failure: nothing else would serve the shapes not made
        return list(plan)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background warm-up; True when it is done (re-raises its error)."""
        if self.warming is not None:
            self.warming.join(timeout)
            if self.warming.is_alive():
                return False
        if self.warm_error is not None:
            raise RuntimeError("the serving warm-up failed") from self.warm_error
        return True

    def _key_for(self, shape: CallShape, bucket: int) -> tuple:
        spec = self.spec_for(shape, bucket)
        args = self._dummy_arguments(spec, shape)
        return (spec, *((tuple(a.shape), a.dtype, a.device) for a in args))

    def _dummy_arguments(self, spec: ServingSpec, shape: CallShape) -> list[torch.Tensor]:
        """Arguments of a call of padding rows only (no stream), shaped as a real call's."""
        engine = self.engine
        empty = lambda *rest, dtype=None: torch.zeros(  # noqa: E731
            0, *rest, device=engine.device, dtype=dtype or engine.dtype)
        prompt = engine.empty_prompt()
        condition = (empty(engine.unet.config.time_cond_proj_dim) if spec.conditioned else None)
        residuals = None
        if spec.control:
            residuals = self._residual_shapes(shape)
        sample = empty(engine.unet.config.in_channels, shape.height, shape.width)
        timestep = empty(dtype=torch.long)
        return self.arguments(spec, shape, sample, timestep, empty(*prompt.shape[1:]), condition, [], residuals)

    def _residual_shapes(self, shape: CallShape):
        """Empty (0-row) ControlNet residuals shaped as at this latent size."""
        engine = self.engine
        sample = torch.zeros(1, engine.unet.config.in_channels, shape.height, shape.width, device=engine.device,
                             dtype=engine.dtype)
        control = torch.zeros(1, 3, shape.height * engine.latent_scale, shape.width * engine.latent_scale,
                              dtype=torch.uint8, device=engine.device)
        with torch.inference_mode():
            down, mid = engine.control_residuals(sample, torch.zeros(1, dtype=torch.long, device=engine.device),
                                                 engine.empty_prompt(), control, [0.0], 1)
        return [d[:0] for d in down], mid[:0]

    def _warm_all(self, plan: dict[tuple, tuple[CallShape, int]], repeats: int) -> None:
        """Make the function of every shape of `plan` not made yet; a failure is kept for `wait`."""
        started = time.monotonic()
        try:
            with torch.inference_mode():
                for number, (key, (shape, bucket)) in enumerate(plan.items(), start=1):
                    since = time.monotonic()
                    spec = self.spec_for(shape, bucket)
                    args = self._dummy_arguments(spec, shape)
                    function = self.functions.get(key)
                    made = function is None
                    if made:
                        function = self.make(spec, args)
                    # A function made before runs again too: CUDA graphs are recorded per thread, and this
                    # may be another thread than the one that made it (a new render thread).
                    for _ in range(repeats):
                        if self.step_marker is not None:
                            self.step_marker()
                        function(*args)
                    self.functions[key] = function
                    self._planned.discard(key)
                    if made:
                        log.info("serving warm-up %d/%d: %s ready in %.1f s", number, len(plan),
                                 describe(spec, args), time.monotonic() - since)
        except Exception as error:  # noqa: BLE001 - kept for `wait`, which re-raises it in the caller
            self.warm_error = error
            self._planned.clear()  # frozen, the shapes left run through the fallback (if any)
            log.warning("serving warm-up failed: %s: %s", type(error).__name__, error)
            return
        log.info("serving warm-up done in %.1f s: %d functions ready", time.monotonic() - started,
                 len(self.functions))


def describe(spec: ServingSpec, args: Sequence[torch.Tensor]) -> str:
    """A serving shape in words, for the log and errors."""
    height, width = args[0].shape[-2:]
    extras = (", classifier-free guidance" if spec.copies > 1 else "") + (", ControlNet" if spec.control else "")
    return f"{spec.rows} rows at latent {height}×{width} (bank of {spec.capacity}{extras})"


def compile_problem() -> str | None:
    """Why torch.compile cannot be used here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python / platform"
    return None


def serving_backend(engine, *, compile: bool = True, mode: str | None = None, buckets: Sequence[int] = BUCKETS,
                    eager_fallback: bool = False, background: bool = False) -> ServingBackend:
    """The app's engine backend: bucketed, fixed-shape UNet calls.

    compile True: torch.compile (CUDA graphs on CUDA, inductor on a CPU);
    False: the same functions eagerly (to start at once, or for tests).
    eager_fallback: a shape whose compiled function is not ready (a
    background warm-up) or was never warmed up (after a frozen warm-up) runs
    the same function eagerly.  background: `warm_up` compiles in a thread by
    default, serving eagerly meanwhile (implies eager_fallback)."""
    if not compile:
        return ServingBackend(engine, eager_function(engine), buckets=buckets)
    problem = compile_problem()
    if problem:
        raise RuntimeError(f"{problem}; use serving_backend(engine, compile=False)")
    graphs = uses_graphs(engine, mode)
    return ServingBackend(engine, compiled_function(engine, mode=mode), buckets=buckets, clone_outputs=graphs,
                          step_marker=torch.compiler.cudagraph_mark_step_begin if graphs else None,
                          fallback=eager_function(engine) if eager_fallback or background else None,
                          background=background)
