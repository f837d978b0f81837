"""Attention: SDPA's built-in GQA broadcast is exact on CPU, and MHA / GQA / MQA all run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.attention import Attention
from lmforge.model.config import LlamaConfig
from lmforge.model.layers import rope_tables


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_enable_gqa_equals_repeated_kv_heads(causal):
    """We rely on enable_gqa instead of materializing repeated keys/values: check it, gradients included."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 2, 9, 16
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, requires_grad=True)
    mask = None if causal else torch.rand(B, 1, T, T) > 0.4
    if mask is not None:
        mask[..., 0] = True
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    rep = H // Hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=mask, is_causal=causal)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_shapes_and_causality(n_kv_heads):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=16)
    attn = Attention(cfg, layer_idx=0)
    assert attn.k_proj.weight.shape == (n_kv_heads * 8, 32)
    cos, sin = rope_tables(16, cfg.head_dim, cfg.rope_theta)
    x = torch.randn(2, 6, 32)
    y = attn(x, cos[:6, None], sin[:6, None])
    assert y.shape == (2, 6, 32)
    # Changing a later token leaves earlier outputs unchanged.
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 32)
    y2 = attn(x2, cos[:6, None], sin[:6, None])
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])
