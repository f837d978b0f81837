"""GPT-2 run directories against transformers' GPT2LMHeadModel, both directions: logits, gradients, greedy
generation, the layouts older checkpoints use, and one-line errors for broken runs.

Tiny random configs in fp32; logits must agree to 1e-4 (in practice ~1e-6).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.checkpoint.gpt2 import load_gpt2, load_gpt2_config, save_gpt2
from lmforge.checkpoint.run import read_meta
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate, generate_batch
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model.gpt2 import GPT2, GPT2Config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
V = 97
N_NEW = 24
CASES = {
    "tied": {},
    "untied-n_inner": dict(tie_embeddings=False, ffn_dim=80),
    "tied-exact-gelu": dict(activation="gelu"),
}


def random_gpt2(seed: int = 0, **kw) -> GPT2:
    """Every weight random (LayerNorm and biases included); matrices N(0, 1/fan_in) so greedy outputs vary."""
    cfg = GPT2Config(**{"vocab_size": V, "dim": 48, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, **kw})
    torch.manual_seed(seed)
    model = GPT2(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.3 * torch.randn_like(p))
    return model.eval()


def hf_from_run(run_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(run_dir, attn_implementation="eager").eval()


def hf_random(seed: int = 0, **kw):
    """A transformers GPT2LMHeadModel with random LayerNorms and biases (its init makes them 1 and 0)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{"vocab_size": V, "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                     "bos_token_id": 1, "eos_token_id": 2, **kw})
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p) + ("ln" in name and name.endswith("weight")))
    return ref


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) left-padded with id 0, positions (B, T) with -1 on the padding."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    pos = torch.full((len(lengths), T), -1)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(0, V, (n,), generator=g)
        pos[b, T - n:] = torch.arange(n)
    return ids, pos


# ---- logits, both directions ----


@pytest.fixture(scope="module", params=sorted(CASES))
def ours_and_hf(request, tmp_path_factory):
    model = random_gpt2(**CASES[request.param])
    run = save_gpt2(model, model.cfg, tmp_path_factory.mktemp(request.param))
    return model, hf_from_run(run)


@torch.inference_mode()
def test_ours_to_transformers(ours_and_hf):
    model, ref = ours_and_hf
    assert ref.config.tie_word_embeddings == model.cfg.tie_embeddings
    if model.cfg.tie_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, V, (3, 64))  # the whole position table
    torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_left_padded_cached_forward_matches_transformers(ours_and_hf):
    """Our cached prefill + one decode step with per-row positions vs HF with attention_mask and position_ids."""
    model, ref = ours_and_hf
    lengths = [4, 13, 9]
    ids, pos = left_padded(lengths)
    mask = (pos >= 0).long()
    cache = KVCache(model.cfg, 3, ids.shape[1] + 1)
    ours = model(ids, input_pos=pos, cache=cache)
    theirs = ref(ids, attention_mask=mask, position_ids=pos.clamp(min=0)).logits
    real = pos >= 0
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
    nxt = torch.tensor([[5], [6], [7]])
    step = model(nxt, input_pos=torch.tensor(lengths)[:, None], cache=cache)
    full = ref(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
               position_ids=torch.cat([pos.clamp(min=0), torch.tensor(lengths)[:, None]], 1)).logits
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_to_ours(tmp_path, tied):
    ref = hf_random(tie_word_embeddings=tied, n_inner=None if tied else 72)
    ref.save_pretrained(tmp_path)
    model, cfg = load_gpt2(tmp_path)
    assert cfg.tie_embeddings == tied and cfg.ffn_dim == (192 if tied else 72) and cfg.eos_token_id == 2
    if tied:
        assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


def test_old_layout_without_prefix_with_mask_buffers(tmp_path):
    """As the original OpenAI GPT-2 upload: saved from GPT2Model (no `transformer.`), with older transformers'
    persistent causal-mask buffers; plus a tied head saved anyway. All three load."""
    ref = hf_random()
    ref.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_gpt2(tmp_path)
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)


def test_sharded_both_ways(tmp_path):
    ref = hf_random()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    model, _ = load_gpt2(tmp_path / "hf")
    save_gpt2(model, model.cfg, tmp_path / "ours", max_shard_bytes=20_000)
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 2
    again = hf_from_run(tmp_path / "ours")
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=ATOL, rtol=0)
    theirs = ref.state_dict()
    for name, t in again.state_dict().items():  # through lmforge and back: every weight bit for bit
        assert torch.equal(t, theirs[name]), name


def test_gradients_match_transformers(tmp_path):
    """Same loss and gradients for every weight (Conv1D ones compared transposed); ours through the fused loss."""
    model = random_gpt2().train()
    save_gpt2(model, model.cfg, tmp_path)
    ref = hf_from_run(tmp_path)
    idx = torch.randint(0, V, (2, 17))
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    ref_loss = F.cross_entropy(ref(idx[:, :-1]).logits.reshape(-1, V), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    loss.backward()
    ref_loss.backward()
    ref_grads = {n.removeprefix("transformer."): p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        g = ref_grads[name].t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else ref_grads[name]
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=name)


# ---- generation ----


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    model = random_gpt2(seed=1)
    return model, hf_from_run(save_gpt2(model, model.cfg, tmp_path_factory.mktemp("gen")))


def hf_greedy(ref, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                       pad_token_id=0, top_k=None, top_p=None)
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def greedy_uncached(model: GPT2, ids: list[int]) -> list[int]:
    seq = list(ids)
    for _ in range(N_NEW):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("length", [1, 7])
def test_greedy_equals_transformers_and_uncached(gen_pair, length):
    model, ref = gen_pair
    ids, _ = left_padded([length], seed=length)
    ours = list(generate(model, ids[0].tolist(), SamplingParams(temperature=0, max_new_tokens=N_NEW)))
    assert len(set(ours)) >= 4, f"degenerate model output, the comparison would prove little: {ours}"
    assert ours == hf_greedy(ref, ids, torch.ones_like(ids))[0]
    assert ours == greedy_uncached(model, ids[0].tolist())


def test_batch_of_different_lengths_equals_transformers(gen_pair):
    model, ref = gen_pair
    ids, pos = left_padded([3, 11, 6], seed=5)
    prompts = [row[p >= 0].tolist() for row, p in zip(ids, pos)]
    steps = list(generate_batch(model, prompts, SamplingParams(temperature=0, max_new_tokens=N_NEW)))
    ours = [list(col) for col in zip(*steps)]
    assert ours == hf_greedy(ref, ids, (pos >= 0).long())


# ---- files and errors ----


def test_files_names_and_layout(tmp_path):
    model = random_gpt2(tie_embeddings=False)
    save_gpt2(model, model.cfg, tmp_path, meta={"stage": "pretrain"})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "lmforge.json", "model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert load_gpt2_config(tmp_path) == model.cfg and read_meta(tmp_path)["stage"] == "pretrain"
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (48, 144)  # Conv1D: (in, out)
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (192, 48)
    assert torch.equal(tensors["transformer.h.0.mlp.c_fc.weight"], model.h[0].mlp.c_fc.weight.t())
    assert tensors["lm_head.weight"].shape == (V, 48) and "transformer.wpe.weight" in tensors
    loaded, _ = load_gpt2(tmp_path, dtype=torch.bfloat16)
    assert loaded.h[0].attn.c_attn.weight.dtype == torch.bfloat16 and not loaded.training


@pytest.fixture
def saved(tmp_path):
    model = random_gpt2()
    save_gpt2(model, model.cfg, tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def _rewrite(run_dir, tensors):
    save_file(tensors, run_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("transformer.h.1.ln_2.bias"), r"missing 1 tensor\(s\): transformer.h.1.ln_2.bias"),
    (lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(192, 48)}),
     r"wrong tensor shapes .*transformer.h.0.mlp.c_fc.weight \(192, 48\) != \(48, 192\)"),
    (lambda t: t.update({"transformer.h.2.ln_1.weight": torch.zeros(48)}),
     r"1 unexpected tensor\(s\) for a GPT-2 checkpoint: transformer.h.2.ln_1.weight"),
    (lambda t: t.update({"wpe.weight": t["transformer.wpe.weight"].clone()}), "both with and without"),
])
def test_broken_weights_are_one_line_errors(saved, edit, needle):
    run_dir, tensors = saved
    edit(tensors)
    _rewrite(run_dir, tensors)
    with pytest.raises(LmforgeError, match=needle) as e:
        load_gpt2(run_dir)
    assert "\n" not in str(e.value)


def test_config_errors(saved):
    run_dir, _ = saved
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(LmforgeError, match="model_type 'llama'"):
        load_gpt2(run_dir)
    (run_dir / "config.json").write_text(json.dumps({**config, "n_embd": 64, "n_head": 4}))
    with pytest.raises(LmforgeError, match=r"transformer.h.0.attn.c_attn.bias \(144,\) != \(192,\)"):
        load_gpt2(run_dir)
    with pytest.raises(LmforgeError, match="run directory not found"):
        load_gpt2(run_dir / "nope")


def test_save_refuses_a_model_that_does_not_match_cfg(tmp_path):
    model = random_gpt2()
    other = GPT2Config(vocab_size=V, dim=48, n_layers=3, n_heads=4, max_seq_len=64)
    with pytest.raises(LmforgeError, match=r"missing 12 tensor\(s\): transformer.h.2"):
        save_gpt2(model, other, tmp_path)
    assert not (tmp_path / "config.json").exists()
