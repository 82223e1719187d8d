"""The fast path on CPU: the functional (bank-as-inputs) UNet, torch.compile
and bfloat16 give the same renders as the eager engine, within tolerance."""

import numpy as np
import pytest
import torch

from sv2v_core import BankConfig, StreamConfig, StreamV2V
from sv2v_core.accel import BankRunner, BankUNet, accelerate, eager_backend
from sv2v_core.models import load_components

SIZE = 64


def frames(count: int) -> list[np.ndarray]:
    out = []
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for index in range(count):
        image = np.full((SIZE, SIZE, 3), 255, np.uint8)
        image[(yy - SIZE // 2) ** 2 + (xx - SIZE // 3 - 2 * index) ** 2 < (SIZE // 5) ** 2] = (40, 80, 200)
        out.append(image)
    return out


def config(mode="stream", bank=None) -> StreamConfig:
    bank = bank or BankConfig(mode="dyme", merge_every=2)
    return StreamConfig(prompt="a watercolor painting", width=SIZE, height=SIZE, steps=2, mode=mode, bank=bank,
                        similarity_skip=None, scene_cut=None)


def render(engine, cfg, count=5):
    state = engine.new_stream(cfg)
    return [engine(state, frame).image.astype(int) for frame in frames(count)], state


@pytest.mark.parametrize("mode", ["stream", "latency"])
@pytest.mark.parametrize("bank", [BankConfig(mode="dyme", merge_every=2), BankConfig(mode="queue", size=2, merge_every=1),
                                  BankConfig(mode="none")], ids=["dyme", "queue2", "none"])
def test_bank_as_explicit_inputs_renders_the_same(engine, mode, bank):
    engine.backend = None
    plain, plain_state = render(engine, config(mode, bank))
    engine.backend = eager_backend(engine)
    try:
        functional, state = render(engine, config(mode, bank))
    finally:
        engine.backend = None
    for a, b in zip(plain, functional):
        assert np.array_equal(a, b)  # same operations in the same order (DyMe's random splits included)
    assert state.bank.nbytes() == plain_state.bank.nbytes()
    assert state.bank.merges == plain_state.bank.merges


def test_compile_path_constructs_and_matches(engine):
    torch._dynamo.reset()
    plain, _ = render(engine, config(), count=3)
    report = accelerate(engine, compile=True, compile_backend="eager", compile_mode="default", channels_last=False)
    try:
        assert "torch.compile" in report.compiled
        compiled, _ = render(engine, config(), count=3)
        # warm-up (empty bank, nothing recorded), the first stored frame (empty bank, recording),
        # then a one-frame bank (not due: nothing recorded)
        assert len(engine.backend.functions) == 3
    finally:
        engine.backend = None
        torch._dynamo.reset()
    for a, b in zip(plain, compiled):
        assert np.abs(a - b).max() <= 1


def test_channels_last_renders_the_same():
    reference = StreamV2V(load_components("tiny"))
    fast = StreamV2V(load_components("tiny"))
    try:
        report = accelerate(fast, channels_last=True)
        assert report.channels_last
        a, _ = render(reference, config(), count=3)
        b, _ = render(fast, config(), count=3)
        for x, y in zip(a, b):
            assert np.abs(x - y).max() <= 1
    finally:
        reference.close()
        fast.close()


def test_each_function_serves_only_the_signature_it_was_made_for(engine):
    """A compiled graph or TensorRT engine is built for fixed shapes: one made
    for a 4-row batch at 64² must never run a 1-row batch or another size,
    even when the bank is empty (same bank signature)."""
    made = []

    def make(spec, args):
        signature = [(tuple(a.shape), a.dtype) for a in args]
        made.append(signature)
        module = BankUNet(engine.unet, spec).eval()

        def function(*call_args):
            assert [(tuple(a.shape), a.dtype) for a in call_args] == signature
            return module(*call_args)

        return function

    engine.backend = BankRunner(engine.patch.layers, make)
    try:
        for width, mode in ((64, "stream"), (64, "latency"), (96, "latency"), (96, "stream")):
            settings = config(mode, BankConfig(mode="none")).replace(width=width)
            render(engine, settings, count=2)
    finally:
        engine.backend = None
    assert len(made) == 4 and len({repr(signature) for signature in made}) == 4


def test_xformers_requested_but_missing_is_an_error(engine):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="xformers was requested but is not installed"):
            accelerate(engine, xformers=True, channels_last=False)
    else:
        pytest.skip("xformers is installed")


def test_compile_needs_the_engine(engine):
    with pytest.raises(ValueError, match="engine"):
        accelerate(engine.components, compile=True, channels_last=False)


def test_serving_defaults_leave_a_cpu_engine_as_it_is(engine):
    from sv2v_core.accel import accelerate_for_serving

    weight = engine.unet.conv_in.weight
    assert accelerate_for_serving(engine) is None
    assert engine.unet.conv_in.weight is weight and weight.is_contiguous()
    assert engine.backend is None
