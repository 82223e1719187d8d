"""Extended self-attention (eq. 1) and feature fusion (eq. 2), each checked
against the paper's equation computed by hand."""

import math

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sv2v_core.attention import BankAttnProcessor, _fusion_hook
from sv2v_core.bank import BankView, FeatureBank
from sv2v_core.config import BankConfig
from sv2v_core.fusion import fuse
from sv2v_core.merging import best_match

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0"
FUSION_LAYER = "mid_block.attentions.0.transformer_blocks.0"


def _attention(**kwargs):
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8, **kwargs).eval()


def _bank_with(layer, stored, **config):
    """A bank holding one frame: `stored` ({"k": …, "v": …[, "o": …]}) of `layer`, recorded and committed."""
    bank = FeatureBank(BankConfig(**{"merge_every": 1, **config}))
    for name, features in stored.items():
        bank.record(layer, name, features)
    bank.commit()
    assert all(torch.equal(bank.layers[layer][name], features) for name, features in stored.items())
    return bank


def _heads(x, heads):  # (B, N, heads·d) -> (B, heads, N, d)
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def extended_attention_by_hand(attn, x, banked_k, banked_v, mask=None):
    """softmax(Q·[K; K_fb]ᵀ/√d)·[V; V_fb], then the output projection (eq. 1)."""
    q = _heads(attn.to_q(x), attn.heads)
    k = _heads(torch.cat([attn.to_k(x), banked_k], dim=1), attn.heads)
    v = _heads(torch.cat([attn.to_v(x), banked_v], dim=1), attn.heads)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = logits.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def test_extended_attention_equals_equation_1_by_hand():
    attn, x = _attention(), torch.randn(2, 24, 32)
    # a bank with its own, distinct keys and values (another token count, as a queue may have)
    banked_k, banked_v = 3 * torch.randn(2, 16, 32), 5 * torch.randn(2, 16, 32) + 2
    bank = _bank_with(LAYER, {"k": banked_k, "v": banked_v})
    out = BankAttnProcessor(LAYER)(attn, x, bank=BankView(bank, slots=[0, 1]))
    torch.testing.assert_close(out, extended_attention_by_hand(attn, x, banked_k, banked_v), rtol=1e-5, atol=1e-5)
    # the bank's values matter, not only its keys
    other_values = BankAttnProcessor(LAYER)(attn, x, bank=BankView(_bank_with(LAYER, {"k": banked_k, "v": -banked_v}),
                                                                   slots=[0, 1]))
    assert (other_values - out).abs().max() > 1e-2


@torch.no_grad()
def test_each_batch_row_reads_its_own_slot():
    attn, x = _attention(), torch.randn(2, 24, 32)
    banked_k, banked_v = torch.randn(3, 16, 32), torch.randn(3, 16, 32)
    bank = _bank_with(LAYER, {"k": banked_k, "v": banked_v})
    out = BankAttnProcessor(LAYER)(attn, x, bank=BankView(bank, slots=[2, 0]))
    expected = extended_attention_by_hand(attn, x, banked_k[[2, 0]], banked_v[[2, 0]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_boolean_mask_does_not_block_the_bank():
    attn, x = _attention(), torch.randn(1, 24, 32)
    banked_k, banked_v = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    bank = _bank_with(LAYER, {"k": banked_k, "v": banked_v})
    keep = torch.ones(1, 24, 24, dtype=torch.bool)
    keep[..., 5] = False  # the mask hides one current token; the banked ones stay visible
    out = BankAttnProcessor(LAYER)(attn, x, attention_mask=keep, bank=BankView(bank, slots=[0]))
    full = torch.cat([keep, torch.ones(1, 24, 16, dtype=torch.bool)], dim=-1).unsqueeze(1)
    torch.testing.assert_close(out, extended_attention_by_hand(attn, x, banked_k, banked_v, mask=full),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_extended_attention_records_the_current_frame_and_can_be_switched_off():
    attn, x, past = _attention(), torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    plain = AttnProcessor2_0()(attn, x)
    bank = _bank_with(LAYER, {"k": attn.to_k(past), "v": attn.to_v(past)}, mode="queue")
    BankAttnProcessor(LAYER)(attn, x, bank=BankView(bank, slots=[0, 1]))
    bank.commit()  # a queue of one frame now holds exactly the current frame
    torch.testing.assert_close(bank.layers[LAYER]["k"], attn.to_k(x))
    torch.testing.assert_close(bank.layers[LAYER]["v"], attn.to_v(x))
    off = _bank_with(LAYER, {"k": attn.to_k(past), "v": attn.to_v(past)}, extended_attention=False)
    torch.testing.assert_close(BankAttnProcessor(LAYER)(attn, x, bank=BankView(off, slots=[0, 1])), plain)
    not_due = _bank_with(LAYER, {"k": attn.to_k(past), "v": attn.to_v(past)}, mode="queue")
    BankAttnProcessor(LAYER)(attn, x, bank=BankView(not_due, slots=[0, 1], recording=False))
    not_due.commit()
    torch.testing.assert_close(not_due.layers[LAYER]["k"], attn.to_k(past))  # nothing was recorded


@torch.no_grad()
def test_cross_attention_ignores_a_full_bank():
    attn = _attention(cross_attention_dim=16)
    x, context = torch.randn(1, 10, 32), torch.randn(1, 7, 16)
    bank = _bank_with(LAYER, {"k": torch.randn(1, 10, 32), "v": torch.randn(1, 10, 32)})
    out = BankAttnProcessor(LAYER)(attn, x, encoder_hidden_states=context, bank=BankView(bank, slots=[0]))
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, x, encoder_hidden_states=context))
    assert not bank._pending  # cross-attention records nothing either


def _unit(vector):
    return torch.nn.functional.normalize(torch.tensor(vector, dtype=torch.float32), dim=-1)


def test_fusion_moves_alpha_toward_the_bank_only_above_the_threshold():
    # Token 0's best banked match has cosine 0.99, token 1's 0.95; threshold 0.98.
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    banked = torch.stack([3.0 * (0.99 * e0 + math.sqrt(1 - 0.99**2) * e1),        # cos 0.99 with e0
                          2.0 * (0.95 * e1 + math.sqrt(1 - 0.95**2) * torch.eye(4)[2])])  # cos 0.95 with e1
    current = torch.stack([e0, 2.0 * e1]).unsqueeze(0)
    fused = fuse(current, banked.unsqueeze(0), alpha=0.75, threshold=0.98)[0]
    torch.testing.assert_close(fused[0], 0.25 * current[0, 0] + 0.75 * banked[0])  # (1 − α)·O_t + α·O_fb
    torch.testing.assert_close(fused[1], current[0, 1])  # below the threshold: untouched


def test_fusion_picks_the_most_similar_banked_token():
    current = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    banked = torch.tensor([[[0.0, 5.0], [4.0, 0.1], [-1.0, 0.0]]])
    fused = fuse(current, banked, alpha=0.5, threshold=0.9)
    torch.testing.assert_close(fused[0, 0], 0.5 * current[0, 0] + 0.5 * banked[0, 1])
    torch.testing.assert_close(fused[0, 1], 0.5 * current[0, 1] + 0.5 * banked[0, 0])


def test_fusion_with_alpha_zero_or_with_itself_is_the_identity():
    current = torch.randn(2, 40, 8)
    torch.testing.assert_close(fuse(current, torch.randn(2, 40, 8), alpha=0.0, threshold=-1.0), current)
    torch.testing.assert_close(fuse(current, current.clone(), alpha=0.75, threshold=0.98), current)


@torch.no_grad()
def test_the_bank_keeps_the_block_output_before_fusion():
    output = torch.randn(1, 12, 8)
    banked_o = output + 0.01 * torch.randn(1, 12, 8)  # close enough to fuse every token
    bank = _bank_with(FUSION_LAYER, {"k": torch.randn(1, 12, 8), "v": torch.randn(1, 12, 8), "o": banked_o},
                      mode="queue")
    view = BankView(bank, slots=[0])
    fused = _fusion_hook(FUSION_LAYER)(None, (), {"cross_attention_kwargs": {"bank": view}}, output)
    torch.testing.assert_close(fused, 0.25 * output + 0.75 * banked_o)  # the frame goes on with O'_t
    assert torch.equal(bank._pending[FUSION_LAYER]["o"][0], output)  # the bank keeps O_t
    bank.commit()
    assert torch.equal(bank.layers[FUSION_LAYER]["o"], output)


def test_similarity_is_computed_in_float32():
    # True cosine 0.979 (below a 0.98 threshold); bfloat16 arithmetic would round it up to 0.9805.
    a = torch.zeros(1, 1, 64)
    b = torch.zeros(1, 1, 64)
    a[0, 0, 0] = 1.0
    b[0, 0, 0], b[0, 0, 1] = 0.979, math.sqrt(1 - 0.979**2)
    for dtype in (torch.bfloat16, torch.float16):
        score, _ = best_match(a.to(dtype), b.to(dtype))
        assert abs(float(score) - float(torch.nn.functional.cosine_similarity(a.to(dtype).float(),
                                                                              b.to(dtype).float(), dim=-1))) < 1e-6
        assert float(score) < 0.98, dtype
        fused = fuse(a.to(dtype), b.to(dtype), alpha=0.75, threshold=0.98)
        assert torch.equal(fused, a.to(dtype))
    # a zero token (e.g. a blank region) has no direction: no NaN in half precision
    score, _ = best_match(torch.zeros(1, 2, 8, dtype=torch.float16), torch.randn(1, 3, 8).half())
    assert torch.isfinite(score).all()
