"""Mixtral (sparse MoE) against transformers' MixtralForCausalLM: logits, router choices, the load-balancing
loss, checkpoints both ways (hub layout and transformers v5's fused experts), greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_run, save_run
from lmforge.checkpoint.hf import to_hf_state_dict, unfuse_experts
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Llama, MixtralConfig, n_params
from lmforge.model.moe import MoE, load_balancing_loss

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4


def tiny(**kw) -> MixtralConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                n_experts=4, n_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None)
    return MixtralConfig(**{**base, **kw})


def random_model(cfg: MixtralConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # a router with opinions: distinct top-k choices per token
    return model.eval()


@pytest.fixture()
def pair(tmp_path):
    cfg = tiny()
    model = random_model(cfg)
    save_run(model, cfg, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return cfg, model, ref, tmp_path


def test_logits_router_choices_and_loss_match(pair):
    cfg, model, ref, _ = pair
    assert type(ref).__name__ == "MixtralForCausalLM"
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        out = ref(idx, output_router_logits=True)
        torch.testing.assert_close(model(idx), out.logits, atol=ATOL, rtol=0)
        x = model.embed_tokens(idx)
        for i, block in enumerate(model.layers):  # the same experts chosen for every token of every layer
            h = block.post_attention_layernorm(x + block.self_attn(block.input_layernorm(x), *model._rope(19, None)))
            _, ours_choice, _ = block.mlp.route(h.reshape(-1, cfg.dim))
            theirs = torch.topk(F.softmax(out.router_logits[i].float(), -1), cfg.n_experts_per_tok, -1).indices
            assert torch.equal(ours_choice, theirs), i
            x = h * 0 + block(x, *model._rope(19, None))  # next layer's input
    y = torch.randint(0, cfg.vocab_size, (2, 19))
    loss = model(idx, targets=y)
    theirs = ref(idx, labels=y, shift_labels=y, output_router_logits=True)
    torch.testing.assert_close(model.aux_loss, theirs.aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=1e-5)  # CE + coef * aux, as theirs


def test_load_balancing_loss_is_top_k_when_uniform():
    logits = torch.zeros(10, 4)  # every expert equally likely: fractions 1/E * k, probabilities 1/E
    assert load_balancing_loss([logits], n_experts=4, top_k=2).item() == pytest.approx(2.0)
    skewed = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(10, 1)
    assert load_balancing_loss([skewed], 4, 2) > 2.0


def test_moe_gradients_flow_to_router_and_chosen_experts():
    torch.manual_seed(0)
    moe = MoE(8, 16, n_experts=4, top_k=1)
    x = torch.randn(1, 5, 8)
    moe(x).sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    used = set(moe.route(x[0])[1].flatten().tolist())
    for e, expert in enumerate(moe.experts):
        assert (expert.up_proj.weight.grad is not None) == (e in used)


def test_checkpoint_layouts_and_reverse_load(pair):
    cfg, model, ref, run = pair
    names = set(to_hf_state_dict(model.state_dict(), cfg.tie_embeddings, moe=True))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names  # the hub's layout
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    idx = torch.randint(0, cfg.vocab_size, (1, 11))
    ref.save_pretrained(run / "theirs")
    back, back_cfg = load_run(run / "theirs")
    assert isinstance(back_cfg, MixtralConfig) and back_cfg.n_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ref(idx).logits, atol=ATOL, rtol=0)
    fused = {f"model.{n}": t for n, t in ref.model.state_dict().items()}  # v5's in-memory fused layout
    unfused = unfuse_experts(fused)
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in unfused


def test_greedy_generation_equals_transformers(pair):
    cfg, model, ref, _ = pair
    prompt = [5, 9, 13, 7, 3]
    ours = list(generate(model, prompt, SamplingParams(temperature=0.0, max_new_tokens=12)))
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 5:].tolist()
    assert ours == theirs


def test_bad_mixtral_configs():
    with pytest.raises(LmforgeError, match="n_experts_per_tok"):
        tiny(n_experts=2, n_experts_per_tok=3)
    with pytest.raises(LmforgeError, match="model_type"):
        tiny(model_type="llama")
