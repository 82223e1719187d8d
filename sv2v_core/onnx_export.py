"""The UNet with the feature bank as explicit inputs and outputs: ONNX export,
an onnxruntime check against PyTorch, and an optional TensorRT backend.

The published StreamV2V code could not run its bank under TensorRT because
the bank lived inside the attention processors.  Here the exported graph is
`accel.BankUNet`, a pure function:

    inputs:  sample, timestep, encoder_hidden_states, [timestep_cond],
             bank.<layer>.k / .v  (every self-attention layer, when the bank holds them),
             bank.<layer>.o       (the fusion layers),
             control.down.<i>, control.mid  (a ControlNet's residuals, with a ControlNet)
    outputs: eps, new.<layer>.k / .v / .o   (the current frame's features)

with extended attention and feature fusion inside the graph.  The bank
update (DyMe merge, queue) stays outside, in PyTorch, exactly as in the eager
engine.  Each bank shape (no bank yet, each queue length) is its own graph.

    python -m sv2v_core.onnx_export --check       # tiny model, onnxruntime on CPU
    python -m sv2v_core.onnx_export --check --controlnet tiny
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accel import BankRunner, BankSpec, BankUNet, bank_spec, call_args
from .bank import BankView, FeatureBank, as_index
from .stream import StreamState

OPSET = 17


@dataclass
class UNetCall:
    """The arguments of one UNet call of a stream, as the engine makes them."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    condition: torch.Tensor | None
    view: BankView
    residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None  # the ControlNet's (down, mid)

    def args(self, layers: list[str]) -> tuple[BankSpec, list[torch.Tensor]]:
        """The `BankUNet` spec of this call and its arguments, in order."""
        spec, banked = bank_spec(self.view, layers)
        return call_args(spec, self.sample, self.timestep, self.encoder_hidden_states, self.condition, banked,
                         self.residuals)


def next_call(engine, state: StreamState, seed: int = 0) -> UNetCall:
    """The arguments of `state`'s next UNet call (stream batch or one latency
    step), with a seeded random sample; no classifier-free guidance.  With a
    ControlNet the residuals come from the stream's newest control image
    (stream mode: each slot's own)."""
    slots = list(range(state.config.steps)) if state.config.mode == "stream" else [0]
    generator = torch.Generator().manual_seed(seed)
    noise = state.noise[as_index(slots)]
    sample = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
    embeds = state.prompt_embeds.expand(len(slots), -1, -1)
    timesteps = state.schedule["timesteps"][as_index(slots)]
    condition = engine._condition(state, len(slots)) if engine.guidance_embedded else None
    residuals = None
    if engine.controlled(state):
        if state.last_control is None:
            raise ValueError("the stream has rendered no frame yet: it has no control image to export with")
        control = state.last_control
        if len(slots) > 1:
            control = torch.cat([control, state.in_flight_control]) if state.in_flight_control is not None \
                else control.expand(len(slots), -1, -1, -1)
        residuals = engine.control_residuals(sample, timesteps, embeds, control, [engine.control_scale(state)],
                                             len(slots))
    return UNetCall(sample, timesteps, embeds, condition, BankView(state.bank, slots), residuals)


@dataclass
class OnnxExport:
    path: Path
    spec: BankSpec
    input_names: list[str]
    output_names: list[str]
    args: list[torch.Tensor] = field(repr=False)


def _io_names(spec: BankSpec, conditioned: bool) -> tuple[list[str], list[str]]:
    """Input and output names, in `BankUNet`'s order."""
    inputs = ["sample", "timestep", "encoder_hidden_states", *(["timestep_cond"] if conditioned else [])]
    return inputs + spec.input_names(), ["eps"] + spec.output_names()


def export_spec(unet, spec: BankSpec, args: list[torch.Tensor], path: str | Path, opset: int = OPSET) -> OnnxExport:
    """Export `BankUNet(unet, spec)` traced on `args` to `path` (static shapes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = BankUNet(unet, spec).eval()
    input_names, output_names = _io_names(spec, module.conditioned)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # shape checks in diffusers' code become constants: the graph is for these shapes only
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, tuple(a.clone() for a in args), str(path), input_names=input_names, output_names=output_names,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return OnnxExport(path, spec, input_names, output_names, list(args))


def export_onnx(engine, state: StreamState, path: str | Path, opset: int = OPSET) -> OnnxExport:
    """Export the UNet as it would run `state`'s next call (its bank's current shapes)."""
    spec, args = next_call(engine, state).args(engine.patch.layers)
    return export_spec(engine.unet, spec, args, path, opset)


@dataclass
class CheckResult:
    ok: bool
    eps_max_abs: float
    features_max_abs: float
    worst_feature: str
    compared: int
    atol: float
    rtol: float

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (f"ONNX check {verdict}: eps max |diff| {self.eps_max_abs:.2e}, recorded features max |diff| "
                f"{self.features_max_abs:.2e} ({self.worst_feature}), {self.compared} tensors compared "
                f"(atol {self.atol:g} + rtol {self.rtol:g}·|ref|)")


@torch.inference_mode()
def check_onnx(engine, state: StreamState, export: OnnxExport, *, atol: float = 1e-3, rtol: float = 1e-3) -> CheckResult:
    """Run the export with onnxruntime on CPU and compare it with the engine's
    own eager path (the patched diffusers UNet and a `BankView` of the same
    bank): eps and every recorded feature (k, v, o)."""
    import onnxruntime as ort

    call = next_call(engine, state)
    # The reference: the eager hooks path, recording into a scratch bank that
    # shares the stored frames (the stream's own bank is left untouched).
    scratch = FeatureBank(state.bank.config)
    scratch.buffers, scratch.stored = state.bank.buffers, state.bank.stored
    view = BankView(scratch, call.view.slots)
    down, mid = call.residuals if call.residuals is not None else (None, None)
    eps = engine.unet(call.sample, call.timestep, encoder_hidden_states=call.encoder_hidden_states,
                      timestep_cond=call.condition, cross_attention_kwargs={"bank": view},
                      down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
    reference = {"eps": eps}
    for layer, name in export.spec.outputs:
        reference[f"new.{layer}.{name}"] = torch.cat(scratch._pending[layer][name])

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    spec, args = call.args(engine.patch.layers)
    if spec != export.spec:
        raise ValueError("the stream's bank (or ControlNet use) no longer matches what the ONNX graph was exported for")
    wanted = {i.name for i in session.get_inputs()}  # constant-folded inputs may be gone
    feeds = {name: a.detach().cpu().numpy() for name, a in zip(export.input_names, args) if name in wanted}
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    worst, worst_name, eps_err, ok = 0.0, "", 0.0, True
    for name, ref in reference.items():
        ref = ref.float().cpu().numpy()
        got = results[name].astype(np.float32)
        err = float(np.abs(got - ref).max())
        ok &= bool(np.all(np.abs(got - ref) <= atol + rtol * np.abs(ref)))
        if name == "eps":
            eps_err = err
        elif err >= worst:
            worst, worst_name = err, name
    return CheckResult(ok, eps_err, worst, worst_name, len(reference), atol, rtol)


# ---------------------------------------------------------------- TensorRT


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise RuntimeError(
            "TensorRT is not installed; the TensorRT backend needs the `tensorrt` Python package and a CUDA GPU "
            "(pip install tensorrt on an NVIDIA host). The ONNX export and its onnxruntime check work without it; "
            "for speed without TensorRT use --compile."
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA GPU, and none is available")
    return tensorrt


class TensorRTBackend:
    """An engine backend (`engine.backend = TensorRTBackend(engine)`): builds a
    TensorRT engine per bank shape from the ONNX export of `BankUNet` and runs
    it on the current CUDA stream.  Built engines are cached in `cache_dir`.

    Raises RuntimeError at construction where TensorRT is not installed: there
    is no silent fallback to PyTorch.
    """

    def __init__(self, engine, cache_dir: str | Path = "trt_cache", *, fp16: bool = True,
                 workspace_gib: float = 8.0) -> None:
        self.trt = require_tensorrt()
        if engine.device.type != "cuda":
            raise RuntimeError("the TensorRT backend needs the model on a CUDA device")
        self.engine = engine
        self.cache_dir = Path(cache_dir)
        self.fp16 = fp16
        self.workspace = int(workspace_gib * (1 << 30))
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runner = BankRunner(engine.patch.layers, self._make)

    def __call__(self, sample, timestep, embeds, condition, view, residuals=None):
        return self.runner(sample, timestep, embeds, condition, view, residuals)

    def _key(self, spec: BankSpec, args) -> str:
        text = repr((spec, [(tuple(a.shape), str(a.dtype)) for a in args], self.fp16, str(self.engine.dtype)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _make(self, spec: BankSpec, args):
        trt = self.trt
        key = self._key(spec, args)
        plan = self.cache_dir / f"unet-{key}.plan"
        if not plan.exists():
            onnx_path = self.cache_dir / f"unet-{key}" / "unet.onnx"
            export_spec(self.engine.unet, spec, args, onnx_path)
            builder = trt.Builder(self.logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, self.logger)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"TensorRT could not parse the exported UNet: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
            if self.fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise RuntimeError("TensorRT failed to build an engine for the UNet (see its log above)")
            plan.write_bytes(bytes(serialized))
        runtime = trt.Runtime(self.logger)
        cuda_engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        return _TensorRTFunction(trt, cuda_engine, *_io_names(spec, self.engine.guidance_embedded))


class _TensorRTFunction:
    def __init__(self, trt, cuda_engine, input_names: list[str], output_names: list[str]) -> None:
        self.trt = trt
        self.cuda_engine = cuda_engine
        self.context = cuda_engine.create_execution_context()
        self.input_names = input_names
        self.output_names = output_names
        self.outputs: dict[str, torch.Tensor] = {}

    def _dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bfloat16: torch.bfloat16}
        return table[self.cuda_engine.get_tensor_dtype(name)]

    def __call__(self, *args):
        present = {self.cuda_engine.get_tensor_name(i) for i in range(self.cuda_engine.num_io_tensors)}
        keep = []
        for name, value in zip(self.input_names, args):
            if name not in present:
                continue
            value = value.to(self._dtype(name)).contiguous()
            keep.append(value)
            self.context.set_tensor_address(name, value.data_ptr())
        results = []
        for name in self.output_names:
            shape = tuple(self.cuda_engine.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT failed to run the UNet engine")
        dtype = args[0].dtype
        return [r.to(dtype) for r in results]


# ---------------------------------------------------------------- command line


def _demo_state(engine, size: int, steps: int, mode: str, frames: int):
    from .config import BankConfig, StreamConfig

    config = StreamConfig(prompt="a watercolor painting", width=size, height=size, steps=steps, mode=mode,
                          bank=BankConfig(mode="dyme", merge_every=1), similarity_skip=None, scene_cut=None)
    state = engine.new_stream(config)
    for index in range(frames):  # fill the bank: first frame stored, later ones merged
        image = np.full((size, size, 3), 255, np.uint8)
        image[size // 4: size // 2, 4 + 3 * index: size // 2 + 3 * index] = (40, 80, 200)
        image[size * 3 // 4, size // 8: size * 7 // 8 - 2 * index] = (20, 20, 20)  # a stroke for the ControlNet
        engine(state, image)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sv2v_core.onnx_export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", default="stream", choices=("stream", "latency"))
    parser.add_argument("--controlnet", default=None, help="also feed this ControlNet's residuals (e.g. tiny)")
    parser.add_argument("--output", default=None, help="where to write the .onnx (default: a temporary folder)")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime (CPU) with PyTorch")
    args = parser.parse_args(argv)

    from .engine import StreamV2V
    from .models import load_components

    engine = StreamV2V(load_components(args.model, controlnet=args.controlnet))
    state = _demo_state(engine, args.size, args.steps, args.mode, frames=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.output) if args.output else Path(tmp) / "unet.onnx"
        export = export_onnx(engine, state, path)
        control = f", {export.spec.control + 1} ControlNet residuals" if export.spec.control else ""
        print(f"exported {path}: {len(export.input_names)} inputs ({len(export.spec.inputs)} banked{control}), "
              f"{len(export.output_names)} outputs")
        if args.check:
            result = check_onnx(engine, state, export)
            print(result)
            return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
