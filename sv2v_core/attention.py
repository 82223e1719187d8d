"""Where the bank plugs into a diffusers UNet, through its public APIs.

- `BankAttnProcessor` replaces every attention processor.  In self-attention
  (attn1) it records the current keys and values and, when the stream's bank
  holds some, attends over [K_t, K_fb] and [V_t, V_fb] (EA, eq. 1).  In
  cross-attention it is plain scaled-dot-product attention.
- A forward hook on every `BasicTransformerBlock` records the block's output
  O_t and then applies feature fusion (FF, eq. 2) to it: the bank keeps the
  output before fusion (paper §4.3), the frame goes on with the fused O'_t.  The tensor fused is the
  block output in token layout (after self-, cross-attention and
  feed-forward, before the Transformer2D `proj_out` and its residual): it is
  the "output of transformer blocks" of the paper, it lines up token by token
  with the keys (so DyMe moves k, v and o together), and fusing it leaves the
  convolutional skip path untouched.  Whether a block fuses is the stream's
  choice (`BankConfig.fusion_blocks`), not the model's.

Which streams' banks a call uses travels with the call, as
`cross_attention_kwargs={"bank": BatchView(...)}` (a `BankView` of one stream
works too); the processors and hooks hold no state, so one patched UNet
serves many streams, even several in one batch.  `BankPatch.remove()`
restores the original processors and removes the hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from .bank import BankView, BatchView
from .fusion import fuse


def layer_name(processor_name: str) -> str:
    """'…transformer_blocks.0.attn1.processor' -> '…transformer_blocks.0'."""
    return processor_name.rsplit(".", 2)[0]


class BankAttnProcessor:
    """Scaled-dot-product attention; self-attention extended with the bank.

    `kernel` computes attention on (batch, heads, tokens, head_dim) tensors
    with the signature of `F.scaled_dot_product_attention` (the default,
    which picks flash / memory-efficient kernels on CUDA); `accel` may swap
    in xformers.  It never changes which keys and values are attended.
    """

    def __init__(self, layer: str, kernel=F.scaled_dot_product_attention) -> None:
        self.layer = layer
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        bank: BankView | BatchView | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        if self_attention:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        banked_keep = None
        if self_attention and bank is not None:
            bank.record(self.layer, "k", key)
            bank.record(self.layer, "v", value)
            banked = bank.extended_keys_values(self.layer)
            if banked is not None:
                key = torch.cat([key, banked.k], dim=1)
                value = torch.cat([value, banked.v], dim=1)
                banked_keep = banked.keep

        batch, queries, _ = query.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            # the banked keys are always attended: pad with "keep" (True, or 0 added to the logits)
            keep = True if attention_mask.dtype == torch.bool else 0.0
            attention_mask = F.pad(attention_mask, (0, key.shape[1] - attention_mask.shape[-1]), value=keep)
        if banked_keep is not None:  # banked tokens not stored yet are never attended
            attention_mask = _mask_absent(attention_mask, banked_keep, key.shape[1])
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self.kernel(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, queries, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _mask_absent(mask: torch.Tensor | None, keep: torch.Tensor, keys: int) -> torch.Tensor:
    """An attention mask over `keys` keys, [current; banked], that hides the
    banked tokens `keep` (B, M) marks absent, combined with `mask`."""
    current = keep.new_ones(keep.shape[0], keys - keep.shape[1])
    visible = torch.cat([current, keep], dim=1)[:, None, None, :]  # (B, 1, 1, keys)
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _fusion_hook(layer: str):
    def hook(module, args, kwargs, output):
        bank = (kwargs.get("cross_attention_kwargs") or {}).get("bank")
        if bank is None:
            return None
        bank.record(layer, "o", output)  # O_t, before fusion: the bank must not feed on its own past
        banked = bank.fusion_inputs(layer)
        if banked is None:
            return None
        return fuse(output, banked.o, banked.alpha, banked.threshold, keep=banked.keep)

    return hook


class BankPatch:
    """Installs the bank processors and fusion hooks on `unet`; undo with `remove`."""

    def __init__(self, unet: torch.nn.Module) -> None:
        if any(isinstance(p, BankAttnProcessor) for p in unet.attn_processors.values()):
            raise ValueError("this UNet already carries the bank's processors (another engine uses it); "
                             "close that engine first or load the model again")
        self.unet = unet
        self._original = unet.attn_processors
        unet.set_attn_processor({name: BankAttnProcessor(layer_name(name)) for name in self._original})
        self._hooks = [
            module.register_forward_hook(_fusion_hook(name), with_kwargs=True)
            for name, module in unet.named_modules()
            if isinstance(module, BasicTransformerBlock)
        ]
        self.layers = [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.unet.set_attn_processor(self._original)
