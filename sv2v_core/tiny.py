"""The built-in offline model "tiny": Stable Diffusion 1.5 + LCM + TAESD, scaled down.

Its pictures are not art.  It exists so that the whole pipeline (the engine,
the feature bank, the app, the tests) runs anywhere, offline, in a fraction of
a second per frame, with the same kinds of modules a real model has:

- UNet: a `UNet2DConditionModel` laid out like SD1.5's (down blocks
  CrossAttn, CrossAttn, plain; mid block with cross-attention; up blocks
  plain, CrossAttn, CrossAttn — so `mid_block` and `up_blocks.1` hold
  transformer blocks as in SD1.5) with channels 32/48/48, one layer per
  block, 4 latent channels, cross-attention width 64.  It was fitted briefly
  (tools/fit_tiny_model.py) as an epsilon predictor on the tiny
  autoencoder's latents of synthetic sketch-like images at the timesteps
  the engine visits at strength <= 0.4, so an SDEdit/LCM
  img2img step returns a smoothed version of its input instead of noise.  The
  prompt barely matters (the text encoder is random).
- Autoencoder: an `AutoencoderTiny` (the TAESD architecture) with 32 channels
  instead of 64 and one block per level instead of three; 4 latent channels,
  downscale 8, like TAESD.  It was fitted to roughly reconstruct the same
  synthetic images (blurry edges, flat colours come back in their own hue;
  about 25 dB on assets/start.png at 256 px).
- Text encoder: a 2-layer, 64-wide `CLIPTextModel`, random (seeded).
- Tokenizer: the real CLIP BPE vocabulary (49408 tokens), converted from
  open_clip's MIT-licensed bpe_simple_vocab_16e6.txt.gz (see data/clip_tokenizer).
- Scheduler: `LCMScheduler` with SD1.5's noise schedule.
- ControlNet (optional, `load_components("tiny", controlnet="tiny")`): a
  `ControlNetModel` derived from the UNet as diffusers derives one
  (`ControlNetModel.from_unet`: the UNet's encoder and mid block, zero
  convolutions after each), with a conditioning embedding scaled down like
  the rest (channels 8/16/32/32 instead of 16/32/96/256).  Freshly derived,
  a ControlNet has no effect (its zero convolutions output zeros), so it was
  fitted briefly (tools/fit_tiny_controlnet.py) with the UNet frozen: given
  a sketch's "lines" control image (sometimes its Canny edges), predict the
  sketch, from a noised copy of it or of the sketch before its last strokes,
  at the timesteps strengths up to 0.8 visit.  So strokes in the control
  image pull the render toward those strokes, and the composition survives
  higher strengths.  Its pictures are not art either.

Everything is built from the configs below and the shipped weights in
sv2v_core/data/ (tiny_model.safetensors, tiny_controlnet.safetensors): no
download, deterministic, and quick to load.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"
TOKENIZER_DIR = DATA_DIR / "clip_tokenizer"
WEIGHTS_FILE = DATA_DIR / "tiny_model.safetensors"
CONTROLNET_FILE = DATA_DIR / "tiny_controlnet.safetensors"
CONTROLNET_EMBEDDING_CHANNELS = (8, 16, 32, 32)  # SD1.5's are (16, 32, 96, 256)
TEXT_ENCODER_SEED = 1234

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 48, 48),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers reads this as the number of heads, as in SD1.5's config
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    encoder_block_out_channels=(32, 32, 32, 32),
    decoder_block_out_channels=(32, 32, 32, 32),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# SD1.5's noise schedule with LCM sampling (as in LCM-distilled SD1.5 checkpoints).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    original_inference_steps=50,
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_scaling=10.0,
)

def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter of `module` deterministic pseudo-random values, fast.

    Independent of the libraries' own init code and of torch's global RNG:
    norm scales are 1, biases 0, every other weight is read from one seeded
    pool of uniform values (at a per-parameter offset, wrapping around) and
    scaled to a 1/sqrt(fan_in) bound, embeddings to 0.02.  Filling SD1.5's
    billion parameters this way takes seconds where sampling each one would
    take minutes on a small CPU.
    """
    pool = torch.rand(_POOL_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    owners = dict(module.named_modules())
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(module.named_parameters())):
            owner_name, _, leaf = name.rpartition(".")
            owner = owners[owner_name]
            if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                param.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias" or param.ndim < 2:
                param.zero_()
            else:
                scale = 0.02 if isinstance(owner, torch.nn.Embedding) else 1.0 / math.sqrt(param[0].numel())
                _fill_from_pool(param.view(-1), pool, (index * 7919) % _POOL_SIZE)
                param.mul_(scale)
    return module


_POOL_SIZE = 1_000_003  # prime, so the pattern does not line up with power-of-two shapes


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    done = 0
    while done < flat.numel():
        take = min(flat.numel() - done, pool.numel() - offset)
        flat[done : done + take].copy_(pool[offset : offset + take])
        done, offset = done + take, 0


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer shipped in data/clip_tokenizer (parsed once per process, then shared)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def make_scheduler() -> LCMScheduler:
    return LCMScheduler.from_config(SCHEDULER_CONFIG)


def make_text_encoder(config: dict = TEXT_CONFIG, seed: int = TEXT_ENCODER_SEED) -> CLIPTextModel:
    """A CLIP text encoder with seeded random weights (built on the meta device: no costly default init)."""
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():  # to_empty left them uninitialised
        assert name.endswith("position_ids"), f"unexpected buffer {name}"
        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return seeded_init_(model, seed)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def make_vae() -> AutoencoderTiny:
    return AutoencoderTiny(**VAE_CONFIG)


def load_weights(unet: UNet2DConditionModel, vae: AutoencoderTiny, path: Path = WEIGHTS_FILE) -> None:
    """Load the fitted UNet and autoencoder weights (stored as float16)."""
    state = load_file(str(path))
    for prefix, module in (("unet.", unet), ("vae.", vae)):
        part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)


def make_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """The tiny ControlNet's architecture, derived from the tiny UNet (weights copied from it, zero convs zero)."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)


def load_controlnet_weights(controlnet: ControlNetModel, path: Path = CONTROLNET_FILE) -> None:
    """Load the fitted ControlNet weights (stored as float16)."""
    controlnet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
