"""The peer: the `streamdiffusion` package (PyPI 0.1.1) on our components, for like-for-like rows."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

import torch

from sv2v_core.attention import BankAttnProcessor
from sv2v_core.engine import LCM_ORIGINAL_STEPS, lcm_timesteps

from .profile import STAGE_LABELS
from .rows import PROMPT, STRENGTH

if TYPE_CHECKING:
    from .profile import StageTimer


def peer_problem() -> str | None:
    """Why the peer cannot run here, or None."""
    try:
        import streamdiffusion  # noqa: F401
        from streamdiffusion import StreamDiffusion  # noqa: F401
    except (ImportError, AttributeError, TypeError) as err:  # missing, or built for another diffusers
        return (f"the peer `streamdiffusion` is not usable here ({type(err).__name__}: {err}); "
                "install it with: pip install --no-deps streamdiffusion")
    return None


def peer_components(components):
    """The peer's components: its own copy of the UNet (ours carries the bank's
    processors and hooks; the peer runs diffusers' own), the rest shared.
    Make them before the engine patches the UNet."""
    if any(isinstance(p, BankAttnProcessor) for p in components.unet.attn_processors.values()):
        raise ValueError("the UNet already carries the bank's processors: make the peer's components "
                         "before StreamV2V patches it")
    return dataclasses.replace(components, unet=copy.deepcopy(components.unet))


def make_peer(components, size: int, steps: int, mode: str, dtype: torch.dtype, compile_mode: str | None = None):
    """StreamDiffusion (PyPI 0.1.1) on the given components, no bank, no
    guidance, the same timesteps; batch denoising in "stream" mode."""
    from diffusers import StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    train = components.scheduler.config.num_train_timesteps
    stride = train // LCM_ORIGINAL_STEPS
    t_index_list = [(train - 1 - t) // stride for t in lcm_timesteps(STRENGTH, steps, train)]
    stream = StreamDiffusion(pipe, t_index_list=t_index_list, torch_dtype=dtype, width=size, height=size,
                             use_denoising_batch=mode == "stream", cfg_type="none")
    stream.prepare(PROMPT, num_inference_steps=LCM_ORIGINAL_STEPS, guidance_scale=1.0)
    if compile_mode is not None:
        stream.unet = torch.compile(stream.unet, mode=compile_mode, dynamic=False)
    return stream


class PeerRow:
    """The `streamdiffusion` package (no bank) as a row: the stages of its
    `__call__` (preprocessing, encode, denoising, decode) under `no_grad` as
    there, then the same conversion to a uint8 image on the host as ours.
    (Its `__call__` itself times the frame with CUDA events, which need CUDA.)"""

    key = "peer"
    label = "peer no bank (streamdiffusion)"

    def __init__(self, components, size: int, steps: int, mode: str, dtype: torch.dtype, warmup: int,
                 compile_mode: str | None = None) -> None:
        self.components, self.size, self.steps, self.mode = components, size, steps, mode
        self.dtype, self.compile_mode, self.warmup = dtype, compile_mode, warmup
        self.stream = None

    def start(self) -> None:
        self.stream = make_peer(self.components, self.size, self.steps, self.mode, self.dtype, self.compile_mode)

    def stop(self) -> None:
        self.stream = None

    @torch.no_grad()
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.decode(self.stream.predict_x0_batch(self.encode(frame)))

    def encode(self, frame: np.ndarray) -> torch.Tensor:
        from PIL import Image

        stream = self.stream
        pixels = stream.image_processor.preprocess(Image.fromarray(frame), stream.height, stream.width)
        return stream.encode_image(pixels.to(device=stream.device, dtype=stream.dtype))

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        pixels = self.stream.decode_image(latent)
        pixels = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()

    def bank_bytes(self) -> int:
        return 0

    def bank_tokens(self) -> dict[str, int]:
        return {}

    @contextlib.contextmanager
    def instrumented(self, timer: "StageTimer"):
        """Time its stages under the names of ours (undone on exit); its UNet call includes its LCM step."""
        self.encode = timer.wrap(STAGE_LABELS["encode"], self.encode)
        self.decode = timer.wrap(STAGE_LABELS["decode"], self.decode)
        self.stream.unet_step = timer.wrap(STAGE_LABELS["unet"], self.stream.unet_step)
        try:
            yield
        finally:
            for name in ("encode", "decode"):
                self.__dict__.pop(name, None)
            self.stream.__dict__.pop("unet_step", None)
