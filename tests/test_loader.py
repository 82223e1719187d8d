"""The one engine loader (sv2v_core.loader): the default-model rule, dtypes, fallback, ControlNet, --lora."""

from __future__ import annotations

import pytest
import torch

from sv2v_core.loader import (
    DEFAULT_MODEL, EngineOptions, choose_model, load, load_engine, resolve_device, resolve_dtype,
)
from sv2v_core.models import ControlNetLoadError, ModelLoadError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_default_model_is_real_weights_on_a_gpu_and_the_builtin_one_without():
    assert choose_model(None, cuda=True).model == DEFAULT_MODEL
    assert choose_model(None, cuda=False).model == "tiny"
    assert "CUDA" in choose_model(None, cuda=False).why
    assert choose_model(" sd15-random ", cuda=False).model == "sd15-random"  # a named model is kept


def test_auto_dtype_is_half_on_cuda_except_for_the_builtin_tiny():
    assert resolve_dtype("auto", CUDA, "sd15-random") == torch.float16
    assert resolve_dtype("auto", CUDA, "tiny") == torch.float32
    assert resolve_dtype("auto", CPU, "sd15-random") == torch.float32
    assert resolve_dtype("bfloat16", CPU, "tiny") == torch.bfloat16
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_the_builtin_model_loads_with_its_controlnet_attached():
    loaded = load_engine(EngineOptions(model="tiny", controlnet="tiny", device="cpu"))
    try:
        assert loaded.engine.components.name == "tiny" and loaded.fell_back is None
        assert loaded.engine.controlnet is not None and loaded.components.controlnet_name == "tiny"
        assert loaded.fast_path is None  # serving was not asked for (and does nothing on a CPU)
    finally:
        loaded.engine.close()


def test_a_model_that_cannot_load_falls_back_only_when_asked():
    with pytest.raises(ModelLoadError, match="nonexistent"):
        load(EngineOptions(model="/nonexistent/model", device="cpu"))
    loaded = load(EngineOptions(model="/nonexistent/model", device="cpu", fallback=True))
    assert loaded.components.name == "tiny" and "could not load /nonexistent/model" in loaded.fell_back
    # What is for real weights is left out for a built-in model when it must start anyway.
    assert load(EngineOptions(model="tiny", vae="madebyollin/taesd", device="cpu", fallback=True)).components.builtin
    with pytest.raises(ModelLoadError, match="own autoencoder"):
        load(EngineOptions(model="tiny", vae="madebyollin/taesd", device="cpu"))


def test_a_controlnet_that_cannot_load_never_falls_back():
    with pytest.raises(ControlNetLoadError, match="could not load ControlNet"):
        load(EngineOptions(model="tiny", controlnet="/nowhere/scribble.safetensors", device="cpu", fallback=True))
    with pytest.raises(ControlNetLoadError):
        load(EngineOptions(model="/nonexistent/model", controlnet="/nowhere/scribble.safetensors", device="cpu",
                           fallback=True))


def test_the_app_takes_a_lora_as_the_cli_does():
    from app import parse_args

    assert parse_args(["--lora", "latent-consistency/lcm-lora-sdv1-5"]).lora == "latent-consistency/lcm-lora-sdv1-5"
    assert parse_args([]).lora is None
