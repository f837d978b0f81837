"""GPT2Config and GPT2: config checks and the HF config.json mapping, the fused loss, the KV-cache hook (cached
and left-padded equal to uncached), and one-line errors. Parity with transformers: tests/checkpoint/test_gpt2.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.infer.kv_cache import KVCache
from lmforge.model.gpt2 import GPT2, GPT2Config

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97


def tiny_cfg(**kw) -> GPT2Config:
    return GPT2Config(**{"vocab_size": V, "dim": 48, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **kw})


def random_gpt2(seed: int = 0, **kw) -> GPT2:
    """Every weight random, LayerNorm weights and biases and linear biases included (ones and zeros would hide
    a mix-up); matrices N(0, 1/fan_in) so logits are spread out and greedy outputs vary."""
    torch.manual_seed(seed)
    model = GPT2(tiny_cfg(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3 * torch.randn_like(p))
    return model.eval()


# ---- config ----


def test_config_defaults_and_cache_dims():
    cfg = tiny_cfg()
    assert cfg.ffn_dim == 4 * 48 and cfg.head_dim == 12 and cfg.n_kv_heads == 4 and cfg.tie_embeddings
    cache = KVCache(cfg, batch_size=2, max_len=8)  # KVCache reads n_layers / n_kv_heads / head_dim
    assert cache.k[0].shape == (2, 4, 9, 12)


def test_config_hf_roundtrip():
    cfg = tiny_cfg(ffn_dim=80, tie_embeddings=False, activation="gelu", norm_eps=1e-6, bos_token_id=1,
                   eos_token_id=2)
    d = cfg.to_hf()
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert (d["n_embd"], d["n_layer"], d["n_head"], d["n_inner"], d["n_positions"]) == (48, 2, 4, 80, 64)
    assert GPT2Config.from_hf(d) == cfg
    assert GPT2Config.from_dict(cfg.to_dict()) == cfg


def test_config_from_hf_defaults_are_transformers():
    """A key config.json leaves out takes transformers' GPT2Config default (GPT-2 small), as transformers does."""
    cfg = GPT2Config.from_hf({"model_type": "gpt2"})
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.max_seq_len, cfg.ffn_dim) == (
        50257, 768, 12, 12, 1024, 3072)
    assert cfg.activation == "gelu_new" and cfg.tie_embeddings


@pytest.mark.parametrize("d, needle", [
    ({"vocab_size": V, "dim": 48, "n_layers": 2, "n_heads": 4, "n_embd": 48}, "unknown GPT2Config keys: n_embd"),
    ({"dim": 48, "n_layers": 2, "n_heads": 4}, "missing required keys: vocab_size"),
    ({"vocab_size": V, "dim": 50, "n_layers": 2, "n_heads": 4}, "divisible"),
    ({"vocab_size": V, "dim": 48, "n_layers": 0, "n_heads": 4}, "GPT2Config.n_layers"),
    ({"vocab_size": V, "dim": 48, "n_layers": 2, "n_heads": 4, "activation": "relu"}, "activation 'relu'"),
])
def test_config_errors(d, needle):
    with pytest.raises(LmforgeError, match=needle) as e:
        GPT2Config.from_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
    ({"scale_attn_weights": False}, "scale_attn_weights=false"),
    ({"activation_function": "relu"}, "activation_function='relu'"),
])
def test_config_from_hf_refuses_what_the_model_does_not_compute(change, needle):
    with pytest.raises(LmforgeError, match=needle):
        GPT2Config.from_hf({**tiny_cfg().to_hf(), **change})


# ---- loss ----


def test_targets_give_cross_entropy_and_same_gradients():
    model = random_gpt2().train()
    idx = torch.randint(0, V, (2, 17))
    targets = torch.randint(0, V, (2, 17))
    targets[0, :5] = -100
    fused = model(idx, targets=targets)
    grads = torch.autograd.grad(fused, list(model.parameters()))
    ref = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=name)


# ---- the KV-cache hook ----


@torch.inference_mode()
def test_prefill_then_decode_steps_equal_full_forward():
    model = random_gpt2()
    ids = torch.randint(0, V, (2, 20))
    full = model(ids)  # (2, 20, V)
    cache = KVCache(model.cfg, 2, 20)
    got = [model(ids[:, :11], input_pos=torch.arange(11).expand(2, 11), cache=cache)]  # masked SDPA (T > 8)
    got.append(model(ids[:, 11:14], input_pos=torch.arange(11, 14).expand(2, 3), cache=cache))  # small-query path
    for t in range(14, 20):  # one token per step: the compiled one-query kernel where it is built
        got.append(model(ids[:, t:t + 1], input_pos=torch.full((2, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_left_padding_equals_each_row_alone():
    """Rows of different lengths, left-padded with negative positions: each real token's logits equal the row's
    own unpadded forward (learned positions start at 0 in every row)."""
    model = random_gpt2()
    lengths = [5, 12, 9]
    rows = [torch.randint(0, V, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    pos = torch.full((3, T), -1)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], pos[b, T - len(r):] = r, torch.arange(len(r))
    cache = KVCache(model.cfg, 3, T + 1)
    prefill = model(ids, input_pos=pos, cache=cache)
    step = model(torch.tensor([[1], [2], [3]]), input_pos=torch.tensor(lengths)[:, None], cache=cache)
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, torch.tensor([b + 1])])[None])[0]  # (len + 1, V)
        torch.testing.assert_close(prefill[b, T - len(r):], alone[:-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[b, 0], alone[-1], atol=1e-5, rtol=0)


# ---- errors ----


def test_input_errors_are_one_line():
    model = random_gpt2()
    cases = [
        (lambda: model(torch.randn(2, 3)), "int64 tensor"),
        (lambda: model(torch.zeros(3, dtype=torch.long)), r"shape \(B, T\)"),
        (lambda: model(torch.zeros(1, 65, dtype=torch.long)), "exceeds max_seq_len 64"),
        (lambda: model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.tensor([[63, 64]])), "position 64"),
        (lambda: model(torch.zeros(1, 2, dtype=torch.long), cache=KVCache(model.cfg, 1, 4)), "needs input_pos"),
        (lambda: model(torch.zeros(1, 2, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long)), "targets"),
    ]
    for call, needle in cases:
        with pytest.raises(LmforgeError, match=needle) as e:
            call()
        assert "\n" not in str(e.value)


def test_tied_head_and_module_names():
    model = GPT2(tiny_cfg())
    assert model.lm_head.weight is model.wte.weight
    assert GPT2(tiny_cfg(tie_embeddings=False)).lm_head.weight is not None
    names = set(model.state_dict())
    assert {"wte.weight", "wpe.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias", "h.1.mlp.c_fc.weight",
            "h.0.ln_2.bias", "ln_f.weight"} <= names
    assert model.h[0].attn.c_attn.weight.shape == (3 * 48, 48)  # nn.Linear layout (out, in)
    assert sum(p.numel() for p in model.parameters()) == (
        V * 48 + 64 * 48 + 2 * (2 * 2 * 48 + 48 * 144 + 144 + 48 * 48 + 48 + 48 * 192 + 192 + 192 * 48 + 48) + 2 * 48)
