"""StreamV2V: streaming LCM img2img with a feature bank of past frames.

One `StreamV2V` wraps one loaded model (`Components`) and serves any number
of streams; each stream's state (`StreamState`, made by `new_stream`) is
passed to every call.  A call takes one input frame and returns one `Output`:

    engine = StreamV2V(load_components("tiny"))
    state = engine.new_stream(StreamConfig(prompt="a watercolor", width=256, height=256))
    for frame in frames:
        out = engine(state, frame)
    rest = engine.flush(state)

The method (paper §3–4, DESIGN.md §2):

- SDEdit img2img with LCM: from a 50-step LCM schedule, strength s and n
  steps give the timesteps (s = 0.4, n = 4: indices 30, 35, 40, 45, i.e.
  timesteps 399, 299, 199, 99).  Each step predicts x0 from the UNet output
  (epsilon, v or sample prediction, as the scheduler says), applies the
  consistency boundary scalings (denoised = c_out·x0 + c_skip·x, exactly
  `LCMScheduler.step`'s) and re-noises it to the next level with a fixed noise
  tensor per slot, drawn once from the seed.
- Stream batch ("stream" mode): slot k holds frame t−k at step k; one UNet
  call of batch n advances them all, admits the newest frame and emits the
  oldest.  The slots are warm-started from the first frame, each noised to
  its own level.  "latency" mode runs the n steps of each frame in turn.
- The feature bank is read and written through the attention processors and
  hooks of `attention.BankPatch`, with the stream's bank passed in the call.
  A frame records its features only when its commit will keep them (the
  bank is due an update, and every batch row renders an input fed since the
  bank was last emptied: see `StreamState.bank_takes`).
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch

from . import images
from .attention import BankPatch
from .bank import BankView, as_index
from .config import StreamConfig
from .stream import Output, StreamState

LCM_ORIGINAL_STEPS = 50
LCM_DISTILLED_GUIDANCE = 8.5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def lcm_timesteps(strength: float, steps: int, train_timesteps: int = 1000) -> list[int]:
    """The `steps` timesteps SDEdit at `strength` visits on the 50-step LCM schedule."""
    stride = train_timesteps // LCM_ORIGINAL_STEPS
    # SDEdit keeps the first ⌊50·s⌋ timesteps of the schedule (as LCMScheduler does with `strength`).  The
    # small epsilon absorbs float error: 50·0.58 is 28.999…96 and means 29 (flooring 50·(1 − 0.8) = 9.99…
    # once gave 819 instead of 799 for s = 0.8).
    kept = max(int(LCM_ORIGINAL_STEPS * strength + 1e-9), 1)
    start = LCM_ORIGINAL_STEPS - kept
    indices = [start + (LCM_ORIGINAL_STEPS - start) * k // steps for k in range(steps)]
    if len(set(indices)) < steps:
        lowest = math.ceil(100 * steps / LCM_ORIGINAL_STEPS) / 100
        raise ValueError(f"strength {strength} is too low for {steps} steps; use at least {lowest} or fewer steps")
    return [train_timesteps - 1 - stride * index for index in indices]


def predicted_original(x: torch.Tensor, model_output: torch.Tensor, sqrt_alpha, sqrt_beta,
                       prediction_type: str) -> torch.Tensor:
    """x0 from the UNet's output at noise level (sqrt_alpha, sqrt_beta), as
    `LCMScheduler.step` computes it for each prediction type."""
    if prediction_type == "epsilon":
        return (x - sqrt_beta * model_output) / sqrt_alpha
    if prediction_type == "v_prediction":
        return sqrt_alpha * x - sqrt_beta * model_output
    return model_output  # "sample"


def check_scheduler(config) -> None:
    """Refuse scheduler settings the engine's LCM step does not reproduce."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"the model's scheduler predicts {prediction!r}; the engine supports "
                         f"{', '.join(PREDICTION_TYPES)}")
    if config.get("thresholding", False):
        raise ValueError("the model's scheduler uses dynamic thresholding, which the streaming engine does "
                         "not implement; set thresholding=False in its scheduler config")


def guidance_embedding(scale: float, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of w = scale − 1 for guidance-distilled LCM UNets (1, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
    angles = (scale - 1.0) * 1000.0 * frequencies
    embedding = torch.cat([angles.sin(), angles.cos()])
    return torch.nn.functional.pad(embedding, (0, dim - 2 * half)).unsqueeze(0)


class StreamV2V:
    """The pipeline: explicit components, one readable `__call__`."""

    def __init__(self, components) -> None:
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        check_scheduler(self.scheduler.config)
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        self.patch = BankPatch(self.unet)
        vae_factor = 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)
        self.latent_scale = vae_factor
        self.size_multiple = vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        self.guidance_embedded = self.unet.config.time_cond_proj_dim is not None
        self._conditions: dict[tuple, torch.Tensor] = {}
        # None: the patched diffusers UNet, eagerly.  `accel` may install a
        # callable (x, t, embeds, condition, view) -> eps with the same
        # results: a compiled or TensorRT UNet with the bank as explicit inputs.
        self.backend = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def close(self) -> None:
        """Give the UNet its original attention processors back."""
        self.patch.remove()

    # -- streams ----------------------------------------------------------
    def new_stream(self, config: StreamConfig) -> StreamState:
        """A fresh stream with its own bank; nothing is rendered until its first frame."""
        state = StreamState(config)
        self._start(state, config)
        return state

    def configure(self, state: StreamState, config: StreamConfig) -> StreamState:
        """Apply new settings to a running stream.

        A prompt change takes effect on the next frame without restarting the
        frames in flight (no blank or grey frames); it empties the bank when
        `reset_on_prompt_change`.  Bank settings apply at once.  Size, steps,
        strength, seed and mode restart the stream (the next frame warm-starts).
        """
        old = state.config
        restart = (old.width, old.height, old.steps, old.strength, old.seed, old.mode) != (
            config.width, config.height, config.steps, config.strength, config.seed, config.mode
        )
        if restart:
            self._start(state, config)
            return state
        state.config = config
        state.bank.reconfigure(config.bank)
        if (old.prompt, old.negative_prompt, old.guidance_scale) != (
            config.prompt, config.negative_prompt, config.guidance_scale
        ):
            self._embed_prompt(state)
            if config.reset_on_prompt_change and old.prompt != config.prompt:
                state.reset_bank()
        return state

    def _start(self, state: StreamState, config: StreamConfig) -> None:
        """(Re)start `state` under `config`: fixed noise, schedule, prompt, empty bank."""
        self._check(config)
        latent_shape = (config.steps, 4, config.height // self.latent_scale, config.width // self.latent_scale)
        noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(config.seed))
        state.config = config
        state.bank.seed = config.seed
        state.bank.reconfigure(config.bank)
        state.reset()
        state.noise = noise.to(self.device, self.dtype)
        state.schedule = self._schedule(config)
        self._embed_prompt(state)

    # -- rendering ----------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, state: StreamState, frame) -> Output:
        """Render the next input frame of `state`'s stream."""
        config = state.config
        image = images.resize(images.to_rgb_array(frame), config.width, config.height)
        thumb = images.thumbnail(image)
        index = state.frames_in
        state.to(self.device)

        if state.last_thumb is not None:
            similarity = images.similarity(thumb, state.last_thumb)
            if config.similarity_skip is not None and similarity >= config.similarity_skip:
                state.frames_in += 1
                if state.caught_up():  # its render is already out: re-emit it
                    state.last_output = Output(state.last_output.image, index, skipped=True)
                    return state.last_output
                return self._render(state, state.last_latent, state.last_fed)  # a repeat, like flush
            if config.scene_cut is not None and similarity < config.scene_cut:
                state.reset_bank()  # this input is the first of the new scene
        state.frames_in += 1
        state.last_thumb = thumb
        state.last_fed = index
        state.last_latent = self._encode(image)
        return self._render(state, state.last_latent, index)

    @torch.inference_mode()
    def flush(self, state: StreamState) -> list[Output]:
        """Feed the newest input again until its render has come out.

        Stream mode lags by steps − 1 frames; a canvas sends no frames once
        the person stops drawing, so without a flush the last stroke would
        stay unrendered.  Returns the outputs produced ([] when caught up).
        """
        outputs: list[Output] = []
        state.to(self.device)
        while not state.caught_up():
            outputs.append(self._render(state, state.last_latent, state.last_fed))
        return outputs

    def translate(self, state: StreamState, frames: Iterable) -> Iterator[np.ndarray]:
        """Exactly one rendered image per input frame, in input order."""
        final: dict[int, np.ndarray] = {}
        emitted = 0
        last = None

        def take(output: Output) -> None:
            if output.source_index >= emitted:
                final[output.source_index] = output.image

        for frame in frames:
            take(self(state, frame))
            while emitted < state.oldest_in_flight():
                last = final.pop(emitted, last)
                emitted += 1
                yield last
        for output in self.flush(state):
            take(output)
        while emitted < state.frames_in:
            last = final.pop(emitted, last)
            emitted += 1
            yield last

    # -- the steps of a call --------------------------------------------------
    def _render(self, state: StreamState, latent: torch.Tensor, index: int) -> Output:
        if state.config.mode == "stream":
            denoised, source = self._stream_step(state, latent, index)
        else:
            denoised, source = self._latency_steps(state, latent, index), index
        state.last_output = Output(self._decode(denoised), source)
        return state.last_output

    def _stream_step(self, state: StreamState, latent: torch.Tensor, index: int) -> tuple[torch.Tensor, int]:
        steps = state.config.steps
        if state.in_flight is None:  # warm start: every slot from the first frame
            state.in_flight = self._noised(state, latent.expand(steps - 1, -1, -1, -1), slots=range(1, steps))
            state.in_flight_sources = [index - 1] * (steps - 1)  # provisional renders, not yet frame `index`
        x = torch.cat([self._noised(state, latent, slots=[0]), state.in_flight])
        sources = [index] + state.in_flight_sources
        takes = state.bank_takes(sources)
        denoised = self._lcm_step(state, x, slots=list(range(steps)), recording=takes and state.bank.due())
        if takes:
            state.bank.commit()
        state.in_flight = self._noised(state, denoised[:-1], slots=range(1, steps))
        state.in_flight_sources = sources[:-1]
        return denoised[-1:], sources[-1]

    def _latency_steps(self, state: StreamState, latent: torch.Tensor, index: int) -> torch.Tensor:
        takes = state.bank_takes([index])
        recording = takes and state.bank.due()
        x = self._noised(state, latent, slots=[0])
        for slot in range(state.config.steps):
            denoised = self._lcm_step(state, x, slots=[slot], recording=recording)
            if slot + 1 < state.config.steps:
                x = self._noised(state, denoised, slots=[slot + 1])
        if takes:
            state.bank.commit()
        return denoised

    def _lcm_step(self, state: StreamState, x: torch.Tensor, slots: list[int], recording: bool) -> torch.Tensor:
        """One UNet call and the LCM x0 prediction for each slot in the batch."""
        schedule, index = state.schedule, as_index(slots)
        timesteps = schedule["timesteps"][index]
        cfg = self._cfg(state)
        embeds = state.prompt_embeds.expand(len(slots), -1, -1)
        if cfg:
            embeds = torch.cat([state.negative_embeds.expand(len(slots), -1, -1), embeds])
            x_in, t_in = torch.cat([x, x]), torch.cat([timesteps, timesteps])
        else:
            x_in, t_in = x, timesteps
        condition = self._condition(state, x_in.shape[0]) if self.guidance_embedded else None
        view = BankView(state.bank, slots, copies=2 if cfg else 1, recording=recording)
        if self.backend is not None:
            eps = self.backend(x_in, t_in, embeds, condition, view)
        else:
            eps = self.unet(
                x_in, t_in, encoder_hidden_states=embeds, timestep_cond=condition,
                cross_attention_kwargs={"bank": view}, return_dict=False,
            )[0]
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + state.config.guidance_scale * (cond - uncond)
        x0 = predicted_original(x, eps, schedule["sqrt_alpha"][index], schedule["sqrt_beta"][index],
                                self.prediction_type)
        if self.scheduler.config.get("clip_sample", False):
            limit = self.scheduler.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-limit, limit)
        return schedule["c_out"][index] * x0 + schedule["c_skip"][index] * x

    def _condition(self, state: StreamState, batch: int) -> torch.Tensor:
        """The guidance embedding of an LCM-distilled UNet, computed once per scale."""
        scale = state.config.guidance_scale
        if scale is None:  # the model's own default; 0.0 is a choice, not "unset"
            scale = LCM_DISTILLED_GUIDANCE
        key = (scale, self.device, self.dtype)
        if key not in self._conditions:
            condition = guidance_embedding(scale, self.unet.config.time_cond_proj_dim)
            self._conditions[key] = condition.to(self.device, self.dtype)
        return self._conditions[key].expand(batch, -1)

    def _noised(self, state: StreamState, x0: torch.Tensor, slots) -> torch.Tensor:
        """`x0` noised to the level of each slot with that slot's fixed noise."""
        index = as_index(slots)
        return state.schedule["sqrt_alpha"][index] * x0 + state.schedule["sqrt_beta"][index] * state.noise[index]

    # -- helpers ----------------------------------------------------------------
    def _check(self, config: StreamConfig) -> None:
        for side, value in (("width", config.width), ("height", config.height)):
            if value % self.size_multiple:
                raise ValueError(f"{side} must be a multiple of {self.size_multiple} for this model, got {value}")
        lcm_timesteps(config.strength, config.steps, self.scheduler.config.num_train_timesteps)

    def _cfg(self, state: StreamState) -> bool:
        scale = state.config.guidance_scale
        return not self.guidance_embedded and scale is not None and scale > 1.0

    def _schedule(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        """Timesteps and per-slot coefficients, each (steps, 1, 1, 1) but timesteps (steps,)."""
        timesteps = lcm_timesteps(config.strength, config.steps, self.scheduler.config.num_train_timesteps)
        alphas = self.scheduler.alphas_cumprod[timesteps].double()
        scalings = [self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
        column = lambda values: torch.as_tensor(values, dtype=torch.float64).view(-1, 1, 1, 1)  # noqa: E731
        coefficients = {
            "sqrt_alpha": column(alphas.sqrt()),
            "sqrt_beta": column((1 - alphas).sqrt()),
            "c_skip": column([float(skip) for skip, _ in scalings]),
            "c_out": column([float(out) for _, out in scalings]),
        }
        schedule = {name: value.to(self.device, self.dtype) for name, value in coefficients.items()}
        schedule["timesteps"] = torch.tensor(timesteps, device=self.device)
        return schedule

    def _embed_prompt(self, state: StreamState) -> None:
        state.prompt_embeds = self._encode_text(state.config.prompt)
        state.negative_embeds = self._encode_text(state.config.negative_prompt) if self._cfg(state) else None

    @torch.inference_mode()
    def _encode_text(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.device, self.dtype)

    def _encode(self, image: np.ndarray) -> torch.Tensor:
        pixels = torch.tensor(image, device=self.device).permute(2, 0, 1).unsqueeze(0)
        pixels = pixels.to(self.dtype) / 127.5 - 1.0
        return self.vae.encode(pixels).latents * self.vae.config.scaling_factor

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        pixels = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        pixels = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()

