"""The streaming engine on the built-in model: bank semantics, determinism,
stream isolation, bounded memory, lag handling and settings changes."""

import numpy as np
import pytest
import torch

from sv2v_core import BankConfig, ImageError, StreamConfig, StreamV2V
from sv2v_core.models import load_components

SIZE = 64


def sketch(step: int, size: int = SIZE) -> np.ndarray:
    """A white canvas with a dark stroke that grows with `step` and a blue disc."""
    image = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size // 2) ** 2 + (xx - size // 3) ** 2 < (size // 5) ** 2] = (40, 80, 200)
    image[size // 4: size // 4 + 3, 4: 8 + 3 * step] = (20, 20, 20)
    return image


def config(**changes) -> StreamConfig:
    return StreamConfig(**{"prompt": "a watercolor painting", "width": SIZE, "height": SIZE, **changes})


def render_all(engine, state, frames):
    return [engine(state, frame).image for frame in frames]


def test_latency_mode_static_input_matches_no_bank_until_first_merge(engine):
    frames = [sketch(3)] * 8
    settings = dict(mode="latency", similarity_skip=None)
    plain = render_all(engine, engine.new_stream(config(bank=BankConfig(mode="none"), **settings)), frames)
    banked_state = engine.new_stream(config(bank=BankConfig(mode="dyme", merge_every=4), **settings))
    merges = []
    banked = []
    for frame in frames:
        banked.append(engine(banked_state, frame).image)
        merges.append(banked_state.bank.merges)
    first_merge = merges.index(1)  # the frame whose commit merged; later frames read a merged bank
    assert first_merge == 4
    for index in range(first_merge + 1):
        assert np.abs(plain[index].astype(int) - banked[index].astype(int)).max() <= 1, index


def test_bank_changes_the_render_of_a_moving_input(engine):
    frames = [sketch(step) for step in range(6)]
    settings = dict(mode="latency", similarity_skip=None)
    plain = render_all(engine, engine.new_stream(config(bank=BankConfig(mode="none"), **settings)), frames)
    for bank in (BankConfig(mode="dyme", merge_every=1), BankConfig(mode="queue", size=2, merge_every=1),
                 BankConfig(feature_fusion=False, merge_every=1), BankConfig(extended_attention=False, merge_every=1)):
        banked = render_all(engine, engine.new_stream(config(bank=bank, **settings)), frames)
        assert np.array_equal(plain[0], banked[0])  # empty bank on the first frame
        assert any(not np.array_equal(p, b) for p, b in zip(plain[1:], banked[1:])), bank


def test_outputs_are_deterministic_for_a_seed(engine):
    frames = [sketch(step) for step in range(6)]
    first = render_all(engine, engine.new_stream(config(seed=7)), frames)
    again = render_all(engine, engine.new_stream(config(seed=7)), frames)
    other = render_all(engine, engine.new_stream(config(seed=8)), frames)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_two_streams_on_one_model_do_not_affect_each_other(engine):
    frames_a = [sketch(step) for step in range(8)]
    rng = np.random.default_rng(0)
    frames_b = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(8)]
    alone = render_all(engine, engine.new_stream(config()), frames_a)
    state_a = engine.new_stream(config())
    state_b = engine.new_stream(config(prompt="an oil painting", seed=3, bank=BankConfig(mode="queue", size=2)))
    together = []
    for frame_a, frame_b in zip(frames_a, frames_b):
        together.append(engine(state_a, frame_a).image)
        engine(state_b, frame_b)
        state_b.reset_bank()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_memory_is_bounded_over_a_long_stream(engine):
    rng = np.random.default_rng(1)
    for bank in (BankConfig(mode="dyme"), BankConfig(mode="queue", size=2, merge_every=1)):
        state = engine.new_stream(config(bank=bank, similarity_skip=None, scene_cut=None))
        sizes = []
        for step in range(60):
            engine(state, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            sizes.append((state.bank.nbytes(), tuple(state.in_flight.shape)))
        assert len(set(sizes[10:])) == 1, bank
        assert state.bank.nbytes() > 0


def test_stream_mode_lags_and_flush_catches_up(engine):
    state = engine.new_stream(config(similarity_skip=None))
    sources = [engine(state, sketch(step)).source_index for step in range(6)]
    assert sources == [-1, -1, -1, 0, 1, 2]  # warm-start renders of frame 0, then a lag of steps − 1
    flushed = engine.flush(state)
    assert [out.source_index for out in flushed] == [3, 4, 5]
    assert engine.flush(state) == []
    latency = engine.new_stream(config(mode="latency"))
    assert [engine(latency, sketch(step)).source_index for step in range(3)] == [0, 1, 2]
    assert engine.flush(latency) == []


def test_first_frames_are_not_blank(engine):
    state = engine.new_stream(config())
    first = engine(state, sketch(0)).image
    assert first.std() > 10  # the warm start renders the sketch, not a flat brown frame


def test_translate_gives_one_output_per_input_in_order(engine):
    frames = [sketch(step) for step in range(7)] + [sketch(6)] * 5
    for mode in ("stream", "latency"):
        for steps in (1, 2, 4):
            outputs = list(engine.translate(engine.new_stream(config(mode=mode, steps=steps)), frames))
            assert len(outputs) == len(frames)
            assert all(out.shape == (SIZE, SIZE, 3) for out in outputs)


def test_similarity_filter_skips_once_caught_up(engine):
    state = engine.new_stream(config(mode="stream"))
    outputs = [engine(state, sketch(2)) for _ in range(6)]
    assert [out.skipped for out in outputs] == [False] * 4 + [True] * 2
    assert outputs[-1].source_index == 5 and np.array_equal(outputs[-1].image, outputs[3].image)
    assert not engine(state, sketch(5)).skipped


def test_scene_cut_and_prompt_change_reset_the_bank(engine):
    state = engine.new_stream(config(mode="latency"))
    engine(state, sketch(1))
    assert state.bank.nbytes() > 0
    engine(state, np.zeros((SIZE, SIZE, 3), np.uint8))  # a cut from a white canvas to black
    assert state.bank.frames == 1  # emptied, then this frame stored afresh
    engine.configure(state, state.config.replace(prompt="a pencil drawing"))
    assert state.bank.nbytes() == 0


def test_prompt_change_keeps_frames_in_flight_and_renders_no_blank_frame(engine):
    state = engine.new_stream(config(similarity_skip=None))
    for step in range(4):
        engine(state, sketch(step))
    in_flight = state.in_flight.clone()
    engine.configure(state, state.config.replace(prompt="a neon sign at night"))
    assert torch.equal(state.in_flight, in_flight)
    for step in range(4, 8):
        assert engine(state, sketch(step)).image.std() > 10


def test_size_change_restarts_the_stream(engine):
    state = engine.new_stream(config())
    engine(state, sketch(0))
    engine.configure(state, state.config.replace(width=96, height=64))
    assert state.in_flight is None and state.bank.nbytes() == 0
    assert engine(state, sketch(1)).image.shape == (64, 96, 3)


def test_classifier_free_guidance_option(engine):
    frames = [sketch(step) for step in range(3)]
    plain = render_all(engine, engine.new_stream(config(mode="latency")), frames)
    guided = render_all(engine, engine.new_stream(config(mode="latency", guidance_scale=3.0,
                                                         negative_prompt="blurry")), frames)
    assert any(not np.array_equal(a, b) for a, b in zip(plain, guided))


def test_bad_frames_and_settings_are_refused(engine):
    state = engine.new_stream(config())
    with pytest.raises(ImageError):
        engine(state, np.zeros((SIZE, SIZE, 5), np.uint8))
    with pytest.raises(ImageError):
        engine(state, "not-an-image.png")
    with pytest.raises(ValueError, match="multiple of"):
        engine.new_stream(config().replace(width=70))
    # odd inputs are converted, not refused
    for frame in (np.zeros((33, 47), np.uint8), np.zeros((40, 40, 4), np.uint8), np.ones((40, 30, 3), np.float32)):
        assert engine(state, frame).image.shape == (SIZE, SIZE, 3)


def test_state_moves_to_cpu_and_back(engine):
    state = engine.new_stream(config())
    engine(state, sketch(0))
    state.to("cpu")
    assert engine(state, sketch(1)).image.shape == (SIZE, SIZE, 3)


def test_close_restores_the_original_processors():
    components = load_components("tiny")
    before = {name: type(p) for name, p in components.unet.attn_processors.items()}
    engine = StreamV2V(components)
    assert {type(p).__name__ for p in components.unet.attn_processors.values()} == {"BankAttnProcessor"}
    engine.close()
    assert {name: type(p) for name, p in components.unet.attn_processors.items()} == before
    assert not any(m._forward_hooks for m in components.unet.modules())
