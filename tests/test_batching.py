"""Several streams in one UNet call (`StreamV2V.render`): each batch row
reads and writes only its own stream's bank, prompt, noise and timestep.

On the CPU a stream rendered in a batch is not always bit-identical to the
same stream rendered alone: oneDNN picks other convolution and matrix
kernels for a batch of 1 than for a larger one, and they round differently
(measured: up to 1e-6 per operation, at most 1/255 on a pixel over 40
frames with a DyMe merge every frame).  So the tests check two things:
isolation exactly (a stream's render does not change when the other
streams in its batch change, shapes kept), and equality with rendering
alone to within that rounding."""

import numpy as np
import pytest

from sv2v_core import BankConfig, ImageError, StreamConfig
from tests.test_method import sketch

SIZE = 64
BACKGROUNDS = [(255, 255, 255), (240, 220, 180), (200, 230, 255)]


def configs(mode: str, bank: BankConfig) -> list[StreamConfig]:
    base = dict(width=SIZE, height=SIZE, mode=mode, bank=bank, similarity_skip=None, scene_cut=None)
    return [StreamConfig(prompt="a watercolor painting", seed=0, strength=0.4, **base),
            StreamConfig(prompt="an oil painting", seed=1, strength=0.5, **base),
            StreamConfig(prompt="", seed=2, strength=0.4, **base)]


def assert_rounding_close(a: np.ndarray, b: np.ndarray, where) -> None:
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.002, where


def assert_batched_equal_alone(engine, settings: list[StreamConfig], backgrounds: list, steps: int) -> list:
    """Each stream rendered alone, then all of them in one `render` per frame
    (stream i draws `sketch(step, backgrounds[i])`): the same images to
    within rounding.  Returns the batched streams' states."""
    alone = []
    for config, background in zip(settings, backgrounds):
        state = engine.new_stream(config)
        alone.append([engine(state, sketch(step, background)).image for step in range(steps)])
    states = [engine.new_stream(config) for config in settings]
    for step in range(steps):
        outputs = engine.render([(state, sketch(step, bg)) for state, bg in zip(states, backgrounds)])
        for index, output in enumerate(outputs):
            assert_rounding_close(output.image, alone[index][step], (index, step))
    return states


BANKS = [BankConfig(merge_every=1), BankConfig(mode="queue", size=2, merge_every=1), BankConfig(mode="none")]


@pytest.mark.parametrize("mode", ["stream", "latency"])
@pytest.mark.parametrize("bank", BANKS, ids=["dyme", "queue2", "none"])
def test_streams_rendered_together_equal_each_alone(engine, mode, bank):
    states = assert_batched_equal_alone(engine, configs(mode, bank), BACKGROUNDS, 8)
    if bank.mode != "none":
        assert all(state.bank.nbytes() > 0 for state in states)


def test_guided_streams_batched_keep_their_own_scale_and_negative_prompt(engine):
    settings = [config.replace(guidance_scale=scale, negative_prompt=negative)
                for config, scale, negative in zip(configs("stream", BankConfig(merge_every=1)), (2.0, 4.0, 1.5),
                                                   ("blurry", "dark, muddy", ""))]
    assert_batched_equal_alone(engine, settings, BACKGROUNDS, 6)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_a_stream_does_not_see_the_others_in_its_batch(engine, mode):
    """The same stream batched with two different neighbours (same shapes):
    bit-identical renders and bank, since no batch row reads another's."""
    runs = []
    for neighbour in ((10, 200, 30), (250, 40, 250)):
        first, other = (engine.new_stream(config) for config in configs(mode, BankConfig(merge_every=1))[:2])
        images = []
        for step in range(8):
            outputs = engine.render([(first, sketch(step)), (other, sketch(7 - step, neighbour))])
            images.append(outputs[0].image)
        runs.append((images, first))
    (a, state_a), (b, state_b) = runs
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for layer, stored in state_a.bank.layers.items():
        for name, tensor in stored.items():
            assert (tensor == state_b.bank.layers[layer][name]).all(), (layer, name)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_streams_join_leave_change_prompt_and_reset_while_batched(engine, mode):
    settings = configs(mode, BankConfig(merge_every=2))
    new_prompt = "a pencil drawing"
    # frame ranges each stream is given: 0 joins at 0, 1 leaves after 5, 2 joins at 3
    spans = [range(0, 10), range(0, 6), range(3, 10)]

    def events(index: int, step: int, engine, state) -> None:
        if index == 1 and step == 2:
            engine.configure(state, state.config.replace(prompt=new_prompt))
        if index == 0 and step == 4:
            state.reset_bank()

    alone = {}
    for index, (config, span) in enumerate(zip(settings, spans)):
        state = engine.new_stream(config)
        for step in span:
            events(index, step, engine, state)
            alone[index, step] = engine(state, sketch(step, BACKGROUNDS[index])).image
    states = {}
    for step in range(10):
        jobs, owners = [], []
        for index, (config, span) in enumerate(zip(settings, spans)):
            if step not in span:
                states.pop(index, None)
                continue
            state = states.setdefault(index, engine.new_stream(config))
            events(index, step, engine, state)
            jobs.append((state, sketch(step, BACKGROUNDS[index])))
            owners.append(index)
        for index, output in zip(owners, engine.render(jobs)):
            assert_rounding_close(output.image, alone[index, step], (index, step))


def test_streams_of_different_sizes_and_modes_share_one_call_safely(engine):
    settings = [StreamConfig(prompt="a watercolor", width=64, height=64, mode="stream"),
                StreamConfig(prompt="a watercolor", width=96, height=64, mode="stream"),
                StreamConfig(prompt="a watercolor", width=64, height=64, mode="latency", steps=2)]
    frames = [lambda step, c=config: sketch(step, size=64)[:, :1].repeat(c.width, axis=1) for config in settings]
    alone = []
    for config, frame in zip(settings, frames):
        state = engine.new_stream(config)
        alone.append([engine(state, frame(step)).image for step in range(5)])
    states = [engine.new_stream(config) for config in settings]
    for step in range(5):
        outputs = engine.render([(state, frame(step)) for state, frame in zip(states, frames)])
        for index, output in enumerate(outputs):  # each is alone in its group: the very same computation
            assert np.array_equal(output.image, alone[index][step])


def test_a_bad_frame_fails_the_call_before_any_stream_changes(engine):
    states = [engine.new_stream(config) for config in configs("stream", BankConfig())[:2]]
    engine.render([(state, sketch(0)) for state in states])
    before = [(state.frames_in, state.in_flight.clone()) for state in states]
    with pytest.raises(ImageError):
        engine.render([(states[0], sketch(1)), (states[1], np.zeros((SIZE, SIZE, 5), np.uint8))])
    for state, (frames_in, in_flight) in zip(states, before):
        assert state.frames_in == frames_in and (state.in_flight == in_flight).all()
    with pytest.raises(ValueError, match="once"):
        engine.render([(states[0], sketch(1)), (states[0], sketch(2))])
