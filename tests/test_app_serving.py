"""The app serves through the serving backend (sv2v_core.serving): the loader's serving choice, the
warm-up of every bucket of the page's settings before the page is served, and, through the real app
(in process, the fast channel, the built-in model), a backend that refuses any shape it did not see
at warm-up while 1 to 8 artists join and leave: no call leaves the buckets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sv2v_core import StreamConfig, StreamV2V, load_components
from sv2v_core.loader import EngineOptions, choose_serving, load_engine
from sv2v_core.serving import ServingBackend, UnwarmedShape, eager_function
from bench.loadtest import Artist, stop_all
from tests.test_serving import RefusingMake
from ui.presets import load_presets
from ui.server import create_service, free_port, model_threads, serve
from ui.settings import PAGE_BANKS, PAGE_STEPS, Settings, served_variants

SIZE = 64
TIMEOUT = 60
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# -- the serving choice ---------------------------------------------------------------------------
def test_the_serving_choice_compiles_on_cuda_never_on_zero_gpu_and_on_a_cpu_only_when_asked():
    on_cuda = choose_serving("auto", CUDA)
    assert on_cuda.compiled and not on_cuda.background
    assert not choose_serving("auto", CPU).compiled and "CPU" in choose_serving("auto", CPU).why
    for device in (CPU, CUDA):
        for compile in ("auto", "on", "off"):
            zero = choose_serving(compile, device, zero_gpu=True)
            assert not zero.compiled and "ZeroGPU" in zero.why  # eager there, whatever was asked
        assert not choose_serving("off", device).compiled
    on_cpu = choose_serving("on", CPU)
    assert on_cpu.compiled and on_cpu.background  # compiled in the background while serving eagerly
    with pytest.raises(ValueError, match="compile must be one of"):
        EngineOptions(compile="sometimes")


def test_the_serving_engine_on_a_cpu_is_the_plain_engine_unless_compiling_is_asked_for():
    eager = load_engine(EngineOptions(model="tiny", device="cpu", serving=True))
    compiled = load_engine(EngineOptions(model="tiny", device="cpu", serving=True, compile="on"))
    zero = load_engine(EngineOptions(model="tiny", device="cpu", serving=True, compile="on", zero_gpu=True))
    try:
        assert eager.engine.backend is None and not eager.serving.compiled
        assert zero.engine.backend is None and "ZeroGPU" in zero.serving.why
        backend = compiled.engine.backend
        assert isinstance(backend, ServingBackend) and compiled.serving.compiled
        assert backend.background and backend.fallback is not None  # nothing compiles on the caller's time
        assert load_engine(EngineOptions(model="tiny", device="cpu")).serving is None  # not for serving
    finally:
        for loaded in (eager, compiled, zero):
            loaded.engine.close()


def test_the_app_leaves_a_core_to_a_browser_on_this_machine_when_it_renders_on_a_cpu(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    cores = torch.get_num_threads()
    assert model_threads(None, "cpu") == max(1, min(cores, (__import__("os").cpu_count() or 1) - 1))
    assert model_threads("127.0.0.1", "cpu", 3) == 3 and model_threads(None, "cpu", 0) is None  # as asked
    assert model_threads("0.0.0.0", "cpu") is None  # the browsers are elsewhere: torch's own
    assert model_threads(None, "cuda") is None
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # a Space
    assert model_threads(None, "cpu") is None


def test_the_page_settings_that_change_call_shapes_are_all_warmed(engine):
    base = StreamConfig(width=SIZE, height=SIZE, mode="stream", similarity_skip=None)
    variants = served_variants(base, controlled=False)
    assert {config.steps for config in variants} == set(PAGE_STEPS)
    assert {config.bank.mode for config in variants} == set(PAGE_BANKS)
    make = RefusingMake(engine)
    engine.backend = ServingBackend(engine, make)
    try:
        engine.warm_up(variants, freeze=True)
        # stream mode: rows per stream = steps, so buckets 1, 2, 4, 8 × steps 1-4, equal products shared
        assert sorted({shapes[0][0][0] for shapes in make.made}) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    finally:
        engine.backend = None


# -- warm-up and unwarmed shapes -------------------------------------------------------------------
def test_a_frozen_backend_with_a_fallback_serves_a_shape_nobody_warmed_eagerly_and_compiles_nothing(engine):
    """The Video tab's stream at a video's own aspect was never warmed up: it renders, eagerly, and no
    function is made for it (nothing compiles mid-request)."""
    make = RefusingMake(engine)
    engine.backend = ServingBackend(engine, make, fallback=eager_function(engine))
    try:
        engine.warm_up([StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None)], freeze=True)
        warmed = len(make.made)
        video = engine.new_stream(StreamConfig(width=96, height=SIZE, mode="stream", similarity_skip=None))
        image = engine(video, np.full((SIZE, 96, 3), 200, np.uint8)).image
        assert image.shape == (SIZE, 96, 3)
        assert len(make.made) == warmed and len(engine.backend._fallbacks) == 1
    finally:
        engine.backend = None


def test_a_warm_up_that_fails_leaves_its_shapes_to_the_eager_fallback(engine):
    """A compile that fails (here: bucket 2's) does not stop the app: that shape is served eagerly."""
    eager = eager_function(engine)

    def failing(spec, args):
        if spec.rows == 2:
            raise RuntimeError("the compiler broke on bucket 2")
        return eager(spec, args)

    config = StreamConfig(width=SIZE, height=SIZE, mode="latency", similarity_skip=None)
    engine.backend = ServingBackend(engine, failing, fallback=eager)
    try:
        engine.warm_up([config], buckets=(1, 2), freeze=True)  # does not raise: there is a fallback
        assert engine.backend.warm_error is not None and len(engine.backend.functions) == 1
        states = [engine.new_stream(config.replace(seed=seed)) for seed in range(2)]
        outputs = engine.render([(state, np.full((SIZE, SIZE, 3), 200, np.uint8)) for state in states])
        assert len(outputs) == 2 and len(engine.backend._fallbacks) == 1
        engine.backend = ServingBackend(engine, failing)  # without a fallback the failure is raised
        with pytest.raises(RuntimeError, match="warm-up failed"):
            engine.warm_up([config], buckets=(1, 2), freeze=True)
    finally:
        engine.backend = None


# -- through the real app --------------------------------------------------------------------------
class Watched(ServingBackend):
    """A serving backend that notes every call it refused (the renderer retries a batch that failed
    frame by frame, where bucket 1 would serve them: the refusal itself must count)."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.refused: list[UnwarmedShape] = []

    def _run(self, spec, args):
        try:
            return super()._run(spec, args)
        except UnwarmedShape as error:
            self.refused.append(error)
            raise


def artist(url: str, number: int, presets: list[str]):
    """A simulated artist (bench.loadtest) with page settings of its own, drawing until told to stop."""

    settings = Settings(f"artist {number}", presets[number % len(presets)], 0.4 + 0.05 * (number % 3),
                        PAGE_STEPS[number % len(PAGE_STEPS)], number, PAGE_BANKS[number % len(PAGE_BANKS)],
                        number % 2 == 0, number % 3 != 0)
    drawing = Artist(url, number, 8, SIZE, check_colour=False, session=f"artist-{number}", settings=settings)
    drawing.thread.start()
    return drawing


def test_no_call_of_the_app_leaves_the_warmed_buckets_as_1_to_8_artists_join_and_leave():
    engine = StreamV2V(load_components("tiny"))
    make = RefusingMake(engine)
    engine.backend = Watched(engine, make)  # no fallback: a shape not warmed up is refused
    service = create_service(engine, size=SIZE)
    presets = load_presets()
    try:
        service.warm_up()  # as app.py, before the page is served: every bucket of the page's settings
        warmed = len(make.made)
        assert warmed == 4  # latency mode: buckets 1, 2, 4, 8 of one row each, for every page setting
        app = serve(service, presets, port=free_port(), block=False)
        artists = []
        joined, left, most = 0, [], 0
        try:
            for count in (1, 3, 8, 5, 2, 8, 4, 1):
                while len(artists) > count:  # someone in the middle leaves
                    leaving = artists.pop(len(artists) // 2)
                    stop_all([leaving], TIMEOUT)
                    left.append(leaving)
                while len(artists) < count:
                    artists.append(artist(app.url, joined, list(presets)))
                    joined += 1
                most = max(most, len(artists))
                time.sleep(1.5)
        finally:
            stop_all(artists, TIMEOUT)
            app.close()
        assert most == 8 and joined >= 8
        for drawing in artists + left:
            assert drawing.failure is None, drawing.failure
            assert not drawing.client.log.errors, drawing.client.log.errors
            assert drawing.client.log.renders, f"{drawing.session} got no render"
        assert len(make.made) == warmed and not engine.backend.refused  # no call left the warmed buckets
        rows = {spec.rows for spec, *_ in engine.backend.calls}
        assert len(rows) > 1 and max(service.stats().batches) > 1  # several buckets, shared ticks
    finally:
        service.close()
        engine.close()
