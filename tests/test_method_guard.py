"""Three holes in the method's guard, closed (paper §3, §4.2, §4.3):

- latency mode's whole step sequence against LCM multistep sampling computed
  by hand from the noise schedule's definition: the timesteps, the level each
  step's x0 prediction is re-noised to, and the final render;
- feature fusion changes the outputs of the configured fusion blocks and of
  no other block (eager engine and serving graphs);
- DyMe draws a fresh random split at every merge.
"""

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from sv2v_core import BankConfig, StreamConfig
from sv2v_core import bank as bank_module
from sv2v_core.bank import FeatureBank
from sv2v_core.serving import ServingBackend
from tests.test_method import sketch

SIZE = 64


def config(**changes) -> StreamConfig:
    defaults = dict(prompt="a watercolor painting", width=SIZE, height=SIZE, similarity_skip=None, scene_cut=None)
    return StreamConfig(**{**defaults, **changes})


# ---------------------------------------------------------------- latency mode, by hand


def alphas_cumprod_by_hand() -> torch.Tensor:
    """SD1.5's "scaled_linear" schedule: β_t = (√0.00085 + t/999·(√0.012 − √0.00085))², ᾱ_t = Π(1 − β)."""
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    betas = torch.tensor([(start + t / 999 * (end - start)) ** 2 for t in range(1000)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def boundary_by_hand(t: int) -> tuple[float, float]:
    """LCM's consistency boundary scalings (σ_data = 0.5, timestep scaling 10): (c_skip, c_out)."""
    scaled = 10.0 * t
    return 0.25 / (scaled ** 2 + 0.25), scaled / math.sqrt(scaled ** 2 + 0.25)


@pytest.mark.parametrize("steps, strength, timesteps", [(2, 0.4, [399, 199]), (4, 0.4, [399, 299, 199, 99]),
                                                         (2, 0.5, [499, 259])])
@torch.inference_mode()
def test_latency_mode_steps_are_lcm_multistep_sampling_by_hand(engine, steps, strength, timesteps):
    """Each of a frame's n UNet calls gets the latent noised to its own step's
    level: x_0 = √ᾱ_0·z + √(1−ᾱ_0)·n_0, then x_{k+1} = √ᾱ_{k+1}·denoised_k +
    √(1−ᾱ_{k+1})·n_{k+1} with the stream's fixed noise of slot k+1, where
    denoised_k = c_out·(x_k − √(1−ᾱ_k)·ε_k)/√ᾱ_k + c_skip·x_k."""
    state = engine.new_stream(config(mode="latency", steps=steps, strength=strength, seed=11,
                                     bank=BankConfig(mode="none")))
    calls = []

    def backend(sample, timestep, embeds, condition, view, residuals=None):
        eps = torch.randn(sample.shape, generator=torch.Generator().manual_seed(100 + len(calls)))
        calls.append((sample.clone(), timestep.tolist(), eps))
        return eps

    engine.backend = backend
    try:
        output = engine(state, sketch(3))
    finally:
        engine.backend = None
    alphas = alphas_cumprod_by_hand()
    noise = torch.randn((steps, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))
    latent = engine._encode(sketch(3)[None]).double()
    assert [t for _, t, _ in calls] == [[t] for t in timesteps]
    x = alphas[timesteps[0]].sqrt() * latent + (1 - alphas[timesteps[0]]).sqrt() * noise[0]
    for k, (t, (sample, _, eps)) in enumerate(zip(timesteps, calls)):
        torch.testing.assert_close(sample.double(), x, rtol=1e-5, atol=1e-5)  # fed at step k's own level
        c_skip, c_out = boundary_by_hand(t)
        denoised = c_out * (x - (1 - alphas[t]).sqrt() * eps.double()) / alphas[t].sqrt() + c_skip * x
        if k + 1 < steps:
            following = timesteps[k + 1]
            x = alphas[following].sqrt() * denoised + (1 - alphas[following]).sqrt() * noise[k + 1]
    assert np.array_equal(output.image, engine._decode(denoised.float())[0])


# ---------------------------------------------------------------- fusion only where configured


def _block_outputs(engine, state, frames) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each transformer block, its output before the fusion hook and what
    it hands on, in the UNet calls of the last frame."""
    seen = {}
    handles = []
    for name, module in engine.unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, [out.clone()]), prepend=True))
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen[name].append(out.clone())))
    try:
        for frame in frames[:-1]:
            engine(state, frame)
        seen.clear()
        engine(state, frames[-1])
    finally:
        for handle in handles:
            handle.remove()
    return {name: tuple(pair) for name, pair in seen.items()}


@pytest.mark.parametrize("blocks", [("mid_block", "up_blocks.0", "up_blocks.1"), ("mid_block",), ("up_blocks.2",)],
                         ids=["default", "mid", "high-res"])
@pytest.mark.parametrize("served", [False, True], ids=["eager", "served"])
def test_fusion_changes_the_configured_blocks_and_no_other(engine, blocks, served):
    # EA off, threshold −1 (every token fuses), a bank read from the second frame on
    bank = BankConfig(merge_every=1, extended_attention=False, fusion_threshold=-1.0, fusion_blocks=blocks)
    state = engine.new_stream(config(mode="latency", steps=2, bank=bank))
    engine.backend = ServingBackend(engine, buckets=(1,)) if served else None
    try:
        outputs = _block_outputs(engine, state, [sketch(0), sketch(2)])
    finally:
        engine.backend = None
    assert set(outputs) == set(engine.patch.layers)
    fused = {layer for layer, (before, after) in outputs.items() if not torch.equal(before, after)}
    # the blocks' layers by name: "mid_block.…" or e.g. "up_blocks.1.…"
    assert fused == {layer for layer in engine.patch.layers if any(layer.startswith(b + ".") for b in blocks)}
    assert fused  # each configuration fuses somewhere


# ---------------------------------------------------------------- DyMe: a fresh split at every merge


def test_every_dyme_merge_draws_a_fresh_split(monkeypatch):
    orders = []
    match = bank_module.bipartite_match
    monkeypatch.setattr(bank_module, "bipartite_match", lambda metric, order: (orders.append(order.clone()),
                                                                               match(metric, order))[1])
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=4)
    layer = "mid_block.attentions.0.transformer_blocks.0"
    keys = torch.randn(2, 32, 8)
    for _ in range(5):  # the same frame every time: only the split can differ
        bank.record(layer, "k", keys)
        bank.record(layer, "v", keys)
        bank.commit()
    assert bank.merges == len(orders) == 4
    for order in orders:  # each is a permutation of the 2N tokens, per slot
        assert torch.equal(order.sort(dim=1).values, torch.arange(64).expand(2, -1))
    for a in range(len(orders)):
        for b in range(a + 1, len(orders)):
            assert not torch.equal(orders[a][:, :32].sort().values, orders[b][:, :32].sort().values), (a, b)
    assert not torch.equal(orders[0][0, :32].sort().values, orders[0][1, :32].sort().values)  # per slot too


def test_the_engine_draws_a_fresh_split_at_every_merge(engine, monkeypatch):
    orders = []
    match = bank_module.bipartite_match
    monkeypatch.setattr(bank_module, "bipartite_match", lambda metric, order: (orders.append(order.clone()),
                                                                               match(metric, order))[1])
    state = engine.new_stream(config(mode="latency", steps=2, bank=BankConfig(merge_every=1)))
    for step in range(4):
        engine(state, sketch(0))  # a still canvas: the same features at every merge
    srcs = [order[:, :order.shape[1] // 2].sort().values for order in orders]
    assert state.bank.merges == 3 and len(srcs) >= 3
    per_merge = len(srcs) // 3  # one batched match per group of equal shapes
    for group in range(per_merge):
        first, second, third = srcs[group], srcs[group + per_merge], srcs[group + 2 * per_merge]
        assert not torch.equal(first, second) and not torch.equal(second, third)
