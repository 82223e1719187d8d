"""Scribble / line-art conditioning: control images, the ControlNet in both
render modes with the bank on, per-slot control images, per-row scales in
batched streams, guidance, the fast path, loading and its errors."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sv2v_core import BankConfig, ModelLoadError, StreamConfig, StreamV2V, load_components, tiny
from sv2v_core.accel import eager_backend
from sv2v_core.control import control_image, paper_colour
from sv2v_core.images import resize
from sv2v_core.models import load_controlnet
from test_batching import assert_batched_equal_alone, sketch

SIZE = 64
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def controlled():
    """The built-in tiny model with the built-in tiny ControlNet."""
    engine = StreamV2V(load_components("tiny", controlnet="tiny"))
    yield engine
    engine.close()


def stroke_at(row: int, size: int = SIZE) -> np.ndarray:
    """A white canvas with one black horizontal stroke, 3 px thick, at `row`."""
    image = np.full((size, size, 3), 255, np.uint8)
    image[row: row + 3, 6: size - 6] = 0
    return image


def config(**changes) -> StreamConfig:
    defaults = dict(prompt="a watercolor painting", width=SIZE, height=SIZE, similarity_skip=None, scene_cut=None,
                    bank=BankConfig(merge_every=1))
    return StreamConfig(**{**defaults, **changes})


def spy(engine):
    """Capture every ControlNet call's control image and timesteps, and the
    residuals it returns and the UNet receives."""
    calls = []

    def on_controlnet(module, args, kwargs):
        calls.append({"cond": kwargs["controlnet_cond"].clone(), "t": args[1].tolist()})

    def on_controlnet_out(module, args, kwargs, output):
        calls[-1]["down"] = [d.clone() for d in output[0]]

    def on_unet(module, args, kwargs):
        if calls and "unet_down" not in calls[-1] and kwargs.get("down_block_additional_residuals") is not None:
            calls[-1]["unet_down"] = [d.clone() for d in kwargs["down_block_additional_residuals"]]

    handles = [engine.controlnet.register_forward_pre_hook(on_controlnet, with_kwargs=True),
               engine.controlnet.register_forward_hook(on_controlnet_out, with_kwargs=True),
               engine.unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    return calls, handles


def as_cond(image: np.ndarray, kind: str = "lines") -> torch.Tensor:
    """What the ControlNet should receive for a frame: its control image in [0, 1], (3, H, W)."""
    return torch.from_numpy(control_image(image, kind)).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------- control images


def test_lines_are_the_strokes_white_on_black_whatever_the_paper():
    canvas = np.full((SIZE, SIZE, 3), 255, np.uint8)
    canvas[10:13, 5:50] = (0, 0, 0)           # black pen
    canvas[30:33, 5:50] = (250, 220, 20)      # yellow pen: light, but not paper
    canvas[50, 5:50] = (200, 200, 200)        # a faint grey line: partial ink
    lines = control_image(canvas, "lines")
    assert lines.shape == (SIZE, SIZE, 3) and lines.dtype == np.uint8
    assert (lines[11, 5:50] == 255).all() and (lines[31, 5:50] == 255).all()
    assert 0 < lines[50, 20, 0] < 255
    assert (lines[0:8] == 0).all() and (lines[40:48] == 0).all()

    chalk = np.full((SIZE, SIZE, 3), (30, 30, 60), np.uint8)  # white chalk on a dark fill: same polarity
    chalk[20:23, 5:50] = 255
    assert (control_image(chalk, "lines")[21, 5:50] == 255).all()
    assert (control_image(chalk, "lines")[40:] == 0).all()


def test_paper_is_the_most_common_colour_even_under_many_strokes():
    canvas = np.full((SIZE, SIZE, 3), (240, 220, 180), np.uint8)
    canvas[:, ::3] = (10, 10, 10)  # a third of the canvas inked
    canvas[::4] = (200, 30, 30)
    assert tuple(paper_colour(canvas)) == (240, 220, 180)


def test_canny_marks_edges_and_image_passes_the_frame():
    frame = np.full((SIZE, SIZE, 3), 255, np.uint8)
    frame[16:48, 16:48] = (40, 80, 200)
    edges = control_image(frame, "canny")
    assert edges[32, 14:18].max() == 255 and edges[32, 46:50].max() == 255  # the square's sides
    assert edges[32, 30:34].max() == 0 and edges[2:10].max() == 0           # not inside, not on the paper
    assert control_image(frame, "image") is frame
    with pytest.raises(ValueError, match="control image must be one of"):
        control_image(frame, "depth")


# ---------------------------------------------------------------- scale 0, and the effect


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_scale_zero_equals_no_controlnet_exactly(engine, controlled, mode):
    plain, off = engine.new_stream(config(mode=mode)), controlled.new_stream(config(mode=mode, control_scale=0.0))
    for step in range(6):
        assert np.array_equal(engine(plain, sketch(step)).image, controlled(off, sketch(step)).image), step
    assert plain.bank.merges > 0 and plain.bank.layers.keys() == off.bank.layers.keys()
    for layer, stored in plain.bank.layers.items():
        for name, tensor in stored.items():
            assert torch.equal(tensor, off.bank.layers[layer][name]), (layer, name)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_the_control_image_changes_the_render_toward_its_lines(controlled, mode):
    """Same frames, same everything; only the control image differs (a stroke
    high up or low down): each render is darkest along its own stroke."""
    renders = {}
    for row in (16, 44):
        state = controlled.new_stream(config(mode=mode))
        outputs = [controlled(state, sketch(0), control=stroke_at(row)) for _ in range(4)]
        outputs += controlled.flush(state)
        renders[row] = outputs[-1].image.astype(int).mean(axis=2)
    assert np.abs(renders[16] - renders[44]).mean() > 2
    for row, other in ((16, 44), (44, 16)):
        own = renders[row][row: row + 3, 10:-10].mean()
        elsewhere = renders[row][other: other + 3, 10:-10].mean()
        assert own < elsewhere - 15, (row, own, elsewhere)


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_strokes_on_a_blank_canvas_pull_the_render_toward_lines(controlled, mode):
    """The built-in ControlNet's fitted effect: a stroke on the canvas shows
    darker in the render with conditioning than without, at a high strength."""
    frame = stroke_at(30)
    darkness = {}
    for scale in (0.0, 1.0):
        state = controlled.new_stream(config(mode=mode, strength=0.7, control_scale=scale))
        outputs = [controlled(state, frame) for _ in range(3)] + controlled.flush(state)
        image = outputs[-1].image.astype(int).mean(axis=2)
        darkness[scale] = image[50:60, 10:-10].mean() - image[30:33, 10:-10].mean()  # paper minus the stroke
    assert darkness[1.0] > darkness[0.0] + 15, darkness


# ---------------------------------------------------------------- which control image each row gets


def test_stream_slot_k_gets_the_control_image_of_the_frame_it_holds(controlled):
    frames = [stroke_at(4 + 7 * index) for index in range(7)]  # every frame its own stroke
    state = controlled.new_stream(config(mode="stream", steps=3, strength=0.5))
    calls, handles = spy(controlled)
    try:
        for frame in frames[:4]:
            controlled(state, frame)
        controlled.configure(state, state.config.replace(control_image="canny"))  # in flight: keep their images
        for frame in frames[4:]:
            controlled(state, frame)
        flushed = controlled.flush(state)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == len(frames) + len(flushed) and len(flushed) == 2
    timesteps = state.schedule["timesteps"].tolist()
    kinds = ["lines"] * 4 + ["canny"] * 3
    for t, call in enumerate(calls):
        assert call["t"] == timesteps
        for k in range(3):  # slot k holds frame t − k (the warm start: frame 0; flush: the newest again)
            held = min(max(t - k, 0), len(frames) - 1)
            expected = as_cond(frames[held], kinds[held])
            assert torch.equal(call["cond"][k], expected), (t, k)


def test_latency_mode_conditions_every_step_on_the_frame(controlled):
    frames = [stroke_at(8 + 9 * index) for index in range(3)]
    state = controlled.new_stream(config(mode="latency", steps=4))
    calls, handles = spy(controlled)
    try:
        for frame in frames:
            controlled(state, frame)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 4 * len(frames)
    for index, call in enumerate(calls):
        assert call["t"] == [state.schedule["timesteps"].tolist()[index % 4]]
        assert torch.equal(call["cond"][0], as_cond(frames[index // 4]))


def test_a_control_source_is_resized_and_used_instead_of_the_frame(controlled):
    state = controlled.new_stream(config(mode="latency", steps=1))
    source = resize(stroke_at(20), 128, 96)  # another size: resized to the stream's
    calls, handles = spy(controlled)
    try:
        controlled(state, sketch(0), control=source)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(calls[0]["cond"][0], as_cond(resize(source, SIZE, SIZE)))


# ---------------------------------------------------------------- batched streams


def test_each_row_gets_its_own_scale(controlled):
    a = controlled.new_stream(config(control_scale=0.5))
    b = controlled.new_stream(config(control_scale=1.5, control_image="canny", seed=3))
    calls, handles = spy(controlled)
    try:
        controlled.render([(a, sketch(0)), (b, sketch(5))])
    finally:
        for handle in handles:
            handle.remove()
    (call,) = calls
    scales = torch.tensor([0.5] * 4 + [1.5] * 4).view(-1, 1, 1, 1)
    for raw, given in zip(call["down"], call["unet_down"]):
        torch.testing.assert_close(given, raw * scales, rtol=0, atol=0)
    assert torch.equal(call["cond"][0], as_cond(sketch(0)))
    assert torch.equal(call["cond"][4], as_cond(sketch(5), "canny"))


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_streams_with_different_scales_and_kinds_batched_equal_each_alone(controlled, mode):
    backgrounds = [WHITE, (240, 220, 180), (200, 230, 255), WHITE]
    settings = [config(mode=mode, control_scale=0.5),
                config(mode=mode, control_scale=1.5, control_image="canny", seed=1, prompt="an oil painting"),
                config(mode=mode, control_scale=0.0, seed=2),                 # off: a group of its own
                config(mode=mode, control_image="image", seed=3, strength=0.5)]  # unset: 1.0
    states = assert_batched_equal_alone(controlled, settings, backgrounds, 6)
    assert all(state.bank.merges > 0 for state in states)
    assert controlled.batch_key(states[0]) == controlled.batch_key(states[1]) != controlled.batch_key(states[2])


# ---------------------------------------------------------------- classifier-free guidance


@torch.inference_mode()
def test_guidance_runs_the_controlnet_on_both_halves(controlled):
    state = controlled.new_stream(config(mode="latency", guidance_scale=3.0, negative_prompt="blurry",
                                         control_scale=0.8, bank=BankConfig(mode="none")))
    control = torch.from_numpy(control_image(stroke_at(20), "lines")).permute(2, 0, 1)[None]
    x = torch.randn(state.noise[:1].shape, generator=torch.Generator().manual_seed(0))
    result = controlled._lcm_step([state], x, [1], [False], control)
    t = state.schedule["timesteps"][1:2]
    eps = []
    for embeds in (state.negative_embeds, state.prompt_embeds):  # by hand, one half at a time
        down, mid = controlled.controlnet(x, t, encoder_hidden_states=embeds, controlnet_cond=control.float() / 255,
                                          conditioning_scale=0.8, return_dict=False)
        eps.append(controlled.unet(x, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid, return_dict=False)[0])
    guided = eps[0] + 3.0 * (eps[1] - eps[0])
    s = state.schedule
    x0 = (x - s["sqrt_beta"][1] * guided) / s["sqrt_alpha"][1]
    torch.testing.assert_close(result, s["c_out"][1] * x0 + s["c_skip"][1] * x, rtol=1e-4, atol=1e-5)


def test_guided_stream_with_conditioning_renders(controlled):
    state = controlled.new_stream(config(guidance_scale=2.0, negative_prompt="blurry"))
    calls, handles = spy(controlled)
    try:
        images = [controlled(state, sketch(step)).image for step in range(3)]
    finally:
        for handle in handles:
            handle.remove()
    assert all(call["cond"].shape[0] == 8 and torch.equal(call["cond"][:4], call["cond"][4:]) for call in calls)
    assert all(np.isfinite(image).all() for image in images)


# ---------------------------------------------------------------- the fast path


@pytest.mark.parametrize("mode", ["stream", "latency"])
def test_bank_unet_takes_the_residuals_as_inputs(controlled, mode):
    def run():
        state = controlled.new_stream(config(mode=mode, steps=2, control_scale=0.7))
        return [controlled(state, sketch(step)).image for step in range(4)]

    plain = run()
    controlled.backend = eager_backend(controlled)
    try:
        functional = run()
        specs = [key[0] for key in controlled.backend.functions]
    finally:
        controlled.backend = None
    assert all(np.array_equal(a, b) for a, b in zip(plain, functional))
    down = len(controlled.controlnet.controlnet_down_blocks)
    assert specs and all(spec.control == down for spec in specs)
    assert specs[0].input_names()[-1] == "control.mid"


def test_onnx_export_with_controlnet_matches_pytorch(controlled, tmp_path):
    pytest.importorskip("onnxruntime")
    from sv2v_core.onnx_export import check_onnx, export_onnx

    state = controlled.new_stream(config(steps=2, control_scale=0.9, bank=BankConfig(merge_every=1,
                                                                                   fusion_threshold=-1.0)))
    for step in range(3):
        controlled(state, sketch(step))
    export = export_onnx(controlled, state, tmp_path / "unet.onnx")
    assert export.spec.control == len(controlled.controlnet.controlnet_down_blocks)
    assert "control.mid" in export.input_names
    result = check_onnx(controlled, state, export, atol=1e-4, rtol=1e-3)
    assert result.ok, str(result)
    import onnxruntime as ort

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    feeds = {name: arg.detach().numpy() for name, arg in zip(export.input_names, export.args)}
    eps = session.run(["eps"], feeds)[0]
    feeds["control.mid"] = feeds["control.mid"] * 0 + 1  # other conditioning
    assert np.abs(session.run(["eps"], feeds)[0] - eps).max() > 1e-4


# ---------------------------------------------------------------- loading and errors


def test_builtin_controlnet_is_derived_from_the_unet_deterministic_and_small(controlled):
    again = load_components("tiny", controlnet="tiny")
    assert again.controlnet_name == "tiny" and not again.controlnet.training
    first, second = controlled.controlnet.state_dict(), again.controlnet.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert again.controlnet.config.block_out_channels == again.unet.config.block_out_channels
    assert len(controlled.controlnet.controlnet_down_blocks) == len(list(_skips(again.unet)))
    assert any(p.abs().max() > 0 for p in again.controlnet.controlnet_mid_block.parameters())  # fitted, not zero
    assert tiny.CONTROLNET_FILE.stat().st_size < 2_000_000


def _skips(unet):
    """The UNet's skip connections (what the ControlNet's down residuals add to)."""
    yield unet.conv_in
    for block in unet.down_blocks:
        yield from block.resnets
        yield from block.downsamplers or []


def test_loads_a_controlnet_folder_and_a_single_file(controlled, tmp_path):
    reference = controlled.controlnet.state_dict()
    controlled.controlnet.save_pretrained(tmp_path / "folder")
    single = tmp_path / "controlnet.safetensors"
    save_file({key: value.contiguous() for key, value in reference.items()}, str(single))
    for source in (tmp_path / "folder", single):
        loaded = load_components("tiny", controlnet=source).controlnet  # a Path works too
        assert loaded.config.conditioning_embedding_out_channels == list(tiny.CONTROLNET_EMBEDDING_CHANNELS)
        state = loaded.state_dict()
        assert all(torch.equal(reference[key], state[key]) for key in reference), source


def _load_error(name, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_components("tiny", controlnet=str(name), **kwargs)
    message = str(info.value)
    assert "\n" not in message.strip()
    return message


def test_unloadable_controlnets_give_one_clear_error(tmp_path):
    message = _load_error("lllyasviel/sd-controlnet-scribble")
    assert "ControlNet" in message and "offline" in message and "--controlnet tiny" in message
    assert "no such file or folder" in _load_error(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    assert "not a diffusers ControlNet" in _load_error(tmp_path / "empty")
    assert "pickle" in _load_error(tmp_path / "scribble.pth")
    not_a_controlnet = tmp_path / "model.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(not_a_controlnet))
    assert str(not_a_controlnet) in _load_error(not_a_controlnet)
    assert "not a built-in ControlNet" in _load_error("scribble")


def test_a_controlnet_of_another_model_family_is_refused(tmp_path):
    other = UNet2DConditionModel(**dict(tiny.UNET_CONFIG, block_out_channels=(32, 64, 64)))
    with pytest.raises(ModelLoadError, match="fits only the built-in model 'tiny'"):
        load_controlnet("tiny", other, "other")
    tiny.make_controlnet(other).save_pretrained(tmp_path / "wide")
    message = _load_error(tmp_path / "wide")
    assert "does not fit model 'tiny'" in message and "block_out_channels [32, 64, 64] vs [32, 48, 48]" in message


def test_conditioning_needs_a_controlnet(engine):
    with pytest.raises(ValueError, match="needs a ControlNet"):
        engine.new_stream(config(control_scale=1.0))
    state = engine.new_stream(config())
    with pytest.raises(ValueError, match="needs a ControlNet"):
        engine.configure(state, state.config.replace(control_scale=0.5))
    with pytest.raises(ValueError, match="no ControlNet"):
        engine(state, sketch(0), control=stroke_at(10))
    assert state.frames_in == 0  # refused before the stream changed
    assert engine.control_scale(state) == 0 and not engine.controlled(state)
    with pytest.raises(ValueError, match="control scale must be between 0.0 and 2.0"):
        config(control_scale=3.0)
    with pytest.raises(ValueError, match="control image must be one of"):
        config(control_image="depth")
