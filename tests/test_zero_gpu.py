"""ZeroGPU: stream states that cross a process boundary, and the detection of ZeroGPU.

On ZeroGPU the model work runs in a worker process that gets its
arguments pickled, so a stream's state must pickle and, unpickled, go on
exactly as if it had never left.
"""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.test_renderer as renderer_tests
from sv2v_core.config import StreamConfig
from sv2v_core.video import read_video
from tests.test_renderer import LATENCY, LOCAL_CAP, STREAM
from ui.local_renderer import local_renderer
from ui.renderer import StepRequest


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


# -- the renderer under a stand-in for ZeroGPU (tests/fake_spaces) -----------------------------

FAKE_SPACES = Path(__file__).parent / "fake_spaces"


@pytest.fixture()
def on_zero_gpu(monkeypatch):
    """SPACES_ZERO_GPU=1 with the stand-in `spaces` importable."""
    monkeypatch.syspath_prepend(str(FAKE_SPACES))
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    sys.modules.pop("spaces", None)
    yield
    sys.modules.pop("spaces", None)


@pytest.fixture(params=["kept", "replaced"])
def backend(request, engine, on_zero_gpu):
    """(renderer, its session cap) on the stand-in ZeroGPU: its worker kept between calls, or
    replaced before every third call (a lost worker)."""
    renderer = local_renderer(engine, max_sessions=LOCAL_CAP)
    if request.param == "replaced":
        gpu = renderer._crossing._gpu
        gpu._replace_every = 3
    yield renderer, LOCAL_CAP
    renderer.shutdown()
    renderer._crossing._gpu.replace_worker()


# The in-process renderer's behaviour, every call through the stand-in's worker process.
test_renders_equal_the_engine_alone_and_keep_one_epoch = renderer_tests.test_renders_equal_the_engine_alone_and_keep_one_epoch
test_stream_mode_end_flushes_to_the_newest_frame = renderer_tests.test_stream_mode_end_flushes_to_the_newest_frame
test_reset_and_cut_empty_the_bank_of_that_session_only = renderer_tests.test_reset_and_cut_empty_the_bank_of_that_session_only
test_bad_frame_is_refused_and_the_session_goes_on = renderer_tests.test_bad_frame_is_refused_and_the_session_goes_on
test_a_session_that_comes_back_starts_a_fresh_stream = renderer_tests.test_a_session_that_comes_back_starts_a_fresh_stream
test_a_comparison_renders_the_same_frames_on_a_second_stream_without_the_bank = \
    renderer_tests.test_a_comparison_renders_the_same_frames_on_a_second_stream_without_the_bank
test_a_replay_renders_the_frame_as_a_fresh_bank_would_after_those_frames = \
    renderer_tests.test_a_replay_renders_the_frame_as_a_fresh_bank_would_after_those_frames
renderer = renderer_tests.renderer
session_ids = renderer_tests.session_ids


def test_a_long_stream_crosses_light_and_survives_any_lost_worker(engine, on_zero_gpu):
    """Twenty frames of one DyMe stream on the stand-in, the worker replaced at a different call each
    run: the renders equal the engine's alone, the calls carry no stream state in (only the rare
    restore does) and bring it back only every CHECKPOINT_EVERY calls, and each call asks for a
    short duration."""
    inputs = renderer_tests.frames(20, 6)
    expected = renderer_tests.reference(engine, LATENCY, inputs, end=False)
    for lost_at in (None, 1, 5, 11):
        renderer = local_renderer(engine)
        gpu = renderer._crossing._gpu
        try:
            replies = []
            for index, frame in enumerate(inputs):
                if index == lost_at:
                    gpu.replace_worker()
                replies.append(renderer.step("artist", StepRequest(frame, LATENCY)).result(120))
            for reply, image in zip(replies, expected):
                np.testing.assert_array_equal(reply.image, image)
            assert [reply.input_index for reply in replies] == list(range(20))
            assert gpu.workers_started == (1 if lost_at is None else 2)
            assert gpu.calls == 20 + (lost_at is not None)  # a lost worker costs one more call
            assert all(0 < seconds <= 30 for seconds in gpu.durations)
            frame_bytes = inputs[0].nbytes
            if lost_at is None:
                assert max(gpu.sent) < frame_bytes + 20_000, "a call carries the frame and settings, no state"
                brought = sorted(gpu.received)
                assert brought[-1] > 10 * brought[-3], "the full state comes back twice in 20 calls"
                assert brought[-3] < frame_bytes + 20_000
        finally:
            renderer.shutdown()
            gpu.replace_worker()


@pytest.mark.parametrize("lost_at", [None, 1, 2])
def test_a_video_translates_through_the_one_gpu_function_chunk_by_chunk(engine, on_zero_gpu, tmp_path,
                                                                        monkeypatch, lost_at):
    """19 frames: three chunks, the worker keeping the video's stream between them, its state back
    only at the checkpoint (every 2nd chunk here); the worker lost before chunk 1 (rebuilt from the
    start and chunk 0) or chunk 2 (rebuilt from the checkpoint): the same images as the engine's."""
    import ui.crossing
    from sv2v_core.video import write_video

    monkeypatch.setattr(ui.crossing, "CHECKPOINT_EVERY", 2)
    inputs = renderer_tests.frames(19, 8)  # two full chunks and a part
    source = write_video(tmp_path / "in.mp4", inputs)
    decoded = [frame for frame in read_video(source)[0]]
    config = STREAM.replace(bank_mode="dyme")
    expected = list(engine.translate(engine.new_stream(config), decoded))
    renderer = local_renderer(engine)
    gpu = renderer._crossing._gpu
    try:
        got, replaced = [], False
        for image in renderer.translate(str(source), config, max_frames=100):
            got.append(image)
            if gpu.calls == lost_at and not replaced:  # chunk `lost_at` will meet a new worker
                gpu.replace_worker()
                replaced = True
        assert replaced == (lost_at is not None)
        assert len(got) == len(expected) == 19
        for image, want in zip(got, expected):
            np.testing.assert_array_equal(image, want)
        assert gpu.calls == 3 + (lost_at is not None)  # a lost worker costs one more call
        assert all(0 < seconds <= 30 for seconds in gpu.durations)  # not the 60 s default
        chunk_bytes = 8 * decoded[0].nbytes
        if lost_at is None:
            assert max(gpu.sent) < chunk_bytes + 20_000, "a chunk carries its frames and settings, no state"
            assert gpu.received[1] > 3 * max(gpu.received[0], gpu.received[2]), "the checkpoint is chunk 1's"
    finally:
        renderer.shutdown()
        gpu.replace_worker()


def test_changes_the_worker_makes_to_its_arguments_never_come_back(on_zero_gpu):
    import spaces

    def grow(items):
        items.append("worker")
        return len(items)

    gpu = spaces.GPU(grow, duration=lambda items: 1 + len(items))
    items = ["main"]
    try:
        assert gpu(items) == 2 and gpu(items) == 2
        assert items == ["main"] and gpu.durations == [2, 2] and gpu.workers_started == 1
    finally:
        gpu.replace_worker()


@pytest.mark.parametrize("value, expected", [
    (None, False), ("", False), ("0", False), ("false", False), ("no", False),
    ("1", True), ("true", True), ("True", True), ("T", True), ("t", True),
])
def test_zero_gpu_follows_spaces_zero_gpu_as_spaces_reads_it(monkeypatch, value, expected):
    from ui.gpu import model_device, on_gpu, zero_gpu

    monkeypatch.syspath_prepend(str(FAKE_SPACES))  # the package is installed in every case
    environ = {} if value is None else {"SPACES_ZERO_GPU": value}
    assert zero_gpu(environ) is expected
    if value is None:
        monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    else:
        monkeypatch.setenv("SPACES_ZERO_GPU", value)  # read when asked, not frozen at import
    assert zero_gpu() is expected
    plain = lambda: 1  # noqa: E731
    assert (on_gpu(plain) is plain) is not expected
    assert model_device() == ("cuda" if torch.cuda.is_available() else "cpu")  # this torch has no CUDA build


def test_without_the_spaces_package_the_variable_alone_is_not_zero_gpu(monkeypatch):
    from ui.gpu import zero_gpu

    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if "fake_spaces" not in entry])
    sys.modules.pop("spaces", None)
    assert zero_gpu({"SPACES_ZERO_GPU": "true"}) is False


def test_with_spaces_installed_but_unset_the_renderer_keeps_its_states_on_the_device(engine, monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_SPACES))
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    renderer = local_renderer(engine)
    try:
        renderer.step("artist", StepRequest(renderer_tests.frames(1, 1)[0], LATENCY)).result(60)
        state = renderer.stream_state("artist")
        assert not hasattr(renderer, "_crossing") and type(state).__name__ == "StreamState"
        assert state.noise.device == engine.device
    finally:
        renderer.shutdown()


def test_the_crossing_benchmark_shows_a_call_carries_far_less_than_the_state(capsys):
    from bench.crossing import main

    main(["--model", "tiny", "--size", "64", "--frames", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert {"before: state in and out (every call)", "after: a call"} <= set(rows)

    def megabytes(row: str, column: int) -> float:
        cell = row.strip("| ").split(" | ")[column]
        number, unit = cell.split(" + ")[-1].split() if "+" in cell else cell.split()
        return float(number) * (1 if unit == "MB" else 1e-3)

    state_in, call_in = megabytes(rows["before: state in and out (every call)"], 1), megabytes(rows["after: a call"], 1)
    assert state_in > 0 and call_in == 0, "the state goes to shared memory before, nothing after"
    chunk_before = megabytes(rows["video chunk before: state in and out (every chunk)"], 1)
    assert chunk_before == state_in and megabytes(rows["video chunk after"], 1) == 0
