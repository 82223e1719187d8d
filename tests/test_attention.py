"""Extended self-attention (eq. 1) and feature fusion (eq. 2) in isolation."""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sv2v_core.attention import BankAttnProcessor
from sv2v_core.bank import BankView, FeatureBank
from sv2v_core.config import BankConfig
from sv2v_core.fusion import fuse

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0"


def _attention():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8).eval()


def _bank_with(k, v, **config):
    bank = FeatureBank(BankConfig(**config), torch.Generator())
    bank.layers[LAYER] = {"k": k, "v": v}
    return bank


@torch.no_grad()
def test_extended_attention_over_the_current_frame_equals_self_attention():
    attn, x = _attention(), torch.randn(2, 24, 32)
    plain = AttnProcessor2_0()(attn, x)
    bank = _bank_with(attn.to_k(x), attn.to_v(x))
    extended = BankAttnProcessor(LAYER)(attn, x, bank=BankView(bank, slots=[0, 1]))
    torch.testing.assert_close(extended, plain, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_extended_attention_reads_past_frames_and_records_the_current_one():
    attn, x, past = _attention(), torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    plain = AttnProcessor2_0()(attn, x)
    bank = _bank_with(attn.to_k(past), attn.to_v(past), mode="queue")
    extended = BankAttnProcessor(LAYER)(attn, x, bank=BankView(bank, slots=[0, 1]))
    assert (extended - plain).abs().max() > 1e-3
    bank.commit()  # a queue of one frame now holds exactly the current frame
    torch.testing.assert_close(bank.layers[LAYER]["k"], attn.to_k(x))
    torch.testing.assert_close(bank.layers[LAYER]["v"], attn.to_v(x))
    # with EA off the bank is ignored
    off = _bank_with(attn.to_k(past), attn.to_v(past), extended_attention=False)
    torch.testing.assert_close(BankAttnProcessor(LAYER)(attn, x, bank=BankView(off, slots=[0, 1])), plain)


@torch.no_grad()
def test_cross_attention_is_untouched_and_unrecorded():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    x, context = torch.randn(1, 10, 32), torch.randn(1, 7, 16)
    bank = FeatureBank(BankConfig(), torch.Generator())
    out = BankAttnProcessor(LAYER)(attn, x, encoder_hidden_states=context, bank=BankView(bank, slots=[0]))
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x, encoder_hidden_states=context))
    bank.commit()
    assert bank.layers == {}


def test_fusion_leaves_tokens_below_the_threshold_untouched():
    current, banked = torch.randn(1, 50, 16), torch.randn(1, 30, 16)
    fused = fuse(current, banked, alpha=0.75, threshold=0.5)
    a = torch.nn.functional.normalize(current, dim=-1)
    b = torch.nn.functional.normalize(banked, dim=-1)
    best, index = (a @ b.transpose(1, 2)).max(-1)
    below = best[0] <= 0.5
    assert below.any() and (~below).any()
    torch.testing.assert_close(fused[0, below], current[0, below])
    expected = 0.25 * current[0, ~below] + 0.75 * banked[0, index[0, ~below]]
    torch.testing.assert_close(fused[0, ~below], expected)


def test_fusion_with_alpha_zero_or_with_itself_is_the_identity():
    current = torch.randn(2, 40, 8)
    torch.testing.assert_close(fuse(current, torch.randn(2, 40, 8), alpha=0.0, threshold=-1.0), current)
    torch.testing.assert_close(fuse(current, current.clone(), alpha=0.75, threshold=0.98), current)
