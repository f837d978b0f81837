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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lmforge.common import LmforgeError

HF_BODY_PREFIX = "model."
LM_HEAD = "lm_head.weight"
# Tensors some checkpoints carry that are derived, not learned (old transformers saved RoPE's inv_freq).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_hf_name(name: str) -> str:
    return name if name == LM_HEAD else HF_BODY_PREFIX + name


def from_hf_name(name: str) -> str:
    if name == LM_HEAD:
        return name
    if not name.startswith(HF_BODY_PREFIX):
        raise LmforgeError(f"unexpected tensor name {name!r}: Llama tensors start with {HF_BODY_PREFIX!r}")
    return name[len(HF_BODY_PREFIX):]


def to_hf_state_dict(state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names; the output head is dropped when tied (safetensors cannot store shared tensors,
    and transformers re-ties it from the embedding on load)."""
    return {to_hf_name(name): t for name, t in state.items() if not (tied and name == LM_HEAD)}


def expected_hf_shapes(state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, tuple[int, ...]]:
    """HF name -> shape a checkpoint must hold for a model with this state dict (a meta-device model is enough)."""
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(state, tied).items()}


def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                       where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our names, after checking the set of names and every shape against `expected`.

    A tied checkpoint that still carries lm_head.weight (some exporters write it) is accepted; the copy is
    dropped since the head is the embedding. Anything else missing, extra or misshapen is one LmforgeError.
    """
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
