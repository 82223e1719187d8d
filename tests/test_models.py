"""Model loading: the built-in tiny model, sd15-random, real-weight paths and their errors."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import time

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import save_file

from sv2v_core import tiny
from sv2v_core.models import BUILTIN_MODELS, SD15_UNET_CONFIG, ModelLoadError, load_components


@pytest.fixture(scope="module")
def comps():
    return load_components("tiny")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # images in [-1, 1]
    return 10 * math.log10(1 / max(mse, 1e-12))


def _test_image(size: int = 128) -> torch.Tensor:
    """White canvas, a red square, a black diagonal stroke; (1, 3, size, size) in [-1, 1]."""
    img = np.full((size, size, 3), 255, np.uint8)
    q = size // 4
    img[q : 2 * q + q // 2, q : 2 * q + q // 2] = (220, 20, 20)
    for i in range(size // 8, size - size // 8):
        img[i, max(0, i - 2) : i + 2] = 0
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1


# ----------------------------------------------------------------------------- tiny

def test_builtin_names():
    assert BUILTIN_MODELS == ("tiny", "sd15-random")


def test_tiny_loads_offline_fast_and_frozen(comps):
    start = time.perf_counter()
    again = load_components("tiny")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"loading tiny took {elapsed:.2f}s"  # ~0.1-0.3 s on an idle 2-core CPU
    assert again.builtin and again.name == "tiny"
    for module in again.modules():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_tiny_is_deterministic(comps):
    again = load_components("tiny")
    for a, b in zip(comps.modules(), again.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_has_real_clip_vocabulary(comps):
    tok = comps.tokenizer
    assert len(tok) == 49408
    assert tok("a cat").input_ids == [49406, 320, 2368, 49407]
    ids = tok("a watercolor painting", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tok.unk_token_id not in ids[1:4]
    assert tok.model_max_length == 77


def test_unet_shapes_and_layout(comps):
    unet, te = comps.unet, comps.text_encoder
    assert unet.config.in_channels == 4 and unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert te.config.max_position_embeddings == 77 and te.config.vocab_size == 49408
    ids = comps.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = te(ids)[0]
        assert embeds.shape == (1, 77, te.config.hidden_size)
        out = unet(torch.randn(2, 4, 16, 24), torch.tensor([399, 99]), embeds.expand(2, -1, -1)).sample
    assert out.shape == (2, 4, 16, 24) and torch.isfinite(out).all()


def test_transformer_blocks_where_sd15_has_them(comps):
    def has_transformer(name):
        return any(isinstance(m, BasicTransformerBlock) for m in comps.unet.get_submodule(name).modules())

    assert has_transformer("mid_block")
    assert has_transformer("up_blocks.1")
    assert not has_transformer("up_blocks.0")  # as in SD1.5


def test_scheduler_is_lcm_with_sd15_schedule(comps):
    cfg = comps.scheduler.config
    assert type(comps.scheduler).__name__ == "LCMScheduler"
    assert cfg.beta_schedule == "scaled_linear" and cfg.num_train_timesteps == 1000
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert cfg.original_inference_steps == 50 and cfg.prediction_type == "epsilon"


def test_autoencoder_is_taesd_shaped_and_reconstructs(comps):
    image = _test_image(128)
    with torch.no_grad():
        z = comps.vae.encode(image).latents
        out = comps.vae.decode(z).sample
    assert z.shape == (1, 4, 16, 16)  # 4 channels, downscale 8, like TAESD
    assert out.shape == image.shape
    assert _psnr(out, image) > 15  # fitted: ~20-25 dB; random weights: ~1 dB
    rgb = (out[0] + 1) / 2
    red = rgb[:, 40:60, 40:60].mean(dim=(1, 2))  # (220, 20, 20) comes back red
    assert red[0] > 0.55 and red[1] < 0.5 and red[2] < 0.3 and red[0] - red[1] > 0.2, red
    white = rgb[:, 2:12, 100:126].mean(dim=(1, 2))
    assert (white > 0.75).all(), white


def test_img2img_step_follows_the_input(comps):
    """One SDEdit + LCM step at t=399 returns something closer to the input than the noised latent."""
    image = _test_image(128)
    ids = comps.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds = comps.text_encoder(ids)[0]
        z = comps.vae.encode(image).latents
        t = 399
        a = comps.scheduler.alphas_cumprod[t]
        noise = torch.randn(z.shape, generator=g)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        eps = comps.unet(x_t, torch.tensor([t]), embeds).sample
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        naive = x_t / a.sqrt()  # what an all-zero eps prediction would give
        rendered, unguided = comps.vae.decode(x0).sample, comps.vae.decode(naive).sample
    assert (x0 - z).pow(2).mean() < 0.5 * (naive - z).pow(2).mean()
    assert _psnr(rendered, image) > _psnr(unguided, image) + 2
    assert _psnr(rendered, image) > 14


def test_to_casts_every_module(comps):
    c = load_components("tiny", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for m in c.modules() for p in m.parameters())
    c.to("cpu", torch.float32)
    assert all(p.dtype == torch.float32 for m in c.modules() for p in m.parameters())


def test_tiny_weights_are_small():
    shipped = sum(p.stat().st_size for p in tiny.DATA_DIR.rglob("*") if p.is_file())
    assert shipped < 6_000_000


# ----------------------------------------------------------------------------- sd15-random

def test_sd15_random_config_is_full_size():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < params < 865e6  # SD1.5's UNet: 859.5M
    assert any(isinstance(m, BasicTransformerBlock) for m in unet.up_blocks[1].modules())


def test_sd15_random_builds_deterministically():
    """~2 s and ~4 GB per build on a 2-core CPU: meta-device construction plus a pooled seeded fill."""
    a = load_components("sd15-random")
    assert a.builtin and a.unet.config.cross_attention_dim == 768 and a.text_encoder.config.hidden_size == 768
    probe = a.unet.down_blocks[0].resnets[0].conv1.weight
    assert torch.isfinite(probe).all() and probe.std() > 0
    first = probe[0, 0].clone()
    del a
    b = load_components("sd15-random")
    assert torch.equal(b.unet.down_blocks[0].resnets[0].conv1.weight[0, 0], first)


# ----------------------------------------------------------------------------- real-weight paths, offline

@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, comps):
    """The tiny model saved in the diffusers layout, plus its autoencoder as a TAESD-style folder."""
    root = tmp_path_factory.mktemp("models")
    model = root / "tiny-diffusers"
    comps.unet.save_pretrained(model / "unet")
    comps.text_encoder.save_pretrained(model / "text_encoder")
    comps.tokenizer.save_pretrained(model / "tokenizer")
    comps.scheduler.save_pretrained(model / "scheduler")
    (model / "model_index.json").write_text(json.dumps({"_class_name": "LatentConsistencyModelPipeline"}))
    comps.vae.save_pretrained(root / "taesd")
    return model, root / "taesd"


def test_loads_a_local_diffusers_folder(diffusers_folder, comps):
    model, vae = diffusers_folder
    c = load_components(str(model), vae=vae)  # a Path works too
    assert not c.builtin and c.name == str(model)
    for a, b in zip(comps.modules(), c.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert c.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert type(c.scheduler).__name__ == "LCMScheduler"
    assert not c.unet.training and not next(c.unet.parameters()).requires_grad


def test_fuses_a_lora_file(diffusers_folder, tmp_path, comps):
    model, vae = diffusers_folder
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = comps.unet.get_submodule(layer).weight
    g = torch.Generator().manual_seed(1)
    down = torch.randn(2, weight.shape[1], generator=g) * 0.1
    up = torch.randn(weight.shape[0], 2, generator=g) * 0.1
    lora = tmp_path / "lora.safetensors"
    save_file({f"unet.{layer}.lora_A.weight": down, f"unet.{layer}.lora_B.weight": up}, str(lora))
    c = load_components(str(model), vae=str(vae), lora=str(lora))
    fused = c.unet.get_submodule(layer)
    assert isinstance(fused, torch.nn.Linear)  # adapter layers removed, weights fused
    assert torch.allclose(fused.weight, weight + up @ down, atol=1e-5)


# ----------------------------------------------------------------------------- errors

def _error(model, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_components(model, **kwargs)
    return str(info.value)


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    message = _error(missing)
    assert missing in message and "no such file or folder" in message


def test_missing_safetensors_file(tmp_path):
    missing = str(tmp_path / "model.safetensors")
    assert missing in _error(missing)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    message = _error(str(path))
    assert str(path) in message and "safetensors" in message and "pickle" in message


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(4096))
    message = _error(str(path))
    assert str(path) in message and "not a valid .safetensors" in message


def test_text_file_renamed_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n" * 20)
    assert str(path) in _error(str(path))


def test_safetensors_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "tensors.safetensors"
    save_file({"just.a.tensor": torch.zeros(3)}, str(path))
    assert str(path) in _error(str(path))


def test_other_file_kind(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    assert "not a .safetensors file" in _error(str(path))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    message = _error(str(tmp_path))
    assert str(tmp_path) in message and "not a diffusers model" in message


def test_broken_diffusers_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    message = _error(str(tmp_path))
    assert str(tmp_path) in message and "unet/" in message


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error("sv2v-nobody/no-such-model")
    assert "sv2v-nobody/no-such-model" in message and "offline" in message
    assert "huggingface-cli download" in message and "--model tiny" in message


def test_missing_autoencoder(diffusers_folder, tmp_path):
    model, _ = diffusers_folder
    missing = str(tmp_path / "no-taesd")
    message = _error(str(model), vae=missing)
    assert missing in message and "autoencoder" in message


def test_builtin_refuses_vae_and_lora():
    assert "tiny" in _error("tiny", lora="latent-consistency/lcm-lora-sdv1-5")
    assert "tiny" in _error("tiny", vae="madebyollin/taesd")


@pytest.mark.parametrize("name", ["", "   ", "not a model name"])
def test_nonsense_names(name):
    _error(name)
