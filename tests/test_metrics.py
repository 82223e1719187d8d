"""Warp error and CLIP frame consistency (sv2v_core/metrics.py)."""

import cv2
import numpy as np
import pytest

from sv2v_core.metrics import (
    CLIP_MISSING,
    MetricUnavailable,
    clip_consistency,
    compute_warp_error,
    dis_flow,
    valid_mask,
    warp_error,
)


def moving_texture(n=6, height=72, width=96, step=3, seed=0):
    """A smooth random texture panning `step` pixels right per frame."""
    rng = np.random.default_rng(seed)
    big = rng.random((height, width + n * step, 3)).astype(np.float32) * 255
    big = cv2.GaussianBlur(big, (0, 0), 2)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return [np.ascontiguousarray(big[:, n * step - i * step : n * step - i * step + width]) for i in range(n)]


def test_dis_recovers_a_shift():
    a, b = moving_texture(2)[:2]
    flow = dis_flow()(a, b)
    assert np.allclose(np.median(flow[..., 0]), 3, atol=0.1)
    assert np.allclose(np.median(flow[..., 1]), 0, atol=0.1)


def test_warp_error_near_zero_for_the_source_itself():
    source = moving_texture()
    result = compute_warp_error(source, source)
    assert result.flow == "DIS" and result.pairs == len(source) - 1
    assert result.value < 1.0


def test_flicker_gives_a_much_larger_error():
    source = moving_texture()
    rng = np.random.default_rng(1)
    flicker = [np.clip(f.astype(int) + int(rng.integers(-40, 40)), 0, 255).astype(np.uint8) for f in source]
    steady = warp_error(source, source)
    assert warp_error(source, flicker) > 100 * max(steady, 1.0)


def test_result_is_resized_to_the_source():
    source = moving_texture()
    bigger = [cv2.resize(f, (192, 144), interpolation=cv2.INTER_CUBIC) for f in source]
    assert warp_error(source, bigger) < 5.0


def test_occluded_pixels_are_masked():
    forward = np.zeros((10, 10, 2), np.float32)
    forward[..., 0] = 2.0
    backward = -forward
    assert valid_mask(forward, backward)[:, :8].all()
    assert not valid_mask(forward, backward)[:, 8:].any()  # lands outside the frame
    assert not valid_mask(forward, np.zeros_like(backward)).any()  # flows disagree


def test_frame_count_mismatch_and_too_few_frames():
    source = moving_texture(4)
    with pytest.raises(ValueError, match="fewer"):
        warp_error(source, source[:3])
    with pytest.raises(ValueError, match="more"):
        warp_error(source[:3], source)
    with pytest.raises(ValueError, match="two frames"):
        warp_error(source[:1], source[:1])


def test_raft_without_weights_says_so(monkeypatch):
    monkeypatch.delenv("SV2V_RAFT_WEIGHTS", raising=False)
    source = moving_texture(3)
    assert "RAFT weights not found, used DIS" in compute_warp_error(source, source).note
    with pytest.raises(MetricUnavailable, match="RAFT weights not found"):
        compute_warp_error(source, source, flow="raft")


def test_clip_without_weights_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("SV2V_CLIP", raising=False)
    with pytest.raises(MetricUnavailable) as info:
        clip_consistency(moving_texture(3))
    assert str(info.value) == CLIP_MISSING
    with pytest.raises(MetricUnavailable):
        clip_consistency(moving_texture(3), tmp_path / "missing")


def test_clip_consistency_with_a_local_tiny_clip(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )
    frames = moving_texture(4)
    assert clip_consistency([frames[0]] * 3, tmp_path) == pytest.approx(1.0, abs=1e-4)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    assert -1.0 <= clip_consistency(noise, tmp_path, batch_size=2) < 0.9999


def test_raft_path_with_local_random_weights(tmp_path, monkeypatch):
    optical_flow = pytest.importorskip("torchvision.models.optical_flow")
    torch = pytest.importorskip("torch")
    weights = tmp_path / "raft_small.pth"
    torch.manual_seed(0)
    torch.save(optical_flow.raft_small(weights=None).state_dict(), weights)
    monkeypatch.setenv("SV2V_RAFT_WEIGHTS", str(weights))
    source = moving_texture(2, height=60, width=70)  # not multiples of 8: padded inside
    result = compute_warp_error(source, source)
    assert result.flow == "RAFT" and result.note == ""  # random weights: only the plumbing is tested

    (tmp_path / "bad.pth").write_text("not weights")
    monkeypatch.setenv("SV2V_RAFT_WEIGHTS", str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="cannot read the RAFT weights"):
        compute_warp_error(source, source)
