"""StreamV2V: streaming LCM img2img with a feature bank of past frames.

One `StreamV2V` wraps one loaded model (`Components`) and serves any number
of streams; each stream's state (`StreamState`, made by `new_stream`) is
passed to every call.  A call takes one input frame and returns one `Output`:

    engine = StreamV2V(load_components("tiny"))
    state = engine.new_stream(StreamConfig(prompt="a watercolor", width=256, height=256))
    for frame in frames:
        out = engine(state, frame)
    rest = engine.flush(state)

The method (paper §3–4; docs/method.md has every equation):

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
- ControlNet (optional, `Components.controlnet`): each frame gets a control
  image (`control.control_image`, the stream's `control_image` kind, from the
  frame or from a control source given with it) that travels with it: in
  stream mode slot k is conditioned on frame t−k's own control image, in
  latency mode every step on the frame's.  Before each UNet call the
  ControlNet turns the rows' control images into residuals, scaled per row
  by each stream's `control_scale`, which enter the UNet through its public
  `down_block_additional_residuals` / `mid_block_additional_residual`.  The
  bank is unchanged: EA/FF run in the UNet; the ControlNet's own attention
  has no bank.  Streams with scale 0 never run the ControlNet.
- Backends: `engine.backend` may run the UNet calls instead of the patched
  diffusers UNet: `serving.ServingBackend` (fixed-shape, bucketed calls for
  torch.compile and CUDA graphs; `engine.warm_up(configs)` prepares them;
  docs/serving.md), or `accel`'s and `onnx_export`'s per-bank-shape runners.
- Timing: `engine.stages`, None or a callable stage(name) -> context manager,
  is entered around each stage of a frame (`STAGES`), for profilers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import images
from .attention import BankPatch
from .bank import BankView, BatchView, as_index, commit_banks
from .config import StreamConfig
from .control import control_image
from .stream import Output, StreamState

LCM_ORIGINAL_STEPS = 50
LCM_DISTILLED_GUIDANCE = 8.5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What `StreamV2V.stages` is called with, around each stage of a frame (a UNet
# call of latency mode is one "unet" per step; "bank update" is after each
# frame's UNet calls, for all the streams of a call at once).
STAGES = ("encode", "controlnet", "unet", "bank update", "decode")


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


@dataclass
class Translation:
    """Where a video's translation stands between chunks (`StreamV2V.translate_chunk`): renders
    waiting for their turn by input index, how many images are out, and the last one."""

    waiting: dict[int, np.ndarray] = field(default_factory=dict)
    emitted: int = 0
    last: np.ndarray | None = None


class StreamV2V:
    """The pipeline: explicit components; `render` reads top to bottom."""

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
        self._empty_prompts: dict[tuple, torch.Tensor] = {}
        self.controlnet = components.controlnet
        if self.controlnet is not None:
            factor = 2 ** (len(self.controlnet.config.conditioning_embedding_out_channels) - 1)
            if factor != vae_factor:
                raise ValueError(f"the ControlNet reads control images at 1/{factor} of the latent size's pixels, "
                                 f"the autoencoder makes latents at 1/{vae_factor}: they do not fit together")
        # None: the patched diffusers UNet, eagerly.  `accel` and `serving` may
        # install a callable (x, t, embeds, condition, view, residuals) -> eps
        # with the same results: a compiled or TensorRT UNet with the bank (and
        # the ControlNet's residuals) as explicit inputs.  A backend may also
        # say which streams share a call (`batch_key(state)`), how many at most
        # (`max_streams`), and warm itself up (`warm_up(configs)`).
        self.backend = None
        # A profiler's seam: None, or a callable stage(name) -> context manager
        # entered around each stage of a frame (see `STAGES`).
        self.stages: Callable[[str], ContextManager] | None = None

    # Not `unet.device` / `unet.dtype`: diffusers walks every submodule for hooks on
    # each call (measured 3.5 ms on SD1.5's UNet, several times per frame).
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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
        ControlNet settings apply at once; frames in flight keep the control
        image they were admitted with.
        """
        self._check(config)
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
    def __call__(self, state: StreamState, frame, control=None) -> Output:
        """Render the next input frame of `state`'s stream.  `control`: the
        image to derive its control image from instead of the frame (e.g. a
        canvas's ink layer without its background); needs a ControlNet."""
        return self.render([(state, frame, control)])[0]

    @torch.inference_mode()
    def render(self, jobs: Sequence[tuple]) -> list[Output]:
        """Render the next input frame of several streams: one `Output` per
        (state, frame) or (state, frame, control) job, in order (`control` as
        in `__call__`).  Streams that can share UNet calls (equal `batch_key`)
        are stacked along the batch, each batch row reading and writing only
        its own stream's bank, prompt, noise, timestep, control image and
        control scale, so every stream gets the render it would get alone.

        Every frame is checked (`prepare`) before any stream changes.
        """
        states = [job[0] for job in jobs]
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a stream renders one frame per call; give each stream once")
        prepared = [self.prepare(state, frame) for state, frame, *_ in jobs]
        controls = [self._control_image(job[0], image, job[2] if len(job) > 2 else None)
                    for job, image in zip(jobs, prepared)]
        outputs: list[Output | None] = [None] * len(jobs)
        frames: list[_Frame] = []
        for position, (state, image, control) in enumerate(zip(states, prepared, controls)):
            state.to(self.device)
            admitted = self._admit(state, image, control)
            if isinstance(admitted, Output):
                outputs[position] = admitted
            else:
                admitted.position = position
                frames.append(admitted)
        for group in self._groups(frames):
            for frame, output in zip(group, self._render_group(group)):
                outputs[frame.position] = output
        return outputs

    def prepare(self, state: StreamState, frame) -> np.ndarray:
        """`frame` as the stream's input: RGB uint8 at its size (ImageError if unusable)."""
        return images.resize(images.to_rgb_array(frame), state.config.width, state.config.height)

    def batch_key(self, state: StreamState) -> tuple:
        """Streams whose next frames have equal keys can share UNet calls:
        same size, steps and mode, guidance alike, banks of the same shapes,
        ControlNet on or off (scales and control images are per row).  A
        backend may relax it (`serving.ServingBackend.batch_key`: banks of
        any fill share a call)."""
        backend_key = getattr(self.backend, "batch_key", None)
        if backend_key is not None:
            return backend_key(state)
        config = state.config
        return (config.width, config.height, config.steps, config.mode, self._cfg(state), self.controlled(state),
                state.bank.signature())

    def warm_up(self, configs: Iterable[StreamConfig], **options) -> list:
        """Prepare the backend for streams with these settings before serving
        them (serving graphs: compile and capture every bucket; see
        `ServingBackend.warm_up` for the options).  Nothing to do eagerly."""
        configs = list(configs)
        for config in configs:
            self._check(config)
        warm = getattr(self.backend, "warm_up", None)
        return [] if warm is None else warm(configs, **options)

    def control_scale(self, state: StreamState) -> float:
        """The stream's ControlNet conditioning scale (its own, or 1.0 with a ControlNet, 0 without)."""
        scale = state.config.control_scale
        if scale is None:
            return 0.0 if self.controlnet is None else 1.0
        return scale

    def controlled(self, state: StreamState) -> bool:
        """Whether the stream's UNet calls run the ControlNet."""
        return self.controlled_by(state.config)

    def controlled_by(self, config: StreamConfig) -> bool:
        """Whether a stream with these settings runs the ControlNet."""
        scale = config.control_scale
        return self.controlnet is not None and (scale is None or scale > 0)

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
            outputs += self._render_group([_Frame(state, state.last_fed, latent=state.last_latent,
                                                  control=state.last_control)])
        return outputs

    def translate(self, state: StreamState, frames: Iterable) -> Iterator[np.ndarray]:
        """Exactly one rendered image per input frame, in input order."""
        progress = Translation()
        for frame in frames:
            yield from self.translate_chunk(state, progress, [frame], end=False)
        yield from self.translate_chunk(state, progress, [], end=True)

    def translate_chunk(self, state: StreamState, progress: "Translation", frames: Iterable,
                        end: bool) -> list[np.ndarray]:
        """The images of a translation (`translate`) that these frames complete, in input order;
        `end`: the video ends after them (the rest comes out).  Chunk by chunk, a video gives
        the same images as `translate`, whatever the chunks."""
        images: list[np.ndarray] = []

        def take(output: Output) -> None:
            if output.source_index >= progress.emitted:
                progress.waiting[output.source_index] = output.image

        def emit(upto: int) -> None:
            while progress.emitted < upto:
                progress.last = progress.waiting.pop(progress.emitted, progress.last)
                progress.emitted += 1
                images.append(progress.last)

        for frame in frames:
            take(self(state, frame))
            emit(state.oldest_in_flight())
        if end:
            for output in self.flush(state):
                take(output)
            emit(state.frames_in)
        return images

    # -- the steps of a call --------------------------------------------------
    def _control_image(self, state: StreamState, image: np.ndarray, source) -> torch.Tensor | None:
        """The frame's control image (uint8 (1, 3, H, W) on the device), derived
        from `source` when given, else from the frame; None without a
        ControlNet.  Derived for every frame while a ControlNet is loaded, so
        the frames in flight have theirs when the scale is turned up."""
        if self.controlnet is None:
            if source is not None:
                raise ValueError("a control image was given, but the engine has no ControlNet")
            return None
        if source is not None:
            image = self.prepare(state, source)
        control = control_image(image, state.config.control_image)  # "image" may be the caller's own array:
        return torch.tensor(control, device=self.device).permute(2, 0, 1).unsqueeze(0)  # copied, kept in flight

    def _admit(self, state: StreamState, image: np.ndarray, control: torch.Tensor | None) -> Output | _Frame:
        """Count a new input: re-emit the last render for a near-identical one
        (once caught up), empty the bank at a scene cut."""
        config = state.config
        compares = config.similarity_skip is not None or config.scene_cut is not None
        thumb = images.thumbnail(image) if compares else None
        index = state.frames_in
        if state.last_thumb is not None and thumb is not None:
            similarity = images.similarity(thumb, state.last_thumb)
            if config.similarity_skip is not None and similarity >= config.similarity_skip:
                state.frames_in += 1
                if state.caught_up():  # its render is already out: re-emit it
                    state.last_output = Output(state.last_output.image, index, skipped=True)
                    return state.last_output
                return _Frame(state, state.last_fed, latent=state.last_latent, control=state.last_control)  # a repeat
            if config.scene_cut is not None and similarity < config.scene_cut:
                state.reset_bank()  # this input is the first of the new scene
        state.frames_in += 1
        state.last_thumb = thumb
        state.last_fed = index
        state.last_control = control
        return _Frame(state, index, image=image, control=control)

    def _groups(self, frames: list[_Frame]) -> list[list[_Frame]]:
        """Frames that share UNet calls: equal `batch_key`, at most the backend's `max_streams` per call."""
        groups: dict[tuple, list[_Frame]] = {}
        for frame in frames:
            groups.setdefault(self.batch_key(frame.state), []).append(frame)
        limit = getattr(self.backend, "max_streams", None)
        return [group[start:start + (limit or len(group))] for group in groups.values()
                for start in range(0, len(group), limit or len(group))]

    def _stage(self, name: str) -> ContextManager:
        return contextlib.nullcontext() if self.stages is None else self.stages(name)

    def _render_group(self, group: list[_Frame]) -> list[Output]:
        """Encode, denoise and decode the frames of streams that share UNet calls."""
        new = [frame for frame in group if frame.latent is None]
        if new:
            with self._stage("encode"):
                latents = self._encode(np.stack([frame.image for frame in new]))
            for frame, latent in zip(new, latents.split(1)):
                frame.latent = frame.state.last_latent = latent
        if group[0].state.config.mode == "stream":
            denoised, sources = self._stream_step(group)
        else:
            denoised, sources = self._latency_steps(group), [frame.index for frame in group]
        outputs = []
        with self._stage("decode"):
            decoded = self._decode(denoised)
        for frame, image, source in zip(group, decoded, sources):
            frame.state.last_output = Output(image, source)
            outputs.append(frame.state.last_output)
        return outputs

    def _stream_step(self, group: list[_Frame]) -> tuple[torch.Tensor, list[int]]:
        """One stream-batch UNet call: each stream admits its newest frame at
        slot 0 and emits the oldest from its last slot."""
        steps = group[0].state.config.steps
        states, x, sources, controls = [], [], [], []
        for frame in group:
            state = frame.state
            if state.in_flight is None:  # warm start: every slot from the first frame
                state.in_flight = self._noised(state, frame.latent.expand(steps - 1, -1, -1, -1), range(1, steps))
                state.in_flight_sources = [frame.index - 1] * (steps - 1)  # provisional, not yet frame `index`
                if frame.control is not None:
                    state.in_flight_control = frame.control.expand(steps - 1, -1, -1, -1)
            states.append(state)
            x.append(torch.cat([self._noised(state, frame.latent, [0]), state.in_flight]))
            sources.append([frame.index] + state.in_flight_sources)
            if frame.control is not None:  # slot k: the control image of the frame it holds
                controls.append(torch.cat([frame.control, state.in_flight_control]))
        takes = [state.bank_takes(rows) for state, rows in zip(states, sources)]
        recording = [take and state.bank.due() for state, take in zip(states, takes)]
        control = _stack(controls) if self.controlled(states[0]) else None
        denoised = self._lcm_step(states, _stack(x), list(range(steps)), recording, control)
        with self._stage("bank update"):
            commit_banks([state.bank for state, take in zip(states, takes) if take])
        newest = []
        for index, (state, rows, row_sources) in enumerate(zip(states, denoised.split(steps), sources)):
            state.in_flight = self._noised(state, rows[:-1], range(1, steps))
            state.in_flight_sources = row_sources[:-1]
            if controls:
                state.in_flight_control = controls[index][:-1]
            newest.append(rows[-1:])
        return _stack(newest), [row_sources[-1] for row_sources in sources]

    def _latency_steps(self, group: list[_Frame]) -> torch.Tensor:
        """All denoising steps of each stream's frame, one UNet call per step."""
        states = [frame.state for frame in group]
        takes = [state.bank_takes([frame.index]) for state, frame in zip(states, group)]
        recording = [take and state.bank.due() for state, take in zip(states, takes)]
        x = _stack([self._noised(frame.state, frame.latent, [0]) for frame in group])
        control = _stack([frame.control for frame in group]) if self.controlled(states[0]) else None
        steps = states[0].config.steps
        for slot in range(steps):  # every step sees the frame's own control image
            denoised = self._lcm_step(states, x, [slot], recording, control)
            if slot + 1 < steps:
                x = _stack([self._noised(state, rows, [slot + 1]) for state, rows in zip(states, denoised.split(1))])
        with self._stage("bank update"):
            commit_banks([state.bank for state, take in zip(states, takes) if take])
        return denoised

    def _lcm_step(self, states: list[StreamState], x: torch.Tensor, slots: list[int],
                  recording: list[bool], control: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call over the streams' rows (each stream: one row per slot)
        and the LCM x0 prediction for each row.  `control`: each row's control
        image (uint8), for streams conditioned by the ControlNet."""
        index, rows = as_index(slots), len(slots)
        per_row = lambda name: _stack([state.schedule[name][index] for state in states])  # noqa: E731
        timesteps = per_row("timesteps")
        embeds = _stack([state.prompt_embeds.expand(rows, -1, -1) for state in states])
        cfg = self._cfg(states[0])
        if cfg:
            negative = _stack([state.negative_embeds.expand(rows, -1, -1) for state in states])
            embeds, x_in, t_in = torch.cat([negative, embeds]), torch.cat([x, x]), torch.cat([timesteps, timesteps])
        else:
            x_in, t_in = x, timesteps
        condition = _stack([self._condition(state, rows) for state in states]) if self.guidance_embedded else None
        view = BatchView([BankView(state.bank, slots, record) for state, record in zip(states, recording)],
                         copies=2 if cfg else 1)
        residuals = None
        if control is not None:
            scales = [self.control_scale(state) for state in states]
            with self._stage("controlnet"):
                residuals = self.control_residuals(x_in, t_in, embeds, control, scales, rows,
                                                   copies=2 if cfg else 1)
        with self._stage("unet"):
            if self.backend is not None:
                eps = self.backend(x_in, t_in, embeds, condition, view, residuals)
            else:
                down, mid = residuals if residuals is not None else (None, None)
                eps = self.unet(
                    x_in, t_in, encoder_hidden_states=embeds, timestep_cond=condition,
                    cross_attention_kwargs={"bank": view}, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False,
                )[0]
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = _stack([u + state.config.guidance_scale * (c - u)
                          for state, u, c in zip(states, uncond.split(rows), cond.split(rows))])
        x0 = predicted_original(x, eps, per_row("sqrt_alpha"), per_row("sqrt_beta"), self.prediction_type)
        if self.scheduler.config.get("clip_sample", False):
            limit = self.scheduler.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-limit, limit)
        return per_row("c_out") * x0 + per_row("c_skip") * x

    def control_residuals(self, x: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                          control: torch.Tensor, scales: list[float], rows: int,
                          copies: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNet's residuals for a UNet call: (down, mid), each row
        multiplied by its stream's scale (stream i owns `rows` rows, the batch
        is `copies` repeats of them, as under classifier-free guidance).

        control: uint8 (rows · streams, 3, H, W) control images, white on black.
        The ControlNet runs without the bank and without the guidance
        embedding (diffusers' ControlNet pipelines pass it neither)."""
        image = control.to(self.dtype) / 255
        if self.controlnet.config.conditioning_channels == 1:
            image = image.mean(dim=1, keepdim=True)
        scale = torch.tensor(scales, device=self.device, dtype=self.dtype).repeat_interleave(rows).view(-1, 1, 1, 1)
        if copies > 1:
            image, scale = image.repeat(copies, 1, 1, 1), scale.repeat(copies, 1, 1, 1)
        down, mid = self.controlnet(x, timesteps, encoder_hidden_states=embeds, controlnet_cond=image,
                                    conditioning_scale=1.0, return_dict=False)
        return [residual * scale for residual in down], mid * scale

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
        if config.control_scale and self.controlnet is None:
            raise ValueError(f"control scale {config.control_scale} needs a ControlNet and this engine has none: load "
                             "one (load_components(..., controlnet=...), --controlnet) or leave the scale unset")
        lcm_timesteps(config.strength, config.steps, self.scheduler.config.num_train_timesteps)

    def _cfg(self, state: StreamState) -> bool:
        return self.cfg_of(state.config)

    def cfg_of(self, config: StreamConfig) -> bool:
        """Whether streams with these settings run classifier-free guidance (the batch doubles)."""
        scale = config.guidance_scale
        return not self.guidance_embedded and scale is not None and scale > 1.0

    def empty_prompt(self) -> torch.Tensor:
        """The embedding of the empty prompt (1, tokens, channels), computed once."""
        key = (self.device, self.dtype)
        if key not in self._empty_prompts:
            self._empty_prompts[key] = self._encode_text("")
        return self._empty_prompts[key]

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

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        """Latents of uint8 frames (k, H, W, 3) -> (k, 4, H/8, W/8)."""
        pixels = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2)
        pixels = pixels.to(self.dtype) / 127.5 - 1.0
        return self.vae.encode(pixels).latents * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames (k, H, W, 3) of latents (k, 4, h, w)."""
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@dataclass
class _Frame:
    """One stream's frame on its way through `StreamV2V.render`."""

    state: StreamState
    index: int                          # the input it renders (a repeat: the newest one again)
    image: np.ndarray | None = None     # to encode; None for a repeat, which reuses `latent`
    latent: torch.Tensor | None = None
    control: torch.Tensor | None = None  # its control image (with a ControlNet), uint8 (1, 3, H, W)
    position: int = 0                   # its job's place in the call


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
