"""Parameter groups (what gets weight decay) and the learning-rate schedules, one against transformers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model import Llama, LlamaConfig
from lmforge.train.optim import build_optimizer, lr_multiplier, param_groups, set_lr


def tiny_llama(tie: bool) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=tie))


@pytest.mark.parametrize("tie", [False, True])
def test_decay_only_on_matrices_of_linear_layers(tie):
    model = tiny_llama(tie)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in no_decay_names
    assert all("norm" in n or n == "embed_tokens.weight" for n in no_decay_names)
    assert all(n.endswith("_proj.weight") or n == "lm_head.weight" for n in decay_names)
    assert ("lm_head.weight" in decay_names) is (not tie)  # a tied head is the embedding: no decay, counted once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_biases_and_frozen_parameters():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    model[3].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.5)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert {tuple(p.shape) for p in no_decay["params"]} == {(10, 4), (4,), (3,)}  # embedding, biases, norm
    assert all(p is not model[3].weight for p in decay["params"] + no_decay["params"])


def test_optimizer_is_foreach_on_cpu_and_set_lr_writes_every_group():
    opt = build_optimizer(tiny_llama(False), lr=1e-3, weight_decay=0.1)
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


def test_optimizer_needs_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(LmforgeError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0)


def test_warmup_is_linear_and_never_zero():
    assert [lr_multiplier(s, 0.0, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 0.0, 4) == 1.0


def test_cosine_endpoints_and_floor():
    assert lr_multiplier(10, 0.0, 0, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 0.5, 0, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(10, 1.0, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10, 3.0, 0, "cosine", 0.1) == pytest.approx(0.1)  # past the horizon: stays at the floor


def test_cosine_matches_transformers_after_warmup():
    transformers = pytest.importorskip("transformers")
    warmup, total = 5, 40
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(warmup, total):
        ours = lr_multiplier(step, (step - warmup) / (total - warmup), warmup, "cosine", min_lr_ratio=0.0)
        assert ours == pytest.approx(sched.lr_lambdas[0](step), abs=1e-12)


def test_wsd_is_flat_then_one_minus_sqrt_cooldown():
    f = [lr_multiplier(100, p / 10, 0, "wsd", min_lr_ratio=0.0, decay_frac=0.2) for p in range(11)]
    assert f[:9] == [1.0] * 9
    assert f[9] == pytest.approx(1 - math.sqrt(0.5)) and f[10] == pytest.approx(0.0)
    assert lr_multiplier(100, 1.0, 0, "wsd", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_constant_and_unknown_schedule():
    assert lr_multiplier(100, 0.9, 10, "constant") == 1.0
    with pytest.raises(LmforgeError, match="unknown schedule"):
        lr_multiplier(0, 0.0, 0, "linear")
