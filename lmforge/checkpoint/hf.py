"""Tensor names between lmforge's Llama and HF `LlamaForCausalLM` checkpoints.

Our modules are named as HF's, minus the `model.` prefix of the decoder body, so the map is mechanical:

    lmforge                                  HF safetensors
    embed_tokens.weight                      model.embed_tokens.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.{input,post_attention}_layernorm.weight   model.layers.{i}.{...}_layernorm.weight
    norm.weight                              model.norm.weight
    lm_head.weight                           lm_head.weight   (absent when tie_word_embeddings, as HF saves it)

q_proj/k_proj need no permutation: our RoPE uses HF's rotate_half convention (see model/layers.py).

Mixtral (`moe=True`) keeps our MoE as `mlp.gate` + `mlp.experts.{e}.{gate,up,down}_proj` and writes the hub's
layout, `block_sparse_moe.gate` + `block_sparse_moe.experts.{e}.{w1,w3,w2}`; on load it also accepts
transformers v5's fused `mlp.experts.gate_up_proj` (E, 2F, C) / `mlp.experts.down_proj` (E, C, F).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from lmforge.common import LmforgeError

HF_BODY_PREFIX = "model."
LM_HEAD = "lm_head.weight"
# Tensors some checkpoints carry that are derived, not learned (old transformers saved RoPE's inv_freq).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


_EXPERT_TO_HF = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT_FROM_HF = {v: k for k, v in _EXPERT_TO_HF.items()}
_OURS_MOE = re.compile(r"^(layers\.\d+\.)mlp\.(gate\.weight|experts\.\d+\.)(?:(gate_proj|up_proj|down_proj)\.weight)?$")
_HF_MOE = re.compile(r"^(layers\.\d+\.)block_sparse_moe\.(gate\.weight|experts\.\d+\.)(?:(w1|w2|w3)\.weight)?$")


def to_hf_name(name: str, moe: bool = False) -> str:
    if name == LM_HEAD:
        return name
    m = _OURS_MOE.match(name) if moe else None
    if m:
        name = f"{m[1]}block_sparse_moe.{m[2]}" + (f"{_EXPERT_TO_HF[m[3]]}.weight" if m[3] else "")
    return HF_BODY_PREFIX + name


def from_hf_name(name: str) -> str:
    if name == LM_HEAD:
        return name
    if not name.startswith(HF_BODY_PREFIX):
        raise LmforgeError(f"unexpected tensor name {name!r}: Llama tensors start with {HF_BODY_PREFIX!r}")
    name = name[len(HF_BODY_PREFIX):]
    m = _HF_MOE.match(name)
    if m:
        name = f"{m[1]}mlp.{m[2]}" + (f"{_EXPERT_FROM_HF[m[3]]}.weight" if m[3] else "")
    return name


def unfuse_experts(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers v5's fused MoE tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, `mlp.gate`)
    -> the hub layout, one w1/w3/w2 per expert (views, no copies); other names pass through."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*layers\.\d+\.)mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$", name)
        if not m:
            out[name] = t
        elif m[2] == "gate.weight":
            out[f"{m[1]}block_sparse_moe.gate.weight"] = t
        elif m[3] == "down_proj":  # (E, C, F)
            out.update({f"{m[1]}block_sparse_moe.experts.{e}.w2.weight": t[e] for e in range(t.shape[0])})
        else:  # gate_up_proj (E, 2F, C): gate rows first, then up
            gate, up = t.chunk(2, dim=1)
            out.update({f"{m[1]}block_sparse_moe.experts.{e}.w1.weight": gate[e] for e in range(t.shape[0])})
            out.update({f"{m[1]}block_sparse_moe.experts.{e}.w3.weight": up[e] for e in range(t.shape[0])})
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], tied: bool, moe: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names; the output head is dropped when tied (safetensors cannot store shared tensors,
    and transformers re-ties it from the embedding on load)."""
    return {to_hf_name(name, moe): t for name, t in state.items() if not (tied and name == LM_HEAD)}


def expected_hf_shapes(state: Mapping[str, torch.Tensor], tied: bool, moe: bool = False) -> dict[str, tuple[int, ...]]:
    """HF name -> shape a checkpoint must hold for a model with this state dict (a meta-device model is enough)."""
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(state, tied, moe).items()}


def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                       where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our names, after checking the set of names and every shape against `expected`.

    A tied checkpoint that still carries lm_head.weight (some exporters write it) is accepted; the copy is
    dropped since the head is the embedding. Anything else missing, extra or misshapen is one LmforgeError.
    """
    if any(".block_sparse_moe." in n for n in expected):
        tensors = unfuse_experts(tensors)
    names = {n for n in tensors if not n.endswith(IGNORED_SUFFIXES)}
    if LM_HEAD not in expected:
        names.discard(LM_HEAD)
    _check_names(missing=set(expected) - names, unexpected=names - set(expected), where=where)
    wrong = [f"{n} {tuple(tensors[n].shape)} != {expected[n]}" for n in sorted(names)
             if tuple(tensors[n].shape) != expected[n]]
    if wrong:
        raise LmforgeError(f"{where}: wrong tensor shapes for this config.json: {_first(wrong)}")
    return {from_hf_name(n): tensors[n] for n in sorted(names)}


def _check_names(missing: set[str], unexpected: set[str], where: str) -> None:
    if missing:
        raise LmforgeError(f"{where}: missing {len(missing)} tensor(s): {_first(sorted(missing))}")
    if unexpected:
        raise LmforgeError(f"{where}: {len(unexpected)} unexpected tensor(s) for a Llama checkpoint: "
                           f"{_first(sorted(unexpected))}")


def _first(items: Iterable[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
