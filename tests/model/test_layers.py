"""RMSNorm, RoPE and SwiGLU against their transformers counterparts, and the hand-written backwards."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import LlamaConfig
from lmforge.model.layers import (
    RMSNorm,
    SwiGLU,
    _RMSNormFn,
    _RotaryFn,
    apply_rotary,
    rope_inv_freq,
    rope_tables,
)

llama = pytest.importorskip("transformers.models.llama.modeling_llama")
transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def hf_config(cfg: LlamaConfig):
    return transformers.LlamaConfig.from_dict(cfg.to_hf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = (torch.randn(3, 7, 48) * 3).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, atol=0, rtol=0) if dtype == torch.float32 else torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)


def test_custom_backwards_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-5), (x, w))
    cos, sin = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _RotaryFn.apply(x, cos, sin), (x,))


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope_tables_match_hf_rotary_embedding(scaling):
    cfg = LlamaConfig(vocab_size=10, dim=128, n_layers=1, n_heads=2, max_seq_len=300, rope_theta=5e5,
                      rope_scaling=scaling)
    rotary = llama.LlamaRotaryEmbedding(hf_config(cfg))
    torch.testing.assert_close(rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling), rotary.inv_freq, atol=0, rtol=0)
    positions = torch.arange(cfg.max_seq_len)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # (1, S, D), halves repeated
    cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, scaling)
    half = cfg.head_dim // 2
    for ours, ref in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        torch.testing.assert_close(ours, ref[:, :half], atol=0, rtol=0)
        torch.testing.assert_close(ours, ref[:, half:], atol=0, rtol=0)
    if scaling is not None:  # the scaling really changes the low frequencies
        assert not torch.equal(rope_inv_freq(cfg.head_dim, cfg.rope_theta), rotary.inv_freq)


def test_apply_rotary_matches_hf_including_gradients():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 5, 16
    cos, sin = rope_tables(T, D, 10000.0)
    q = torch.randn(B, T, H, D, requires_grad=True)  # our layout: rotate before moving heads forward
    q_ref = q.detach().transpose(1, 2).clone().requires_grad_()  # HF: (B, H, T, D)
    ours = apply_rotary(q, cos[:, None, :], sin[:, None, :]).transpose(1, 2)
    full_cos, full_sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
    ref, _ = llama.apply_rotary_pos_emb(q_ref, q_ref, full_cos, full_sin)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(q.grad.transpose(1, 2), q_ref.grad, atol=1e-6, rtol=1e-6)


def test_apply_rotary_per_row_positions_broadcast():
    """(B, T, 1, D/2) tables (gathered per row) rotate each row by its own positions."""
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 8, 10000.0)
    x = torch.randn(2, 3, 4, 8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    out = apply_rotary(x, cos[pos].unsqueeze(2), sin[pos].unsqueeze(2))
    for b in range(2):
        expect = apply_rotary(x[b : b + 1], cos[pos[b]][:, None], sin[pos[b]][:, None])
        torch.testing.assert_close(out[b : b + 1], expect)


def test_swiglu_matches_hf_mlp():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, ffn_dim=80)
    ours, ref = SwiGLU(32, 80), llama.LlamaMLP(hf_config(cfg))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
