"""LlamaConfig: validation, the size dial, presets, parameter and FLOP counts, HF config.json both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.model import PRESETS, Llama, LlamaConfig, flops_per_token, n_params, suggested_lr
from lmforge.model.config import llama_ffn_dim

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 101, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **kw})


def test_defaults_and_head_dim():
    cfg = tiny()
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 8 and cfg.ffn_dim == llama_ffn_dim(32) == 128


def test_llama_ffn_rule_matches_llama2_7b():
    assert llama_ffn_dim(4096, multiple_of=256) == 11008  # Llama-2-7B's intermediate_size


@pytest.mark.parametrize(("kw", "message"), [
    ({"dim": 30}, "divisible by n_heads"),
    ({"n_kv_heads": 3}, "divisible by n_kv_heads"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"dim": 12, "n_heads": 4}, "head_dim .* must be even"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"max_seq_len": 2.5}, "max_seq_len"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing"),
    ({"tie_embeddings": 1}, "tie_embeddings"),
])
def test_validation_errors(kw, message):
    with pytest.raises(LmforgeError, match=message):
        tiny(**kw)


def test_from_dict_roundtrip_and_unknown_keys():
    cfg = tiny(rope_scaling=LLAMA3_SCALING, tie_embeddings=True, eos_token_id=[1, 2])
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LmforgeError, match="unknown LlamaConfig keys: bogus, hidden_size"):
        LlamaConfig.from_dict({**cfg.to_dict(), "hidden_size": 3, "bogus": 1})
    with pytest.raises(LmforgeError, match="missing required keys: dim"):
        LlamaConfig.from_dict({"vocab_size": 3, "n_layers": 1, "n_heads": 1})


def test_from_depth_dial():
    cfg = LlamaConfig.from_depth(6, vocab_size=8192)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.max_seq_len) == (
        384, 6, 6, 6, 64, 1024, 1024)
    assert LlamaConfig.from_depth(1, 10).n_heads == 1
    assert LlamaConfig.from_depth(4, 10, tie_embeddings=True).tie_embeddings
    sizes = [n_params(LlamaConfig.from_depth(d, 8192)) for d in (2, 4, 8, 16)]
    assert sizes == sorted(sizes)
    with pytest.raises(LmforgeError, match="depth"):
        LlamaConfig.from_depth(0, 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_equal_the_built_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # shapes only: even the 1B preset costs no memory
        model = Llama(cfg)
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    body = sum(p.numel() for n, p in model.named_parameters() if n not in ("embed_tokens.weight", "lm_head.weight"))
    assert n_params(cfg, include_embeddings=False) == body


def test_preset_sizes_span_1m_to_1b():
    counts = {name: n_params(cfg) for name, cfg in PRESETS.items()}
    assert 1e6 <= counts["llama-1m"] < 2e6 and 14e6 < counts["llama-15m"] < 16e6
    assert 100e6 < counts["llama-110m"] < 120e6 and 1e9 < counts["llama-1b"] < 1.3e9


@pytest.mark.parametrize("tied", [False, True])
def test_n_params_untied_and_tied_built_models(tied):
    cfg = tiny(n_kv_heads=2, tie_embeddings=tied)
    assert n_params(cfg) == sum(p.numel() for p in Llama(cfg).parameters())


def test_flops_per_token_matches_counted_training_flops():
    """6N + 12 L H Q T against torch's FLOP counter over one forward + backward of the real model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(n_kv_heads=2)
    model = Llama(cfg)
    B, T = 2, 16
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # The math SDPA backend is plain matmuls the counter sees (it has no formula for the CPU flash kernel):
    # 4 T^2 Q per head forward, twice that backward = PaLM's 12 L H Q T per token (causal half not discounted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    counted = counter.get_total_flops() / (B * T)
    # RMSNorm's hand-written backward adds a few matrix-vector products the formula does not count.
    assert flops_per_token(cfg, T) == pytest.approx(counted, rel=0.01)
    assert flops_per_token(cfg, 2 * T) > flops_per_token(cfg, T)


def test_flops_per_token_known_value():
    cfg = PRESETS["llama-110m"]
    matmul_params = n_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 1024) == 6 * matmul_params + 12 * 12 * 12 * 64 * 1024
    with pytest.raises(LmforgeError):
        flops_per_token(cfg, 0)


def test_suggested_lr():
    assert suggested_lr(LlamaConfig.from_depth(12, 100)) == pytest.approx(6e-4)  # the GPT-3 Small anchor
    lrs = [suggested_lr(LlamaConfig.from_depth(d, 100)) for d in (1, 4, 12, 32, 64)]
    assert lrs == sorted(lrs, reverse=True) and max(lrs) <= 3e-3
    assert 2e-4 < suggested_lr(dataclasses.replace(PRESETS["llama-1b"], dim=4096, n_heads=32, n_kv_heads=8)) < 4e-4


# ---- HF config.json ----


def test_to_hf_is_read_by_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(n_kv_heads=2, rope_scaling=LLAMA3_SCALING, rope_theta=5e5, tie_embeddings=True, bos_token_id=1,
               eos_token_id=2)
    hf = transformers.LlamaConfig.from_dict(cfg.to_hf())
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim, hf.intermediate_size) == (32, 2, 8, 128)
    assert hf.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 5e5}
    assert hf.tie_word_embeddings and hf.max_position_embeddings == 64 and hf.rms_norm_eps == cfg.norm_eps


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_roundtrip(scaling, tied):
    cfg = tiny(n_kv_heads=1, rope_scaling=scaling, tie_embeddings=tied, rope_theta=1234.0)
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


def test_from_hf_reads_transformers_v5_dict():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32})
    cfg = LlamaConfig.from_hf(hf.to_dict())
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.max_seq_len) == (64, 3, 8, 2, 96, 128)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 4.0 and "rope_theta" not in cfg.rope_scaling
    assert cfg.norm_eps == 1e-6  # HF's default, not ours


def test_from_hf_reads_v4_layout():
    """transformers v4 wrote top-level rope_theta and rope_scaling (older versions: "type" for "rope_type")."""
    d = tiny().to_hf()
    del d["rope_parameters"]
    d.update(rope_theta=5e5, rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items()
                                                                if k != "rope_type"}})
    cfg = LlamaConfig.from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == LLAMA3_SCALING
    d["rope_scaling"] = None
    assert LlamaConfig.from_hf(d).rope_scaling is None
    d["rope_scaling"] = {"rope_type": "default"}
    assert LlamaConfig.from_hf(d).rope_scaling is None


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
])
def test_from_hf_rejects_unsupported(change, message):
    with pytest.raises(LmforgeError, match=message):
        LlamaConfig.from_hf({**tiny().to_hf(), **change})


def test_from_hf_missing_key():
    d = tiny().to_hf()
    del d["hidden_size"]
    with pytest.raises(LmforgeError, match="hidden_size"):
        LlamaConfig.from_hf(d)
