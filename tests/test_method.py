"""The streaming engine against the method computed by hand (paper §3–4):
the LCM schedule and step, the warm start, which bank rows each batch row
reads and writes, classifier-free guidance, the order of `translate`,
resets, concurrent streams, and half precision."""

import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

from sv2v_core import BankConfig, StreamConfig, StreamV2V
from sv2v_core.engine import lcm_timesteps
from sv2v_core.images import resize
from sv2v_core.models import load_components

SIZE = 64
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0"


def sketch(step: int, background=(255, 255, 255), size: int = SIZE) -> np.ndarray:
    """A canvas with a blue disc moving right and a dark stroke that grows with `step`."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size // 2) ** 2 + (xx - size // 3 - 2 * step) ** 2 < (size // 5) ** 2] = (40, 80, 200)
    image[size // 4: size // 4 + 3, 4: 8 + 3 * step] = (20, 20, 20)
    return image


def config(**changes) -> StreamConfig:
    defaults = dict(prompt="a watercolor painting", width=SIZE, height=SIZE, similarity_skip=None, scene_cut=None)
    return StreamConfig(**{**defaults, **changes})


def renders_by_source(engine, state, frames, first_source=0) -> dict[int, np.ndarray]:
    """Every converged render (flush included), keyed by input index − first_source."""
    outputs = [engine(state, frame) for frame in frames] + engine.flush(state)
    return {o.source_index - first_source: o.image for o in outputs if o.source_index >= first_source}


# ---------------------------------------------------------------- the LCM schedule and step


def test_timesteps_are_the_lcm_img2img_schedule_computed_exactly():
    for steps in (1, 2, 3, 4):
        for hundredths in range(2, 101):
            kept = int(Fraction(hundredths, 100) * 50)  # SDEdit keeps the first ⌊50·s⌋ of the 50 LCM timesteps
            strength = hundredths / 100
            if kept < steps:
                with pytest.raises(ValueError, match="too low"):
                    lcm_timesteps(strength, steps)
                continue
            schedule = [20 * (i + 1) - 1 for i in reversed(range(kept))]  # 999, 979, … from the top kept
            assert lcm_timesteps(strength, steps) == [schedule[kept * k // steps] for k in range(steps)], strength
    assert lcm_timesteps(0.8, 4) == [799, 599, 399, 199]
    assert lcm_timesteps(0.4, 4) == [399, 299, 199, 99]


@pytest.mark.parametrize("strength", [0.3, 0.4, 0.5, 0.8, 1.0])
def test_timesteps_match_the_diffusers_scheduler(strength):
    for steps in (1, 2, 4):
        scheduler = LCMScheduler()
        scheduler.set_timesteps(steps, strength=strength)
        assert lcm_timesteps(strength, steps) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_lcm_step_matches_the_scheduler(prediction):
    components = load_components("tiny")
    components.scheduler = LCMScheduler.from_config(components.scheduler.config, prediction_type=prediction)
    engine = StreamV2V(components)
    try:
        state = engine.new_stream(config(strength=0.6, steps=4, mode="latency", bank=BankConfig(mode="none")))
        timesteps = state.schedule["timesteps"].tolist()
        reference = LCMScheduler.from_config(components.scheduler.config)
        reference.set_timesteps(timesteps=timesteps)
        generator = torch.Generator().manual_seed(0)
        for slot, timestep in enumerate(timesteps):
            x = torch.randn(state.noise[:1].shape, generator=generator)
            model_output = torch.randn(x.shape, generator=generator)
            engine.backend = lambda *args: model_output  # the UNet's answer, fixed
            ours = engine._lcm_step([state], x, [slot], [False])
            expected = reference.step(model_output, timestep, x).denoised
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    finally:
        engine.close()


def test_unsupported_scheduler_settings_are_refused():
    components = load_components("tiny")
    components.scheduler = LCMScheduler.from_config(components.scheduler.config, thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        StreamV2V(components)
    components.scheduler = LCMScheduler.from_config(components.scheduler.config, thresholding=False)
    components.scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="flow"):
        StreamV2V(components)


def test_a_second_engine_on_a_patched_unet_is_refused(engine):
    with pytest.raises(ValueError, match="already carries"):
        StreamV2V(engine.components)


# ---------------------------------------------------------------- warm start


def _hand_step(engine, state, x):
    """One UNet call (empty bank) and the LCM step by hand, for all slots."""
    s = state.schedule
    eps = engine.unet(x, s["timesteps"], encoder_hidden_states=state.prompt_embeds.expand(len(x), -1, -1),
                      return_dict=False)[0]
    x0 = (x - s["sqrt_beta"] * eps) / s["sqrt_alpha"]
    return s["c_out"] * x0 + s["c_skip"] * x


@torch.inference_mode()
def test_warm_start_fills_every_slot_from_the_first_frame(engine):
    state = engine.new_stream(config(steps=3))
    first, second = sketch(2), sketch(3)
    outputs = [engine(state, first), engine(state, second)]
    s, noise = state.schedule, state.noise
    noised = lambda latent: s["sqrt_alpha"] * latent + s["sqrt_beta"] * noise  # noqa: E731
    latent_1, latent_2 = engine._encode(first[None]), engine._encode(second[None])
    denoised_1 = _hand_step(engine, state, noised(latent_1.expand(3, -1, -1, -1)))
    # slot k + 1 takes slot k's result, noised to its own level with its own fixed noise
    x_2 = torch.cat([noised(latent_2)[:1], s["sqrt_alpha"][1:] * denoised_1[:-1] + s["sqrt_beta"][1:] * noise[1:]])
    denoised_2 = _hand_step(engine, state, x_2)
    assert np.array_equal(outputs[0].image, engine._decode(denoised_1[-1:])[0])
    assert np.array_equal(outputs[1].image, engine._decode(denoised_2[-1:])[0])
    assert [o.source_index for o in outputs] == [-1, -1]  # provisional: frame 0 has not passed every step


# ---------------------------------------------------------------- bank rows per slot


def _spy(engine):
    """Capture, per UNet call, its timesteps, its BankView and the current keys of LAYER."""
    calls = []
    attn1 = engine.unet.get_submodule(LAYER).attn1

    def on_unet(module, args, kwargs):
        calls.append({"t": args[1].tolist(), "view": kwargs["cross_attention_kwargs"]["bank"]})

    def on_keys(module, args, output):
        calls[-1]["k"] = output.clone()

    return calls, [engine.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
                   attn1.to_k.register_forward_hook(on_keys)]


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_bank_row_k_belongs_to_the_step_at_timestep_k(engine, mode):
    state = engine.new_stream(config(mode=mode, bank=BankConfig(mode="queue", merge_every=1)))
    calls, handles = _spy(engine)
    try:
        for step in range(5):
            engine(state, sketch(step))
    finally:
        for handle in handles:
            handle.remove()
    timesteps = state.schedule["timesteps"].tolist()
    for call in calls:  # every batch row reads the bank slot of its own step
        assert [timesteps[slot] for view in call["view"].views for slot in view.slots] == call["t"]
    stored = state.bank.layers[LAYER]["k"]
    last = calls[-1:] if mode == "stream" else calls[-4:]  # the last frame's UNet calls
    written = torch.cat([call["k"] for call in last])
    slots = [slot for call in last for view in call["view"].views for slot in view.slots]
    assert slots == list(range(4))
    assert torch.equal(stored, written)  # row k was recorded by the batch row at timestep k


@pytest.mark.parametrize("mode, due_frames", [("latency", [0, 4, 8]), ("stream", [3, 7])])
def test_features_are_recorded_only_on_frames_that_update_the_bank(engine, mode, due_frames):
    state = engine.new_stream(config(mode=mode, bank=BankConfig(mode="dyme", merge_every=4)))
    recorded_on = []
    record = state.bank.record
    state.bank.record = lambda *args: (recorded_on.append(state.frames_in - 1), record(*args))  # count calls
    for step in range(10):
        engine(state, sketch(step))
    # in stream mode the first batch whose rows all hold real frames is frame 3's (0 runs its last step)
    assert sorted(set(recorded_on)) == due_frames
    assert state.bank.merges == len(due_frames) - 1


# ---------------------------------------------------------------- classifier-free guidance


@torch.inference_mode()
def test_guidance_combines_uncond_and_cond_and_records_only_cond(engine):
    queue = BankConfig(mode="queue", merge_every=1)
    guided = engine.new_stream(config(mode="latency", guidance_scale=3.0, negative_prompt="blurry, dark", bank=queue))
    cond_only = engine.new_stream(config(mode="latency", bank=queue))
    uncond_only = engine.new_stream(config(mode="latency", prompt="blurry, dark", bank=queue))
    x = torch.randn(guided.noise[:1].shape, generator=torch.Generator().manual_seed(0))
    outputs = []
    handle = engine.unet.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        result = engine._lcm_step([guided], x, [1], [True])
    finally:
        handle.remove()
    engine._lcm_step([cond_only], x, [1], [True])
    engine._lcm_step([uncond_only], x, [1], [True])
    uncond, cond = outputs[0].chunk(2)  # the batch is [unconditional; conditional]
    eps = uncond + 3.0 * (cond - uncond)
    s = guided.schedule
    x0 = (x - s["sqrt_beta"][1] * eps) / s["sqrt_alpha"][1]
    torch.testing.assert_close(result, s["c_out"][1] * x0 + s["c_skip"][1] * x)
    gaps = []
    for layer, recorded in guided.bank._pending.items():
        own = recorded["k"][0]
        assert own.shape[0] == 1  # one row per slot, not one per half
        torch.testing.assert_close(own, cond_only.bank._pending[layer]["k"][0], rtol=1e-4, atol=1e-5)
        gaps.append(float((own - uncond_only.bank._pending[layer]["k"][0]).abs().max()))
    assert max(gaps) > 1e-2  # the unconditional half would have been told apart


def test_guidance_embedding_of_a_distilled_unet_keeps_the_chosen_scale():
    components = load_components("tiny")
    components.unet = UNet2DConditionModel.from_config(components.unet.config, time_cond_proj_dim=16).eval()
    engine = StreamV2V(components)
    seen = []
    handle = engine.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep_cond"].clone()), with_kwargs=True)
    try:
        for scale, w in ((0.0, -1.0), (None, 7.5), (2.0, 1.0)):  # w = scale − 1; None: the LCM default 8.5
            state = engine.new_stream(config(mode="latency", steps=1, guidance_scale=scale))
            engine(state, sketch(0))
            expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), 16)
            torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-4)  # float32 angles up to 7500 rad
    finally:
        handle.remove()
        engine.close()


# ---------------------------------------------------------------- translate


def _distinct_frames(count: int) -> list[np.ndarray]:
    """Frames no one could mistake for each other: a coloured square walking over a coloured background."""
    frames = []
    for index in range(count):
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = ((60 * index) % 256, (255 - 40 * index) % 256, (90 + 70 * index) % 256)
        x = 6 * index % (SIZE - 20)
        image[10:30, x:x + 20] = ((200 + 50 * index) % 256, 30, (40 * index) % 256)
        frames.append(image)
    return frames


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_translate_output_i_renders_input_i(engine, mode):
    frames = _distinct_frames(7)
    without_bank = config(mode=mode, bank=BankConfig(mode="none"))
    outputs = list(engine.translate(engine.new_stream(without_bank), frames))
    alone = [next(iter(engine.translate(engine.new_stream(without_bank), [frame]))) for frame in frames]
    assert len(outputs) == len(frames)
    for index, (output, own) in enumerate(zip(outputs, alone)):  # without a bank frames don't interact
        assert np.array_equal(output, own), index
    banked = list(engine.translate(engine.new_stream(config(mode=mode)), frames))
    for index, output in enumerate(banked):  # with the bank, still nearest to its own input's render
        distances = [np.abs(output.astype(int) - other.astype(int)).mean() for other in alone]
        assert int(np.argmin(distances)) == index


# ---------------------------------------------------------------- resets


def _assert_same_bank(a, b):
    assert a.bank.layers.keys() == b.bank.layers.keys() and a.bank.merges == b.bank.merges
    for layer, stored in a.bank.layers.items():
        for name, tensor in stored.items():
            assert torch.equal(tensor, b.bank.layers[layer][name]), (layer, name)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_after_a_scene_cut_the_stream_equals_one_that_saw_only_the_new_scene(engine, mode):
    before = [sketch(step) for step in range(6)]
    after = [sketch(step, background=(30, 25, 60)) for step in range(9)]  # a night scene: similarity ≈ 0.2
    settings = config(mode=mode, scene_cut=0.8, bank=BankConfig(merge_every=2))
    cut = engine.new_stream(settings)
    renders = renders_by_source(engine, cut, before + after, first_source=len(before))
    fresh = engine.new_stream(settings)
    expected = renders_by_source(engine, fresh, after)
    assert sorted(renders) == sorted(expected) == list(range(len(after)))
    for index in expected:
        assert np.array_equal(renders[index], expected[index]), index
    assert fresh.bank.merges > 0
    _assert_same_bank(cut, fresh)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_after_a_prompt_change_the_bank_holds_only_the_new_prompt(engine, mode):
    frames = [sketch(step) for step in range(14)]
    settings = config(mode=mode, bank=BankConfig(merge_every=2))
    changed = engine.new_stream(settings)
    for frame in frames[:5]:
        engine(changed, frame)
    in_flight = None if changed.in_flight is None else changed.in_flight.clone()
    engine.configure(changed, settings.replace(prompt="an oil painting of a harbour"))
    if in_flight is not None:  # the frames in flight go on: no blank or restarted frames
        assert torch.equal(changed.in_flight, in_flight)
    renders = renders_by_source(engine, changed, frames[5:], first_source=5)
    fresh = engine.new_stream(settings.replace(prompt="an oil painting of a harbour"))
    expected = renders_by_source(engine, fresh, frames[5:])
    for index in expected:
        assert np.array_equal(renders[index], expected[index]), index
    _assert_same_bank(changed, fresh)


# ---------------------------------------------------------------- concurrency


def test_two_streams_in_two_threads_equal_each_alone(engine):
    jobs = {
        "a": (config(bank=BankConfig(merge_every=1)), [sketch(step) for step in range(8)]),
        "b": (config(prompt="an oil painting", seed=3, mode="latency", bank=BankConfig(mode="queue", size=2,
                                                                                         merge_every=1)),
              [sketch(8 - step, background=(240, 220, 180)) for step in range(8)]),
    }
    alone = {}
    for name, (settings, frames) in jobs.items():
        state = engine.new_stream(settings)
        alone[name] = [engine(state, frame).image for frame in frames]
        assert state.bank.merges > 0 or state.bank.frames > 1  # the bank was updated and read
    together, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def run(name):
        settings, frames = jobs[name]
        state = engine.new_stream(settings)
        barrier.wait()
        try:
            together[name] = [engine(state, frame).image for frame in frames]
        except Exception as error:  # noqa: BLE001 - reported to the main thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in jobs:
        assert all(np.array_equal(a, b) for a, b in zip(alone[name], together[name])), name


# ---------------------------------------------------------------- half precision


def _latents(dtype, bank: BankConfig) -> torch.Tensor:
    """The denoised latents of a moving sketch (what the decoder receives), in float32."""
    components = load_components("tiny")
    components.to("cpu", dtype)
    engine = StreamV2V(components)
    latents = []
    handle = components.vae.decoder.register_forward_pre_hook(lambda module, args: latents.append(args[0].float()))
    try:
        state = engine.new_stream(config(mode="latency", bank=bank))
        for step in range(8):
            engine(state, sketch(step))
    finally:
        handle.remove()
        engine.close()
    return torch.cat(latents)[4:]  # the frames after the bank has filled


def test_half_precision_engine_stays_close_to_float32():
    reference = _latents(torch.float32, BankConfig())
    error = lambda other: float((other - reference).norm() / reference.norm())  # noqa: E731
    without_bank = error(_latents(torch.float32, BankConfig(mode="none")))
    for dtype, tolerance in ((torch.bfloat16, 0.012), (torch.float16, 0.003)):
        latents = _latents(dtype, BankConfig())
        assert torch.isfinite(latents).all()
        assert error(latents) < tolerance, dtype
        assert without_bank > tolerance  # switching the bank off would fail this check
