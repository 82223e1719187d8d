"""ZeroGPU: stream states that cross a process boundary, and the detection of ZeroGPU.

On ZeroGPU the model work runs in a worker process that gets its
arguments pickled, so a stream's state must pickle and, unpickled, go on
exactly as if it had never left.
"""

import pickle

import numpy as np
import pytest
import torch

from sv2v_core.config import StreamConfig


def _frames(count: int, side: int = 64) -> list[np.ndarray]:
    """Frames that keep changing (so neither the similarity filter nor a scene cut hides anything)."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (side, side, 3)).astype(np.int16)
    return [np.clip(base + 9 * index, 0, 255).astype(np.uint8) for index in range(count)]


@pytest.mark.parametrize("bank, fusion, mode", [
    ("none", False, "latency"),
    ("queue", False, "latency"),
    ("queue", True, "stream"),
    ("dyme", False, "stream"),
    ("dyme", True, "latency"),
    ("dyme", True, "stream"),
])
def test_a_stream_pickled_midway_goes_on_exactly(engine, bank, fusion, mode):
    config = StreamConfig(width=64, height=64, mode=mode, similarity_skip=None, scene_cut=None, seed=3).replace(
        bank_mode=bank, bank_size=2 if bank == "queue" else 1, bank_feature_fusion=fusion,
        bank_merge_every=2)
    frames = _frames(12)
    plain = engine.new_stream(config)
    pickled = pickle.loads(pickle.dumps(engine.new_stream(config)))  # a fresh stream pickles too
    for frame in frames[:7]:
        engine(plain, frame)
        engine(pickled, frame)
    assert plain.bank.stored or bank == "none"  # the bank holds frames before the pickling
    assert plain.bank.merges or bank != "dyme"  # and a DyMe bank has merged
    pickled = pickle.loads(pickle.dumps(pickled))
    for frame in frames[7:]:
        expected, got = engine(plain, frame), engine(pickled, frame)
        assert np.array_equal(expected.image, got.image) and expected.source_index == got.source_index
    assert pickled.bank.merges == plain.bank.merges and pickled.bank.frames == plain.bank.frames
    for layer, features in plain.bank.layers.items():
        for name, tensor in features.items():
            assert torch.equal(tensor, pickled.bank.layers[layer][name])
    assert torch.equal(plain.bank.generator.get_state(), pickled.bank.generator.get_state())
