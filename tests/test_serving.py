"""Serving graphs at static shapes (`sv2v_core.serving`): renders through the
bucketed, padded, masked serving functions equal the eager engine's, padding
rows never touch a bank, no call leaves the warmed-up buckets, the batched
DyMe update equals the per-stream per-layer one, and a stream's state stays
picklable.

The eager engine (backend None) reads exactly the tokens each bank holds,
with streams grouped by bank shape; the serving backend reads whole
fixed-size buffers through masks, with streams of any bank fill, EA, FF, α
and threshold in one padded call.  On the CPU they differ by float rounding
(oneDNN picks other kernels for other batch sizes, SDPA with a mask sums in
another order), which DyMe's argmax can turn into a different token choice
now and then: the tolerances below allow that and no more; switching the
bank off would exceed them (each test checks that it would)."""

import copy
import pickle

import numpy as np
import pytest
import torch

from sv2v_core import BankConfig, StreamConfig, StreamV2V, load_components
from sv2v_core import bank as bank_module
from sv2v_core.bank import FeatureBank, commit_banks, layer_order
from sv2v_core.merging import bipartite_match, random_order
from sv2v_core.serving import (
    ServingBackend, ServingUNet, UnwarmedShape, bucket_for, compiled_function, eager_function, serving_backend,
)
from tests.test_method import sketch

SIZE = 64
WHITE, SAND, SKY, NIGHT = (255, 255, 255), (240, 220, 180), (200, 230, 255), (30, 25, 60)


def base(mode: str, **changes) -> StreamConfig:
    settings = dict(prompt="a watercolor painting", width=SIZE, height=SIZE, mode=mode, similarity_skip=None,
                    scene_cut=None)
    return StreamConfig(**{**settings, **changes})


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


class Stream:
    """One stream of a scenario: its settings, the frames it is given, and events."""

    def __init__(self, config, span, background=WHITE, cut_at=None, reset_at=None):
        self.config, self.span, self.background = config, span, background
        self.cut_at, self.reset_at = cut_at, reset_at

    def frame(self, step: int) -> np.ndarray:
        background = NIGHT if self.cut_at is not None and step >= self.cut_at else self.background
        return sketch(step, background)

    def event(self, step: int, state) -> None:
        if step == self.reset_at:
            state.reset_bank()


def scenario(mode: str) -> list[Stream]:
    """Five streams whose ticks hold 3, 4 and 5 of them (buckets 4 and 8, padded), with empty,
    filling and full banks side by side, due frames next to frames not due, a reset and a scene
    cut mid-batch, and bank settings that differ in EA, FF, α, threshold, merge interval and mode."""
    return [
        Stream(base(mode, bank=BankConfig(merge_every=1, fusion_threshold=0.9)), range(0, 10)),
        Stream(base(mode, seed=1, prompt="an oil painting", bank=BankConfig(merge_every=2, extended_attention=False,
                                                                           fusion_threshold=0.9)),
               range(2, 10), SAND),
        Stream(base(mode, seed=2, strength=0.5, bank=BankConfig(mode="none")), range(1, 10), SKY),
        Stream(base(mode, seed=3, scene_cut=0.8, bank=BankConfig(merge_every=3, feature_fusion=False)),
               range(0, 10), cut_at=5),
        Stream(base(mode, seed=4, bank=BankConfig(merge_every=1, fusion_alpha=0.9, fusion_threshold=0.8)),
               range(0, 7), SAND, reset_at=4),
    ]


def render_alone(engine, streams: list[Stream]) -> dict[tuple[int, int], np.ndarray]:
    """Each stream on its own through the engine as it is (eager)."""
    renders = {}
    for index, stream in enumerate(streams):
        state = engine.new_stream(stream.config)
        for step in stream.span:
            stream.event(step, state)
            renders[index, step] = engine(state, stream.frame(step)).image
    return renders


def render_together(engine, streams: list[Stream], steps: int = 10, check=None):
    """All the streams, each tick's present ones in one `render` call."""
    renders, states = {}, {}
    for step in range(steps):
        jobs, owners = [], []
        for index, stream in enumerate(streams):
            if step not in stream.span:
                states.pop(index, None)
                continue
            state = states.setdefault(index, engine.new_stream(stream.config))
            stream.event(step, state)
            jobs.append((state, stream.frame(step)))
            owners.append(index)
        for index, output in zip(owners, engine.render(jobs)):
            renders[index, step] = output.image
        if check is not None:
            check(states)
    return renders, states


def assert_close_renders(served: dict, eager: dict, limit: float) -> float:
    worst = 0.0
    for key, image in eager.items():
        difference = mean_difference(served[key], image)
        assert np.abs(served[key].astype(int) - image.astype(int)).max() <= 2, key
        worst = max(worst, difference)
    assert worst <= limit, worst
    return worst


def bank_effect(engine, stream: Stream) -> float:
    """How far the stream's eager renders move when its bank is switched off (the most, over its frames)."""
    banked = render_alone(engine, [stream])
    off = render_alone(engine, [Stream(stream.config.replace(bank_mode="none"), stream.span, stream.background)])
    return max(mean_difference(banked[key], off[key]) for key in banked)


# Mean |difference| per pixel, in 1/255, allowed on any frame of any stream (measured: at most 0.0002,
# one pixel off by one; the bank's own effect on these streams is 0.1 to 1.6 on the frames it reaches).
TOLERANCE = 0.01


@pytest.fixture()
def served(engine):
    """The engine with an eager serving backend, restored afterwards."""
    engine.backend = ServingBackend(engine)
    yield engine
    engine.backend = None


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_served_streams_equal_each_rendered_alone_eagerly(engine, mode):
    streams = scenario(mode)
    eager = render_alone(engine, streams)
    engine.backend = ServingBackend(engine)
    try:
        together, states = render_together(engine, streams)
        buckets = {spec.rows for spec, *_ in engine.backend.calls}
    finally:
        engine.backend = None
    rows = 4 if mode == "stream" else 1
    assert buckets == {4 * rows, 8 * rows}  # ticks of 3, 4 and 5 streams: buckets 4 and 8, padded
    assert_close_renders(together, eager, TOLERANCE)
    assert all(state.bank.stored for index, state in states.items() if index != 2)
    assert states[0].bank.merges > 0
    assert bank_effect(engine, streams[0]) > 10 * TOLERANCE  # the bank ignored would fail the check


def test_guided_streams_served_equal_eager(engine):
    streams = [Stream(base("stream", guidance_scale=scale, negative_prompt=negative, seed=seed,
                           bank=BankConfig(merge_every=every, fusion_threshold=0.9)), span, background)
               for scale, negative, seed, every, span, background in (
                   (2.0, "blurry", 0, 1, range(0, 6), WHITE), (4.0, "dark, muddy", 1, 2, range(1, 6), SAND),
                   (1.5, "", 2, 1, range(0, 6), SKY))]
    eager = render_alone(engine, streams)
    engine.backend = ServingBackend(engine)
    try:
        together, _ = render_together(engine, streams, steps=6)
        assert {spec.copies for spec, *_ in engine.backend.calls} == {2}
    finally:
        engine.backend = None
    assert_close_renders(together, eager, TOLERANCE)
    assert bank_effect(engine, streams[0]) > 10 * TOLERANCE


@pytest.fixture(scope="module")
def controlled():
    engine = StreamV2V(load_components("tiny", controlnet="tiny"))
    yield engine
    engine.close()


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_controlled_streams_served_equal_eager(controlled, mode):
    streams = [Stream(base(mode, control_scale=scale, control_image=kind, seed=seed,
                           bank=BankConfig(merge_every=1, fusion_threshold=0.9)), span, background)
               for scale, kind, seed, span, background in (
                   (0.5, "lines", 0, range(0, 6), WHITE), (1.5, "canny", 1, range(1, 6), SAND),
                   (None, "image", 2, range(0, 6), SKY))]
    eager = render_alone(controlled, streams)
    controlled.backend = ServingBackend(controlled)
    try:
        together, _ = render_together(controlled, streams, steps=6)
        assert {spec.control for spec, *_ in controlled.backend.calls} == {
            len(controlled.controlnet.controlnet_down_blocks)}
    finally:
        controlled.backend = None
    assert_close_renders(together, eager, TOLERANCE)
    assert bank_effect(controlled, streams[0]) > 10 * TOLERANCE


# ---------------------------------------------------------------- padding rows


def _padding_rows(args, spec) -> torch.Tensor:
    """Which rows of a serving call are padding: their fusion threshold is one no similarity exceeds."""
    row_data = args[4 if spec.conditioned else 3]
    return row_data[:, 4] > 1


def poisoning(engine):
    """Serving functions whose padding rows come out as NaN (eps and every
    recorded feature): if any of them reached a bank or a render, it would show."""
    make = eager_function(engine)

    def made(spec, args):
        function = make(spec, args)

        def run(*call_args):
            padding = _padding_rows(call_args, spec)
            eps, *recorded = function(*call_args)
            eps = eps.clone()
            eps.view(spec.copies, spec.rows, -1)[:, padding] = float("nan")
            recorded = [features.clone() for features in recorded]
            for features in recorded:
                features[padding] = float("nan")
            return (eps, *recorded)

        return run

    return made


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_padding_rows_never_touch_a_bank_or_a_render(engine, mode):
    streams = [scenario(mode)[index] for index in (0, 1, 3)]  # three banked streams: bucket 4, one padding

    def check(states):
        for state in states.values():
            for features in state.bank.buffers.values():
                for tensor in features.values():
                    assert torch.isfinite(tensor).all()

    engine.backend = ServingBackend(engine, poisoning(engine))
    try:
        together, states = render_together(engine, streams, steps=10, check=check)
        padded = [spec.rows for spec, *_ in engine.backend.calls]
    finally:
        engine.backend = None
    rows = 4 if mode == "stream" else 1
    assert 4 * rows in padded  # three streams in bucket 4: one padding stream
    assert all(state.bank.stored for state in states.values())
    assert all(np.isfinite(image).all() and image.std() > 5 for image in together.values())


def test_padding_rows_are_recognised_by_the_poisoning_helper(engine):
    """The helper above finds exactly the padding rows (else its test proves nothing)."""
    state = engine.new_stream(base("latency", steps=2))
    seen = []
    make = eager_function(engine)

    def spy(spec, args):
        function = make(spec, args)
        return lambda *call_args: (seen.append(_padding_rows(call_args, spec)), function(*call_args))[1]

    engine.backend = ServingBackend(engine, spy, buckets=(4,))
    try:
        engine(state, sketch(0))
    finally:
        engine.backend = None
    assert [mask.tolist() for mask in seen] == [[False, True, True, True]] * 2


# ---------------------------------------------------------------- only warmed-up shapes


class RefusingMake:
    """A test `make`: eager serving functions that note every shape they were
    made for and refuse to run any other (as a captured graph cannot)."""

    def __init__(self, engine):
        self.make = eager_function(engine)
        self.made = []

    def __call__(self, spec, args):
        shapes = [(tuple(a.shape), a.dtype) for a in args]
        self.made.append(shapes)
        function = self.make(spec, args)

        def run(*call_args):
            assert [(tuple(a.shape), a.dtype) for a in call_args] == shapes
            return function(*call_args)

        return run


def test_no_call_leaves_the_warmed_up_buckets(engine):
    """Warm up every bucket of two settings, freeze; then 1 to 8 streams join
    and leave, reset and get cut, in both modes: no new function is made."""
    make = RefusingMake(engine)
    engine.backend = ServingBackend(engine, make)
    try:
        settings = [base("latency", bank=BankConfig(merge_every=2)), base("stream", bank=BankConfig(merge_every=2))]
        engine.warm_up(settings, freeze=True)
        # 4 buckets × 2 modes, but latency's buckets 4 and 8 (rows 4, 8) have the shapes of stream's 1 and 2
        warmed = len(make.made)
        assert warmed == 6 and len({repr(shapes) for shapes in make.made}) == 6
        for setting in settings:
            states, joined, sizes = [], 0, set()
            for step, count in enumerate([1, 2, 3, 5, 8, 7, 6, 4, 2, 3, 1, 8]):
                while len(states) > count:  # someone in the middle leaves
                    states.pop(len(states) // 2)
                while len(states) < count:
                    states.append(engine.new_stream(setting.replace(seed=joined, scene_cut=0.8)))
                    joined += 1
                if step % 3 == 2:
                    states[0].reset_bank()
                background = NIGHT if step % 4 == 3 else WHITE  # scene cuts now and then
                engine.render([(state, sketch(step + index, background)) for index, state in enumerate(states)])
                sizes.add(len(states))
            assert sizes == set(range(1, 9))
        assert len(make.made) == warmed
        assert {spec.rows for spec, *_ in engine.backend.calls} >= {1, 2, 4, 8}
        with pytest.raises(UnwarmedShape):  # a size that was not warmed up
            engine(engine.new_stream(base("latency").replace(width=96)), sketch(0, size=96))
    finally:
        engine.backend = None


def test_more_streams_than_the_largest_bucket_are_split(served):
    states = [served.new_stream(base("latency", seed=seed)) for seed in range(11)]
    outputs = served.render([(state, sketch(seed)) for seed, state in enumerate(states)])
    assert len(outputs) == 11
    # latency mode, 4 steps: 4 calls of 8 streams, then 4 of 3 streams padded to 4
    assert [spec.rows for spec, *_ in served.backend.calls][-8:] == [8] * 4 + [4] * 4


def test_buckets():
    assert [bucket_for(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9)


# ---------------------------------------------------------------- warm-up in the background


def test_background_warm_up_serves_eagerly_until_each_graph_is_ready(engine):
    import threading

    release = threading.Event()
    eager = eager_function(engine)
    made_slowly = []

    def slow(spec, args):  # a compile that waits for the test's signal
        release.wait(timeout=60)
        made_slowly.append(spec.rows)
        return eager(spec, args)

    backend = ServingBackend(engine, slow, fallback=eager)
    engine.backend = backend
    try:
        state = engine.new_stream(base("latency", steps=2))
        backend.warm_up([state.config], buckets=(1, 2), background=True, freeze=True)
        engine(state, sketch(0))  # served by the fallback while the "compile" waits
        assert not made_slowly and backend._fallbacks and not backend.functions
        release.set()
        assert backend.wait(timeout=60)
        assert made_slowly == [1, 2] and len(backend.functions) == 2
        engine(state, sketch(1))
        assert backend.calls[-1] in backend.functions
    finally:
        release.set()
        engine.backend = None


def test_no_compile_is_a_clean_option(engine):
    backend = serving_backend(engine, compile=False)
    assert backend.make.__qualname__ == eager_function(engine).__qualname__
    assert not backend.clone_outputs and backend.step_marker is None


@pytest.mark.slow
def test_compiled_serving_equals_eager(engine):
    """torch.compile (inductor; on CUDA this is where the graphs are captured)
    on the serving function: one bucket of two streams, latency mode, a
    stream joining later (padding first), with other bank settings."""
    torch._dynamo.reset()
    streams = [Stream(base("latency", steps=2, bank=BankConfig(merge_every=1, fusion_threshold=0.9)), range(0, 6)),
               Stream(base("latency", steps=2, seed=1, bank=BankConfig(merge_every=2, feature_fusion=False)),
                      range(2, 6), SAND)]
    eager = render_alone(engine, streams)
    engine.backend = ServingBackend(engine, compiled_function(engine), buckets=(2,))
    try:
        engine.warm_up([streams[0].config], freeze=True)
        with torch._dynamo.config.patch(error_on_recompile=True):  # real streams' inputs pass the warm-up's guards
            together, _ = render_together(engine, streams, steps=6)
        assert len(engine.backend.functions) == 1
    finally:
        engine.backend = None
        torch._dynamo.reset()
    assert_close_renders(together, eager, TOLERANCE)
    assert bank_effect(engine, streams[0]) > 10 * TOLERANCE


# ---------------------------------------------------------------- the bank read through masks


@torch.no_grad()
def test_an_empty_bank_read_through_masks_equals_no_bank(engine):
    """ServingUNet with all banked tokens masked (stored frames 0, or EA and FF
    off) equals the UNet with no bank, far closer than the bank's own effect."""
    backend = ServingBackend(engine, buckets=(2,))
    config = base("latency", bank=BankConfig(fusion_threshold=-1.0))
    shape = backend.call_shape(config)
    spec = backend.spec_for(shape, 2)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    timestep = torch.tensor([399, 199])
    embeds = engine._encode_text("a watercolor painting").expand(2, -1, -1)
    features = backend.feature_shapes(shape.height, shape.width)
    banked = [torch.randn(2, tokens, channels, generator=generator)
              for tokens, channels in (features[key] for key in spec.banked())]
    module = ServingUNet(engine.unet, spec)
    plain = engine.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def run(rows):
        return module(sample, timestep, embeds, torch.tensor(rows), *banked)[0]

    for rows in ([[0, 1, 1, 0.75, -1.0]] * 2, [[1, 0, 0, 0.75, -1.0]] * 2):  # nothing stored / EA and FF off
        torch.testing.assert_close(run(rows), plain, rtol=0, atol=2e-6)
    full = run([[1, 1, 1, 0.75, -1.0]] * 2)
    assert (full - plain).abs().max() > 1e-2
    mixed = run([[1, 1, 1, 0.75, -1.0], [0, 1, 1, 0.75, -1.0]])  # rows are independent
    torch.testing.assert_close(mixed[0], full[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=2e-6)


# ---------------------------------------------------------------- DyMe batched


LAYERS = {  # layer -> (tokens, channels, fuses): two pairs of equal shapes, as SD1.5's down and up blocks
    "down_blocks.0.attentions.0.transformer_blocks.0": (16, 8, False),
    "up_blocks.2.attentions.0.transformer_blocks.0": (16, 8, False),
    "down_blocks.1.attentions.0.transformer_blocks.0": (8, 12, False),
    "up_blocks.1.attentions.0.transformer_blocks.0": (8, 12, True),
    "mid_block.attentions.0.transformer_blocks.0": (4, 12, True),
}


def _record_random(bank: FeatureBank, generator, slots: int = 3) -> None:
    for layer, (tokens, channels, fuses) in LAYERS.items():
        for name in ("k", "v", "o") if fuses else ("k", "v"):
            bank.record(layer, name, torch.randn(slots, tokens, channels, generator=generator))


def reference_dyme(bank: FeatureBank) -> dict[str, dict[str, torch.Tensor]]:
    """The per-stream, per-layer DyMe update (paper §4.3), with the bank's own draws."""
    bank = copy.deepcopy(bank)
    new = {layer: {name: torch.cat(parts) for name, parts in bank._pending[layer].items()}
           for layer in layer_order(bank._pending)}
    layers = list(new)
    draws = bank.split_draws(torch.device("cpu"), 3, [2 * new[layer]["k"].shape[1] for layer in layers])
    result = {}
    for layer, uniform in zip(layers, draws):
        stored = bank.layers[layer]
        match = bipartite_match(torch.cat([stored["k"], new[layer]["k"]], dim=1), random_order(uniform))
        result[layer] = {name: match.merge(torch.cat([stored[name], new[layer][name]], dim=1)) for name in new[layer]}
    return result


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_batched_dyme_update_equals_the_per_stream_per_layer_update(monkeypatch, batched):
    monkeypatch.setitem(bank_module.BATCHED_MERGES, "cpu", batched)  # the CPU merges one by one by default
    generator = torch.Generator().manual_seed(0)
    banks = [FeatureBank(BankConfig(merge_every=every), seed=seed) for seed, every in ((0, 1), (1, 1), (2, 2), (3, 1))]
    queue = FeatureBank(BankConfig(mode="queue", size=2, merge_every=1), seed=9)
    everyone = banks + [queue]
    for _ in range(3):  # stored, then merged (bank 2 is not due on the second frame)
        for bank in everyone:
            _record_random(bank, generator)
        expected = [reference_dyme(bank) if bank.stored and bank.due() and bank.config.mode == "dyme" else None
                    for bank in everyone]
        commit_banks(everyone)
        for bank, reference in zip(everyone, expected):
            if reference is None:
                continue
            for layer, features in reference.items():
                for name, tensor in features.items():
                    assert torch.equal(bank.layers[layer][name], tensor), (layer, name)
    assert [bank.merges for bank in banks] == [2, 2, 1, 2]
    assert queue.stored == 2 and queue.merges == 0


# ---------------------------------------------------------------- state


def test_a_served_stream_state_pickles_and_renders_on(served):
    state = served.new_stream(base("latency", bank=BankConfig(merge_every=1)))
    for step in range(3):
        served(state, sketch(step))
    state.bank.record("mid_block.attentions.0.transformer_blocks.0", "k", torch.ones(1, 4, 48))  # pending too
    copied = pickle.loads(pickle.dumps(state))
    assert copied.bank.stored == state.bank.stored and copied.bank.merges == state.bank.merges
    for layer, features in state.bank.layers.items():
        for name, tensor in features.items():
            assert torch.equal(copied.bank.layers[layer][name], tensor)
    state.bank.discard_pending()
    copied.bank.discard_pending()
    assert np.array_equal(served(copied, sketch(3)).image, served(state, sketch(3)).image)


def test_stages_seam_sees_each_stage_of_a_frame(engine):
    import contextlib

    seen = []

    @contextlib.contextmanager
    def stage(name):
        seen.append(name)
        yield

    state = engine.new_stream(base("latency", steps=2, bank=BankConfig(merge_every=1)))
    engine.stages = stage
    try:
        engine(state, sketch(0))
    finally:
        engine.stages = None
    assert seen == ["encode", "unet", "unet", "bank update", "decode"]
