"""Loading the model components: the built-in ones or real weights.

`load_components(model)` accepts
- "tiny": the built-in offline model (see tiny.py; its pictures are not art);
- "sd15-random": SD1.5's full-size architecture with seeded random weights,
  for speed and memory measurements only;
- a Hugging Face id ("SimianLuo/LCM_Dreamshaper_v7", or an SD1.5 model with
  lora="latent-consistency/lcm-lora-sdv1-5"), a local diffusers folder, or a
  single-file `.safetensors` checkpoint.  The autoencoder of a real model is
  TAESD ("madebyollin/taesd" unless `vae` names another).

`controlnet` adds an optional `ControlNetModel` of the SD1.5 family (e.g. a
scribble or line-art one), shared by every stream of the engine: "tiny" (the
built-in one, for the built-in model only), a Hugging Face id, a diffusers
folder or a single `.safetensors` file.  A single file is read offline: its
configuration is derived from the loaded UNet (`ControlNetModel.from_unet`)
and the file's conditioning embedding, so no hub is needed.  A ControlNet
whose blocks do not match the UNet's is refused.

Only `.safetensors` weights are loaded.  Every failure raises
`ModelLoadError` with one message naming what was tried and how to fix it.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler, UNet2DConditionModel
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from . import tiny

BUILTIN_MODELS = ("tiny", "sd15-random")
BUILTIN_CONTROLNETS = ("tiny",)
DEFAULT_VAE = "madebyollin/taesd"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FIX_HINT = "or use --model tiny (built in, offline)"
CONTROLNET_HINT = "or use --controlnet tiny with --model tiny (built in, offline)"
# The UNet settings a ControlNet's residuals depend on: it must share them to add into the UNet's skips.
CONTROLNET_FIT = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "transformer_layers_per_block")

# What the loaders raise for a missing, unreachable, corrupt or wrong file.
# (Hub errors are OSError subclasses, HFValidationError a ValueError.)
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError, EntryNotFoundError)

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

# CLIP ViT-L/14's text tower, as used by SD1.5.
SD15_TEXT_CONFIG = dict(
    tiny.TEXT_CONFIG, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
)
SD15_RANDOM_SEED = 1515


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried and how to fix it."""


class ControlNetLoadError(ModelLoadError):
    """The ControlNet given to `load_components` could not be loaded (or does not fit its model)."""


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderTiny  # encode(x in [-1, 1]).latents ; decode(z).sample in [-1, 1]
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler
    name: str
    builtin: bool
    controlnet: ControlNetModel | None = None  # optional, shared by all streams (see load_controlnet)
    controlnet_name: str | None = None

    def modules(self) -> tuple[torch.nn.Module, ...]:
        extra = (self.controlnet,) if self.controlnet is not None else ()
        return (self.unet, self.vae, self.text_encoder, *extra)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Components":
        for module in self.modules():
            # plain nn.Module.to: diffusers' override only adds a warning for these classes
            torch.nn.Module.to(module, device=device, dtype=dtype)
        return self


def load_components(
    model: str = "tiny",
    *,
    vae: str | None = None,
    lora: str | None = None,
    controlnet: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Load a model's UNet, TAESD autoencoder, text encoder, tokenizer and LCM
    scheduler, and the ControlNet `controlnet` names (None: none)."""
    model, vae, lora, controlnet = (os.fspath(x) if isinstance(x, os.PathLike) else x
                                    for x in (model, vae, lora, controlnet))
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"no model given ({model!r}): name one of {', '.join(BUILTIN_MODELS)}, "
                             "a Hugging Face id, a diffusers folder or a .safetensors file")
    model = model.strip()
    if model in BUILTIN_MODELS:
        if vae or lora:
            raise ModelLoadError(f"the built-in model {model!r} has its own autoencoder and takes no LoRA: "
                                 "pass --vae / --lora only with real weights")
        components = load_tiny() if model == "tiny" else build_sd15_random()
    else:
        components = load_pretrained(model, vae or DEFAULT_VAE, lora)
    if controlnet is not None:
        try:
            components.controlnet = load_controlnet(controlnet, components.unet, model)
        except ModelLoadError as err:  # the model loaded: say that its ControlNet is what failed
            raise ControlNetLoadError(str(err)) from err
        components.controlnet_name = controlnet.strip()
    for module in components.modules():
        module.eval().requires_grad_(False)
    try:
        return components.to(device, dtype)
    except (RuntimeError, TypeError) as err:  # e.g. no such device, CUDA not available
        raise ModelLoadError(f"loaded {model!r} but could not move it to {device} / {dtype}: {err}") from err


# ----------------------------------------------------------------------------- built-in models

def load_tiny() -> Components:
    unet, vae = tiny.make_unet(), tiny.make_vae()
    try:
        tiny.load_weights(unet, vae)
    except (OSError, SafetensorError, RuntimeError) as err:
        raise ModelLoadError(f"the built-in tiny model's weights ({tiny.WEIGHTS_FILE}) are missing or damaged: "
                             f"{_first_line(err)}. Reinstall the package or run tools/fit_tiny_model.py") from err
    return Components(unet=unet, vae=vae, text_encoder=tiny.make_text_encoder(), tokenizer=tiny.load_tokenizer(),
                      scheduler=tiny.make_scheduler(), name="tiny", builtin=True)


def build_sd15_random() -> Components:
    """SD1.5-sized modules with seeded random weights (built on the meta device, then filled)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = tiny.seeded_init_(unet.to_empty(device="cpu"), SD15_RANDOM_SEED)
    vae = tiny.seeded_init_(AutoencoderTiny(), SD15_RANDOM_SEED + 1)  # TAESD's own (default) config
    text_encoder = tiny.make_text_encoder(SD15_TEXT_CONFIG, SD15_RANDOM_SEED + 2)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny.load_tokenizer(),
                      scheduler=tiny.make_scheduler(), name="sd15-random", builtin=True)


# ----------------------------------------------------------------------------- real weights

def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_pretrained(model: str, vae: str, lora: str | None) -> Components:
    kind = _classify(model, "model")
    try:
        if kind == "file":
            unet, text_encoder, tokenizer, scheduler_config = _from_single_file(model)
        else:
            unet, text_encoder, tokenizer, scheduler_config = _from_diffusers_layout(model)
        scheduler = LCMScheduler.from_config(scheduler_config)
    except LOAD_ERRORS as err:
        raise ModelLoadError(_explain("model", model, kind, err)) from err

    vae_kind = _classify(vae, "autoencoder")
    if vae_kind == "file":
        raise ModelLoadError(f"could not load autoencoder {vae!r}: TAESD is loaded from a folder or a "
                             f"Hugging Face id (e.g. {DEFAULT_VAE}), not a single file")
    try:
        autoencoder = AutoencoderTiny.from_pretrained(vae, use_safetensors=True, local_files_only=hub_offline())
    except LOAD_ERRORS as err:
        raise ModelLoadError(_explain("autoencoder", vae, vae_kind, err)) from err

    if lora:
        fuse_lora(unet, text_encoder, tokenizer, lora)
    return Components(unet=unet, vae=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=scheduler, name=model, builtin=False)


def _from_diffusers_layout(model: str):
    """Component-wise from a diffusers folder or hub repo (skips the KL VAE and the safety checker)."""
    common = dict(local_files_only=hub_offline())
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", use_safetensors=True, **common)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", use_safetensors=True, **common)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **common)
    scheduler_config = LCMScheduler.load_config(model, subfolder="scheduler", **common)
    return unet, text_encoder, tokenizer, scheduler_config


def _from_single_file(path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        path, local_files_only=hub_offline(), safety_checker=None, requires_safety_checker=False)
    return pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config


def fuse_lora(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, lora: str) -> None:
    """Load a LoRA (e.g. LCM-LoRA) into the UNet/text encoder and fuse it into their weights."""
    from diffusers import StableDiffusionPipeline

    kind = _classify(lora, "LoRA")
    try:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        if kind == "file":
            from safetensors.torch import load_file

            pipe.load_lora_weights(load_file(lora))
        else:
            pipe.load_lora_weights(lora, use_safetensors=True, local_files_only=hub_offline())
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    except ImportError as err:
        raise ModelLoadError(f"could not load LoRA {lora!r}: {_first_line(err)}. Install peft (pip install peft)") from err
    except LOAD_ERRORS as err:
        raise ModelLoadError(_explain("LoRA", lora, kind, err)) from err


# ----------------------------------------------------------------------------- ControlNet

def load_controlnet(name: str, unet: UNet2DConditionModel, model: str = "the model") -> ControlNetModel:
    """The ControlNet `name` ("tiny", a Hugging Face id, a diffusers folder or a
    single .safetensors file), checked to fit `unet` (of `model`)."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"no ControlNet given ({name!r}): name {', '.join(BUILTIN_CONTROLNETS)}, a Hugging Face "
                             "id, a diffusers folder or a .safetensors file")
    name = name.strip()
    if name in BUILTIN_CONTROLNETS:
        if _differences(unet.config, tiny.UNET_CONFIG, keys=tiny.UNET_CONFIG):
            raise ModelLoadError(f"the built-in ControlNet {name!r} fits only the built-in model 'tiny', not "
                                 f"{model!r}: pass an SD1.5 ControlNet (e.g. lllyasviel/control_v11p_sd15_scribble)")
        controlnet = tiny.make_controlnet(unet)
        try:
            tiny.load_controlnet_weights(controlnet)
        except (OSError, SafetensorError, RuntimeError) as err:
            raise ModelLoadError(f"the built-in tiny ControlNet's weights ({tiny.CONTROLNET_FILE}) are missing or "
                                 f"damaged: {_first_line(err)}. Reinstall the package or run "
                                 "tools/fit_tiny_controlnet.py") from err
        return controlnet
    kind = _classify(name, "ControlNet", CONTROLNET_HINT)
    try:
        if kind == "file":
            controlnet = _controlnet_from_single_file(name, unet)
        else:
            controlnet = ControlNetModel.from_pretrained(name, use_safetensors=True, local_files_only=hub_offline())
    except (*LOAD_ERRORS, AttributeError) as err:  # diffusers' key conversion meets a tensor it lacks
        raise ModelLoadError(_explain("ControlNet", name, kind, err, CONTROLNET_HINT)) from err
    if not isinstance(controlnet, ControlNetModel):  # e.g. a multi-ControlNet folder
        raise ModelLoadError(f"could not load ControlNet {name!r}: it is a {type(controlnet).__name__}, not an SD1.5 "
                             f"ControlNetModel; {CONTROLNET_HINT}")
    if any(p.is_meta for p in controlnet.parameters()):
        raise ModelLoadError(f"could not load ControlNet '{name}': the file lacks some of the ControlNet's weights "
                             f"(is it a ControlNet checkpoint?); {CONTROLNET_HINT}")
    mismatch = ", ".join(_differences(controlnet.config, unet.config))
    if mismatch:
        raise ModelLoadError(f"ControlNet '{name}' does not fit model {model!r} (ControlNet vs UNet: {mismatch}): "
                             f"use a ControlNet made for that model's family (SD1.5), {CONTROLNET_HINT}")
    if controlnet.config.conditioning_channels not in (1, 3):
        raise ModelLoadError(f"ControlNet '{name}' takes {controlnet.config.conditioning_channels}-channel control "
                             "images; only 1- or 3-channel (image-like) control is supported")
    return controlnet


def _differences(config, other, keys=CONTROLNET_FIT) -> list[str]:
    """Where two configurations differ among `keys` ("key a vs b"; lists and tuples alike)."""
    normal = lambda value: list(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    return [f"{key} {normal(config.get(key))} vs {normal(other.get(key))}"
            for key in keys if normal(config.get(key)) != normal(other.get(key))]


def _controlnet_from_single_file(path: str, unet: UNet2DConditionModel) -> ControlNetModel:
    """Read a single-file ControlNet (original or diffusers layout) with a
    configuration derived from `unet` and the file's own conditioning
    embedding, so no configuration is fetched from the hub."""
    embedding = _conditioning_embedding(path)
    if embedding is None:
        raise ModelLoadError(f"could not load ControlNet '{path}': the file holds no ControlNet (no conditioning "
                             "embedding: controlnet_cond_embedding.* or input_hint_block.* weights); "
                             + CONTROLNET_HINT)
    channels, conditioning_channels = embedding
    with torch.device("meta"):  # only its configuration is kept
        derived = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                            conditioning_channels=conditioning_channels, load_weights_from_unet=False)
    with tempfile.TemporaryDirectory() as config_dir:
        derived.save_config(config_dir)
        return ControlNetModel.from_single_file(path, config=config_dir, local_files_only=True)


def _conditioning_embedding(path: str) -> tuple[tuple[int, ...], int] | None:
    """(conditioning_embedding_out_channels, conditioning_channels) of a ControlNet
    file, read from the shapes of its conditioning-embedding convolutions:
    diffusers' controlnet_cond_embedding.{conv_in, blocks.i} or the original
    input_hint_block.i (each level: a conv keeping the width, then one
    widening it with stride 2; the last, zero conv, excluded).  None when the
    file has no such convolutions (it is no ControlNet)."""
    convs: list[tuple[tuple[str, int], tuple[int, ...]]] = []
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            diffusers = re.fullmatch(r"controlnet_cond_embedding\.(conv_in|blocks\.(\d+))\.weight", key)
            original = re.fullmatch(r"(?:control_model\.)?input_hint_block\.(\d+)\.weight", key)
            if diffusers:
                order = -1 if diffusers.group(1) == "conv_in" else int(diffusers.group(2))
                convs.append((("d", order), tuple(handle.get_slice(key).get_shape())))
            elif original:
                convs.append((("o", int(original.group(1))), tuple(handle.get_slice(key).get_shape())))
    convs.sort()
    if convs and convs[0][0][0] == "o":
        convs = convs[:-1]  # the original layout's last conv is the zero conv into the UNet's width
    shapes = [shape for _, shape in convs if len(shape) == 4]
    if not shapes:
        return None
    return tuple(shape[0] for shape in shapes[::2]), shapes[0][1]


# ----------------------------------------------------------------------------- classifying and explaining

def _classify(name: str, what: str, hint: str = FIX_HINT) -> str:
    """'file' (a checked .safetensors file), 'folder' or 'hub'; raises ModelLoadError for anything else."""
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"refusing to load {what} {name!r}: {path.suffix} files are Python pickles that can run code when "
            "loaded; only .safetensors weights are accepted. Use a .safetensors version of it, " + hint)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"could not load {what} {name!r}: not a .safetensors file. Pass a .safetensors "
                                 f"checkpoint, a diffusers folder or a Hugging Face id, {hint}")
        _check_safetensors(path, what)
        return "file"
    if path.is_dir():
        if what == "model" and not ((path / "model_index.json").is_file() or (path / "unet").is_dir()):
            raise ModelLoadError(f"could not load {what} {name!r}: the folder is not a diffusers model (no "
                                 f"model_index.json, no unet/ subfolder). Pass a diffusers folder, a .safetensors "
                                 f"checkpoint or a Hugging Face id, {hint}")
        if what == "ControlNet" and not (path / "config.json").is_file():
            raise ModelLoadError(f"could not load {what} {name!r}: the folder is not a diffusers ControlNet (no "
                                 f"config.json). Pass a diffusers ControlNet folder, a .safetensors file or a Hugging "
                                 f"Face id, {hint}")
        return "folder"
    if HUB_ID.match(name) and not name.startswith((".", "~")):
        return "hub"
    if os.sep in name or name.startswith((".", "~")) or path.suffix:
        raise ModelLoadError(f"could not load {what} {name!r}: no such file or folder. Check the path, "
                             f"or pass a Hugging Face id (owner/name), {hint}")
    kind, builtin = ("ControlNet", BUILTIN_CONTROLNETS) if what == "ControlNet" else ("model", BUILTIN_MODELS)
    raise ModelLoadError(f"could not load {what} {name!r}: it is not a built-in {kind} ({', '.join(builtin)}), "
                         "an existing file or folder, nor a Hugging Face id like owner/name")


def _check_safetensors(path: Path, what: str) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise ModelLoadError(f"could not load {what} '{path}': the .safetensors file holds no tensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {what} '{path}': not a valid .safetensors file (corrupt, truncated or "
                             f"another kind of file renamed): {_first_line(err)}") from err


def _explain(what: str, name: str, kind: str, err: BaseException, hint: str = FIX_HINT) -> str:
    detail = _first_line(err)
    if kind == "hub":
        if hub_offline():
            reason = ("there is no local folder of that name, it is not in the local Hugging Face cache and "
                      "the hub is unreachable (offline: HF_HUB_OFFLINE=1)")
        elif isinstance(err, RepositoryNotFoundError):
            reason = "the Hugging Face hub has no such repository (or it is private/gated: huggingface-cli login)"
        else:
            reason = f"it is not in the local Hugging Face cache and the hub could not serve it ({detail})"
        return (f"could not load {what} {name!r}: {reason}. Download it first (huggingface-cli download {name}) "
                f"or pass a local folder / .safetensors file, {hint}")
    if what == "ControlNet":
        if kind == "file":
            return (f"could not load {what} '{name}' as a single-file SD1.5 ControlNet (original or diffusers "
                    f"layout) for this model: {detail}. Pass a diffusers ControlNet folder instead, {hint}")
        return (f"could not load {what} '{name}' from its folder: {detail}. A diffusers ControlNet folder holds "
                f"config.json and diffusion_pytorch_model.safetensors; {hint}")
    if kind == "file":
        if hub_offline() and isinstance(err, OSError):
            reason = ("diffusers reads the configuration of a single-file checkpoint from the Hugging Face cache, "
                      "it is not there and the hub is unreachable (offline: HF_HUB_OFFLINE=1)")
        else:
            reason = detail
        return (f"could not load {what} '{name}' as a single-file Stable Diffusion 1.5 checkpoint: {reason}. "
                f"Pass a diffusers folder instead, {hint}")
    return (f"could not load {what} '{name}' from its folder: {detail}. A diffusers model folder needs unet/, "
            f"text_encoder/, tokenizer/ and scheduler/ subfolders with .safetensors weights; {hint}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].rstrip('.')}" if text else type(err).__name__
