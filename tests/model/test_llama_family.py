"""Qwen2 (q/k/v bias), Mistral (sliding window) and biased Llama against transformers' own classes.

Each is our one decoder with a switch; parity through run directories both ways, cached decoding against full
recomputation (the sliding window must hold in the cache too), greedy generation token for token.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import load_run, save_run
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate, generate_batch
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Llama, LlamaConfig, n_params

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4
BASE = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96,
            bos_token_id=1, eos_token_id=2)
CASES = {
    "qwen2-tied": dict(model_type="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "qwen2-window": dict(model_type="qwen2", qkv_bias=True, sliding_window=5),
    "mistral-window": dict(model_type="mistral", sliding_window=6),
    "mistral-nowindow": dict(model_type="mistral", n_kv_heads=1),
    "llama-biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
}


def random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """Every weight random, norms and biases included (ones and zeros would hide a mix-up)."""
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_from_run(run_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(run_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_transformers_and_back(tmp_path, case):
    cfg = LlamaConfig(**{**BASE, **CASES[case]})
    model = random_model(cfg)
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    save_run(model, cfg, tmp_path / "ours")
    ref = hf_from_run(tmp_path / "ours")
    assert type(ref).__name__.lower().startswith(cfg.model_type)
    idx = torch.randint(0, cfg.vocab_size, (2, 23))  # longer than the windows
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)
    ref.save_pretrained(tmp_path / "theirs")  # and what transformers writes loads back as the same model
    back, back_cfg = load_run(tmp_path / "theirs")
    assert (back_cfg.model_type, back_cfg.qkv_bias, back_cfg.sliding_window) == (
        cfg.model_type, cfg.qkv_bias, cfg.sliding_window)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ref(idx).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mistral-window", "qwen2-window"])
def test_cached_decoding_keeps_the_window(case):
    """Prefill then one token at a time, with left padding: equal to full recomputation at every step."""
    cfg = LlamaConfig(**{**BASE, **CASES[case]})
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(seq)  # (B, T, V), the (T, T) window band
        cache = KVCache(cfg, 2, 24)
        pos = torch.arange(20).repeat(2, 1)
        pos[1, :3] = -1  # row 1 is left-padded by 3: its positions start later
        pos[1, 3:] = torch.arange(17)
        steps = [model(seq[:, :8], input_pos=pos[:, :8], cache=cache)]
        for t in range(8, 20):
            steps.append(model(seq[:, t:t + 1], input_pos=pos[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[0], full[0], atol=ATOL, rtol=0)
    with torch.no_grad():
        alone = model(seq[1:, 3:])  # row 1 without its padding
    torch.testing.assert_close(cached[1, 3:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mistral-window", "qwen2-tied"])
def test_greedy_generation_equals_transformers(tmp_path, case):
    cfg = LlamaConfig(**{**BASE, **CASES[case]})
    model = random_model(cfg, seed=3)
    save_run(model, cfg, tmp_path)
    ref = hf_from_run(tmp_path)
    prompt = torch.randint(3, cfg.vocab_size, (1, 9)).tolist()[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    ours = list(generate(model, prompt, params))
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 9:].tolist()
    assert ours == theirs
    rows = [prompt, prompt[:4]]  # batched with padding: each row as if alone
    batched = [[], []]
    for step in generate_batch(model, rows, params):
        for b, t in enumerate(step):
            if t is not None:
                batched[b].append(t)
    assert batched[0] == ours and batched[1] == list(generate(model, rows[1], params))


def test_bad_family_configs():
    with pytest.raises(LmforgeError, match="model_type"):
        LlamaConfig(**BASE, model_type="gpt2")
    with pytest.raises(LmforgeError, match="sliding_window"):
        LlamaConfig(**BASE, sliding_window=0)
    d = LlamaConfig(**BASE, model_type="qwen2", qkv_bias=True, sliding_window=4).to_hf()
    d.update(max_window_layers=1, layer_types=None)
    with pytest.raises(LmforgeError, match="only some layers"):
        LlamaConfig.from_hf(d)
