"""The Llama module: shapes, input errors, tying, init, buffers, dtype casts, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.model import Llama, LlamaConfig


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 101, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 24, **kw})


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny())


def test_forward_shape_and_dtype(model):
    idx = torch.randint(0, 101, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 101) and logits.dtype == torch.float32
    assert torch.equal(model(idx.int()), logits)


def test_explicit_positions_equal_default(model):
    idx = torch.randint(0, 101, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(model(idx, input_pos=pos), model(idx), atol=0, rtol=0)


def test_causal(model):
    idx = torch.randint(0, 101, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 101
    torch.testing.assert_close(model(idx)[:, :8], model(idx2)[:, :8])


@pytest.mark.parametrize(("args", "message"), [
    ((torch.zeros(2, 3),), "int64"),
    (([[1, 2]],), "int64"),
    ((torch.zeros(5, dtype=torch.long),), r"shape \(B, T\)"),
    ((torch.zeros(1, 0, dtype=torch.long),), "T >= 1"),
    ((torch.zeros(1, 25, dtype=torch.long),), "exceeds max_seq_len 24"),
    ((torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)), "input_pos"),
    ((torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3)), "input_pos"),
    ((torch.zeros(1, 1, dtype=torch.long), torch.tensor([[24]])), "position 24 exceeds max_seq_len"),
    ((torch.zeros(1, 1, dtype=torch.long), None, object()), "needs input_pos"),
])
def test_input_errors(model, args, message):
    with pytest.raises(LmforgeError, match=message):
        model(*args)


def test_tied_embeddings_share_one_parameter():
    m = Llama(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight
    names = [n for n, _ in m.named_parameters()]
    assert "lm_head.weight" not in names and "embed_tokens.weight" in names
    assert Llama(tiny()).lm_head.weight is not Llama(tiny()).embed_tokens.weight


def test_rope_tables_are_not_saved(model):
    assert not any("rope" in k for k in model.state_dict())
    assert model.rope_cos.shape == (24, 4) and model.rope_cos.dtype == torch.float32


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, max_seq_len=8)
    m = Llama(cfg)
    assert m.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert m.layers[3].self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert m.layers[3].mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(m.norm.weight, torch.ones(256))


def test_bfloat16_cast_keeps_fp32_rope_and_close_logits(model):
    idx = torch.randint(0, 101, (2, 9))
    ref = model(idx)
    m16 = Llama(model.cfg)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    out = m16(idx)
    assert out.dtype == torch.float32 and m16.rope_cos.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_learns_a_fixed_batch():
    torch.manual_seed(0)
    m = Llama(tiny())
    idx = torch.randint(0, 101, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(m(idx[:, :-1]).reshape(-1, 101), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > math.log(101) - 0.5 and losses[-1] < 0.5 * losses[0]
