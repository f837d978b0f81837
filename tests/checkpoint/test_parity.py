"""Our Llama against transformers' LlamaForCausalLM through run directories, both directions.

Tiny random configs in fp32; logits must agree to 1e-4 (in practice they agree to ~1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_run, save_run
from lmforge.model import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ATOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def random_llama(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A Llama with every weight random, norms included (ones would hide a norm-weight mix-up)."""
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def hf_from_run(run_dir):
    return transformers.LlamaForCausalLM.from_pretrained(run_dir, attn_implementation="eager").eval()


CASES = {
    "mha-untied": dict(n_kv_heads=4),
    "gqa-untied-llama3": dict(n_kv_heads=2, rope_scaling=LLAMA3, rope_theta=5e5),
    "mqa-tied": dict(n_kv_heads=1, tie_embeddings=True),
    "gqa-tied-llama3": dict(n_kv_heads=2, tie_embeddings=True, rope_scaling=LLAMA3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_transformers(tmp_path, case):
    cfg = LlamaConfig(vocab_size=113, dim=64, n_layers=2, n_heads=4, max_seq_len=64, bos_token_id=1,
                      eos_token_id=2, **CASES[case])
    model = random_llama(cfg)
    save_run(model, cfg, tmp_path)
    ref = hf_from_run(tmp_path)
    idx = torch.randint(0, cfg.vocab_size, (3, 40))  # beyond original_max_position_embeddings: scaling matters
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)
    assert ref.config.tie_word_embeddings == cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


def test_gradients_match_transformers(tmp_path):
    """Same loss, same gradients for every weight: checks the hand-written RMSNorm and RoPE backwards."""
    cfg = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = random_llama(cfg)
    save_run(model, cfg, tmp_path)
    ref = hf_from_run(tmp_path)
    idx = torch.randint(0, 61, (2, 17))
    for logits in (model(idx[:, :-1]), ref(idx[:, :-1]).logits):
        F.cross_entropy(logits.reshape(-1, 61), idx[:, 1:].reshape(-1)).backward()
    ref_grads = {n.removeprefix("model."): p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def hf_random(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{"vocab_size": 89, "hidden_size": 48, "intermediate_size": 72,
                                         "num_hidden_layers": 2, "num_attention_heads": 6,
                                         "num_key_value_heads": 2, "max_position_embeddings": 64, **kw})
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope", [None, {**LLAMA3, "rope_theta": 5e5}])
def test_transformers_to_ours(tmp_path, tied, rope):
    ref = hf_random(tmp_path, tie_word_embeddings=tied, **({"rope_parameters": rope} if rope else {}))
    ref.save_pretrained(tmp_path)
    model, cfg = load_run(tmp_path)
    assert cfg.tie_embeddings == tied and (cfg.rope_scaling is None) == (rope is None)
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight
    idx = torch.randint(0, 89, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


def test_transformers_sharded_save(tmp_path):
    ref = hf_random(tmp_path)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, _ = load_run(tmp_path)
    idx = torch.randint(0, 89, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


def test_v4_style_config_json(tmp_path):
    """A config.json as transformers v4 wrote it: top-level rope_theta/rope_scaling, torch_dtype."""
    ref = hf_random(tmp_path, rope_parameters={**LLAMA3, "rope_theta": 5e5})
    ref.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    d["torch_dtype"] = d.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(d))
    model, cfg = load_run(tmp_path)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
    idx = torch.randint(0, 89, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


def test_our_sharded_save_loads_in_transformers(tmp_path):
    cfg = LlamaConfig(vocab_size=113, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = random_llama(cfg)
    save_run(model, cfg, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = hf_from_run(tmp_path)
    idx = torch.randint(0, 113, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)
