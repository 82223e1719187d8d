"""The UNet with the bank as explicit inputs/outputs: ONNX export of the tiny
model with a non-empty bank, checked with onnxruntime (CPU) against PyTorch."""

import numpy as np
import pytest
import torch

from sv2v_core import BankConfig, StreamConfig
from sv2v_core.onnx_export import TensorRTBackend, check_onnx, export_onnx, next_call, require_tensorrt

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = 64


def _filled_state(engine, mode: str):
    # fusion_threshold −1: every token fuses, so feature fusion visibly runs inside the graph.
    bank = BankConfig(mode="dyme", merge_every=1, fusion_threshold=-1.0)
    state = engine.new_stream(StreamConfig(prompt="a watercolor painting", width=SIZE, height=SIZE, steps=2, mode=mode,
                                           bank=bank, similarity_skip=None, scene_cut=None))
    for index in range(3):  # stored, then merged twice
        image = np.full((SIZE, SIZE, 3), 255, np.uint8)
        image[16:32, 4 + 3 * index: 30 + 3 * index] = (40, 80, 200)
        engine(state, image)
    assert state.bank.merges >= 1 and state.bank.layers
    return state


@pytest.fixture(scope="module")
def exported(engine, tmp_path_factory):
    """(state, export) per render mode, made once."""
    made = {}

    def get(mode):
        if mode not in made:
            state = _filled_state(engine, mode)
            made[mode] = state, export_onnx(engine, state, tmp_path_factory.mktemp(mode) / "unet.onnx")
        return made[mode]

    return get


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_onnx_graph_matches_pytorch_with_a_full_bank(engine, exported, mode):
    state, export = exported(mode)
    layers = engine.patch.layers
    # every self-attention layer takes banked k and v; the fusion layers also o
    assert sum(name in ("k", "v") for _, name in export.spec.inputs) == 2 * len(layers)
    assert any(name == "o" for _, name in export.spec.inputs)
    assert len(export.spec.outputs) == len(export.output_names) - 1
    result = check_onnx(engine, state, export, atol=1e-4, rtol=1e-3)
    assert result.ok, str(result)
    assert result.compared == 1 + len(export.spec.outputs)


def test_the_bank_inputs_change_the_onnx_output(exported):
    _, export = exported("stream")
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    feeds = {name: arg.detach().cpu().numpy() for name, arg in zip(export.input_names, export.args)}
    eps = session.run(["eps"], feeds)[0]
    for name in export.input_names[3:]:
        feeds[name] = feeds[name][:, ::-1].copy() * 0.5  # other past features
    changed = session.run(["eps"], feeds)[0]
    assert np.abs(changed - eps).max() > 1e-4


def test_next_call_leaves_the_stream_untouched(engine):
    state = _filled_state(engine, "stream")
    before = {layer: {n: t.clone() for n, t in stored.items()} for layer, stored in state.bank.layers.items()}
    frames_in = state.frames_in
    call = next_call(engine, state)
    assert call.sample.shape[0] == 2
    assert state.frames_in == frames_in
    for layer, stored in state.bank.layers.items():
        for name, tensor in stored.items():
            assert torch.equal(tensor, before[layer][name])


def test_tensorrt_says_plainly_when_it_is_missing(engine):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="TensorRT is not installed"):
            require_tensorrt()
        with pytest.raises(RuntimeError, match="TensorRT is not installed"):
            TensorRTBackend(engine)
    else:
        pytest.skip("tensorrt is installed here")
