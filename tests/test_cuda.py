"""The engine on a CUDA GPU (skipped without one; run by bench/gpu_check.sh).

- the built-in model in float16 on CUDA against float32 on the CPU, same
  seed, with a tolerance that switching the bank off would break;
- SD1.5's full-size architecture (`sd15-random`) at 512² in float16, both
  render modes, bank on and off;
- the fast path (bank as explicit inputs; torch.compile with CUDA graphs)
  against the eager engine;
- no NaN or Inf in any latent along the way (a uint8 picture would hide
  them: NaN turns into 0).
"""

import numpy as np
import pytest
import torch

from sv2v_core import BankConfig, StreamConfig, StreamV2V
from sv2v_core.accel import accelerate, eager_backend
from sv2v_core.models import load_components
from tests.test_method import sketch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZE = 64
FRAMES = 8
SETTLED = 4  # frames after which the bank has filled (latency mode, merge_every=1)
QUEUE = BankConfig(mode="queue", size=2, merge_every=1)
DYME = BankConfig(mode="dyme", merge_every=1)
NONE = BankConfig(mode="none")


def config(bank: BankConfig, mode: str = "latency", size: int = SIZE, steps: int = 4) -> StreamConfig:
    return StreamConfig(prompt="a watercolor painting", width=size, height=size, steps=steps, mode=mode, bank=bank,
                        similarity_skip=None, scene_cut=None)


class Latents:
    """Collects what the decoder receives (the denoised latents) and, unless
    the UNet is compiled, every UNet output, in float32 on the CPU."""

    def __init__(self, components, unet: bool = True):
        self.decoded: list[torch.Tensor] = []
        self.unet_outputs: list[torch.Tensor] = []
        self.handles = [components.vae.decoder.register_forward_pre_hook(
            lambda module, args: self.decoded.append(args[0].float().cpu()))]
        if unet:
            self.handles.append(components.unet.register_forward_hook(
                lambda module, args, output: self.unet_outputs.append(output[0].float().cpu())))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in self.decoded + self.unet_outputs)


def tiny_latents(device: str, dtype: torch.dtype, bank: BankConfig) -> torch.Tensor:
    """The built-in model's denoised latents of a moving sketch once the bank has filled (float32, on the CPU)."""
    components = load_components("tiny", device=device, dtype=dtype)
    engine = StreamV2V(components)
    latents = Latents(components)
    try:
        state = engine.new_stream(config(bank))
        for step in range(FRAMES):
            engine(state, sketch(step))
    finally:
        latents.remove()
        engine.close()
    assert latents.finite(), (device, dtype, bank.mode)
    return torch.cat(latents.decoded)[SETTLED:]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Relative L2 distance of the settled latents.  Half precision on the CPU
# measured 0.07 % (float16) against float32, and the bank switched off moves
# them by about 2 %: a tolerance of 0.6 % tells the two apart.
HALF_TOLERANCE = 0.006


def test_float16_on_cuda_matches_float32_on_the_cpu():
    # A queue bank: deterministic on any device (DyMe's random splits are drawn
    # on the device, and CUDA's generator is not the CPU's).
    reference = tiny_latents("cpu", torch.float32, QUEUE)
    without_bank = relative(tiny_latents("cpu", torch.float32, NONE), reference)
    on_cuda = relative(tiny_latents("cuda", torch.float16, QUEUE), reference)
    print(f"tiny, queue(2): float16 on CUDA vs float32 on the CPU {on_cuda:.3%}; bank off {without_bank:.3%}")
    assert without_bank > HALF_TOLERANCE  # a disabled bank would fail the next check
    assert on_cuda < HALF_TOLERANCE


def test_dyme_in_float16_matches_float32_on_cuda():
    reference = tiny_latents("cuda", torch.float32, DYME)
    without_bank = relative(tiny_latents("cuda", torch.float32, NONE), reference)
    half = relative(tiny_latents("cuda", torch.float16, DYME), reference)
    print(f"tiny, DyMe(1) on CUDA: float16 vs float32 {half:.3%}; bank off {without_bank:.3%}")
    assert without_bank > HALF_TOLERANCE
    assert half < HALF_TOLERANCE


# ---------------------------------------------------------------- SD1.5's size


@pytest.fixture(scope="module")
def sd15():
    engine = StreamV2V(load_components("sd15-random", device="cuda", dtype=torch.float16))
    yield engine
    engine.close()


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_sd15_size_renders_finite_frames_with_and_without_the_bank(sd15, mode):
    size = 512
    frames = [sketch(step * 4, size=size) for step in range(6)]
    latents, images = {}, {}
    for name, bank in (("none", NONE), ("dyme", DYME)):
        collected = Latents(sd15.components)
        try:
            state = sd15.new_stream(config(bank, mode, size))
            outputs = [sd15(state, frame) for frame in frames] + sd15.flush(state)
        finally:
            collected.remove()
        assert collected.unet_outputs and collected.finite(), (mode, name)
        converged = [o for o in outputs if o.source_index >= 0]
        assert [o.source_index for o in converged] == list(range(len(frames)))
        assert all(o.image.shape == (size, size, 3) and o.image.std() > 1 for o in converged)
        latents[name], images[name] = torch.cat(collected.decoded), [o.image.astype(int) for o in converged]
    # Random weights render a nearly flat picture, on which the bank moves the
    # latents but hardly the pixels: compare the latents.  Measured moves, from
    # the third frame on: 0.6 % at 64² in float32 on the CPU; 0.15 % (stream)
    # and 0.20 % (latency) at 512² in float16 on an H100.  With an empty bank
    # (the first frame in latency mode) the two renders are the same
    # computation: they match to well under 0.01 % (0.00 % on the H100).
    changes = [relative(a, b) for a, b in zip(latents["none"], latents["dyme"])]
    print(f"sd15-random {mode}: the bank moves the latents by {', '.join(f'{c:.2%}' for c in changes)}")
    if mode == "latency":
        assert changes[0] < 1e-4
        assert np.abs(images["none"][0] - images["dyme"][0]).max() <= 1
    assert max(changes[2:]) > 0.0005


# ---------------------------------------------------------------- the fast path


def tiny_renders(engine, bank: BankConfig, mode: str = "stream") -> list[np.ndarray]:
    state = engine.new_stream(config(bank, mode, steps=2))
    return [engine(state, sketch(step)).image.astype(int) for step in range(FRAMES)]


def mean_gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a[SETTLED:], b[SETTLED:])]))


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_bank_as_explicit_inputs_on_cuda_matches_eager(mode):
    engine = StreamV2V(load_components("tiny", device="cuda", dtype=torch.float16))
    try:
        plain = tiny_renders(engine, DYME, mode)
        without_bank = tiny_renders(engine, NONE, mode)
        engine.backend = eager_backend(engine)
        functional = tiny_renders(engine, DYME, mode)
    finally:
        engine.close()
    gap, bank_gap = mean_gap(functional, plain), mean_gap(without_bank, plain)
    print(f"tiny {mode}, float16 on CUDA: bank as inputs vs eager {gap:.3f} levels; bank off {bank_gap:.3f}")
    assert bank_gap > 0.3
    assert gap < bank_gap / 4


def test_compiled_with_cuda_graphs_matches_eager():
    reference = StreamV2V(load_components("tiny", device="cuda", dtype=torch.float16))
    fast = StreamV2V(load_components("tiny", device="cuda", dtype=torch.float16))
    torch._dynamo.reset()
    try:
        plain = tiny_renders(reference, DYME)
        without_bank = tiny_renders(reference, NONE)
        report = accelerate(fast, compile=True, compile_mode="reduce-overhead")
        assert "torch.compile" in report.compiled, report
        latents = Latents(fast.components, unet=False)
        try:
            compiled = tiny_renders(fast, DYME)
        finally:
            latents.remove()
        assert latents.decoded and latents.finite()
    finally:
        fast.backend = None
        reference.close()
        fast.close()
        torch._dynamo.reset()
    gap, bank_gap = mean_gap(compiled, plain), mean_gap(without_bank, plain)
    print(f"tiny stream, float16 on CUDA: compiled (CUDA graphs) vs eager {gap:.3f} levels; bank off {bank_gap:.3f}")
    assert bank_gap > 0.3
    assert gap < bank_gap / 4


def test_the_apps_engine_on_cuda_gets_the_serving_fast_path_and_compiled_serving_graphs():
    """The app's engine on CUDA: the fast path, and compiled serving graphs with an eager fallback.
    Frozen with nothing warmed up (compiling every bucket of SD1.5 is the app stage's to time), its
    frames run through the fallback, eagerly, between the graphs' step markers."""
    from app import load_engine
    from sv2v_core.serving import ServingBackend

    engine, notice = load_engine("sd15-random", None)
    try:
        assert engine.device.type == "cuda" and engine.dtype == torch.float16 and notice is not None
        assert engine.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.backends.cudnn.benchmark
        backend = engine.backend
        assert isinstance(backend, ServingBackend) and backend.clone_outputs and backend.fallback is not None
        assert not backend.background  # on CUDA the graphs are made before serving, on the render thread
        engine.warm_up([], freeze=True)
        state = engine.new_stream(config(DYME, "latency", 512))
        image = [engine(state, sketch(step * 4, size=512)).image for step in range(3)][-1]
        assert image.shape == (512, 512, 3) and image.std() > 1
        assert backend._fallbacks and not backend.functions  # eagerly: nothing compiled mid-request
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["latency", "stream"])
def test_serving_graphs_on_cuda_match_eager(mode):
    """The serving functions compiled with CUDA graphs ("reduce-overhead"),
    every bucket warmed up and frozen, no recompilation afterwards: three
    streams (bucket 4, padded), one joining late (an empty bank beside full
    ones), each close to its eager render alone."""
    from sv2v_core.serving import serving_backend

    engine = StreamV2V(load_components("tiny", device="cuda", dtype=torch.float16))
    torch._dynamo.reset()
    settings = [config(DYME, mode, steps=2), config(NONE, mode, steps=2).replace(seed=1),
                config(BankConfig(merge_every=2, feature_fusion=False), mode, steps=2).replace(seed=2)]
    joins = [0, 0, 3]
    try:
        alone = []
        for setting, join in zip(settings, joins):
            state = engine.new_stream(setting)
            alone.append({step: engine(state, sketch(step)).image.astype(int) for step in range(join, FRAMES)})
        without_bank = tiny_renders(engine, NONE, mode)
        engine.backend = serving_backend(engine, compile=True, buckets=(1, 2, 4))
        engine.warm_up([settings[0]], freeze=True)
        served = [{} for _ in settings]
        states = {}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(FRAMES):
                present = [index for index, join in enumerate(joins) if step >= join]
                for index in present:
                    states.setdefault(index, engine.new_stream(settings[index]))
                outputs = engine.render([(states[index], sketch(step)) for index in present])
                for index, output in zip(present, outputs):
                    served[index][step] = output.image.astype(int)
        buckets = {spec.rows for spec, *_ in engine.backend.calls}
    finally:
        engine.backend = None
        engine.close()
        torch._dynamo.reset()
    rows = 2 if mode == "stream" else 1
    assert buckets == {2 * rows, 4 * rows}  # two streams, then three padded to four
    plain = [alone[0][step] for step in range(FRAMES)]
    bank_gap = mean_gap(without_bank, plain)
    gaps = [float(np.mean([np.abs(served[index][step] - alone[index][step]).mean()
                           for step in alone[index] if step >= SETTLED])) for index in range(len(settings))]
    print(f"tiny {mode}, float16 on CUDA: serving graphs vs eager {max(gaps):.3f} levels; bank off {bank_gap:.3f}")
    assert bank_gap > 0.3
    assert max(gaps) < bank_gap / 4
