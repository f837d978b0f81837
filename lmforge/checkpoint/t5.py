"""T5 run directories: lmforge's T5 <-> an HF `T5ForConditionalGeneration` checkpoint (config.json + safetensors).

    save_t5(model, cfg, "runs/t5-tiny", meta={"stage": "sft"})
    model, cfg = load_t5("runs/t5-tiny")      # also what transformers' save_pretrained writes (v4 and v5)

The files, atomic writes, sharding and lmforge.json are those of lmforge/checkpoint/run.py (its helpers do the
work); only the config and the names differ, and the names are HF's own (lmforge/model/encdec.py uses them):

    shared.weight                                                        (V, C)
    {encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight    (buckets, H)
    {encoder,decoder}.block.{i}.layer.0.layer_norm.weight
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight, decoder.block.{i}.layer.1.layer_norm.weight
    {encoder,decoder}.block.{i}.layer.{-1}.DenseReluDense.{wi | wi_0, wi_1, wo}.weight, ...layer.{-1}.layer_norm
    {encoder,decoder}.final_layer_norm.weight
    lm_head.weight                                                       (V, C), only when untied

Loading also accepts what transformers has written over the years: `encoder.embed_tokens.weight` /
`decoder.embed_tokens.weight` (copies of `shared`, dropped; the encoder's stands in when `shared` is absent),
the unused `decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` of old checkpoints (dropped),
and a head that a tied config still carries. transformers v5 ties T5's head unless the checkpoint holds its
own `lm_head.weight`, so a head that differs from `shared` is loaded untied (as v5 does), one that equals it
is tied; the rescale follows the config either way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import run  # module access at call time: run.py may import this module back (dispatch)
from lmforge.common import LmforgeError
from lmforge.model.encdec import T5, T5Config

SHARED, LM_HEAD = "shared.weight", "lm_head.weight"
EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # HF aliases of `shared`
UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)  # old checkpoints, never read


# ---- names and shapes ----


def to_hf_state_dict(state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> HF's (the same names); the head is dropped when tied (transformers re-ties it)."""
    return {name: t for name, t in state.items() if not (tied and name == LM_HEAD)}


def expected_hf_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape that a checkpoint of `cfg` must hold (from a meta-device model: nothing allocated)."""
    with torch.device("meta"):
        state = T5(cfg).state_dict()
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(state, cfg.tie_embeddings).items()}


def resolve_tie(tensors: Mapping[str, torch.Tensor], cfg: T5Config) -> T5Config:
    """`cfg` with tie_embeddings as transformers v5 reads a checkpoint: a tied config whose file carries its own
    `lm_head.weight`, different from `shared.weight`, loads untied (the rescale is the config's either way)."""
    head, shared = tensors.get(LM_HEAD), tensors.get(SHARED, tensors.get(EMBED_COPIES[0]))
    if (cfg.tie_embeddings and head is not None and shared is not None
            and (head.shape != shared.shape or not torch.equal(head, shared))):
        return dataclasses.replace(cfg, tie_embeddings=False)
    return cfg


def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], cfg: T5Config, where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict, after checking names and shapes against `cfg` (call `resolve_tie` first).

    Missing, unexpected or misshapen tensors are one LmforgeError naming the first few.
    """
    expected = expected_hf_shapes(cfg)
    found = {name: t for name, t in tensors.items() if name not in EMBED_COPIES + UNUSED}
    if SHARED not in found and EMBED_COPIES[0] in tensors:  # an encoder copy is all the file has of `shared`
        found[SHARED] = tensors[EMBED_COPIES[0]]
    if cfg.tie_embeddings:
        found.pop(LM_HEAD, None)  # equal to `shared` (resolve_tie): the tie is exact
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise LmforgeError(f"{where}: missing {len(missing)} tensor(s): {_first(missing)}")
    if unexpected:
        raise LmforgeError(f"{where}: {len(unexpected)} unexpected tensor(s) for this T5 config.json: "
                           f"{_first(unexpected)}")
    wrong = [f"{n} {tuple(found[n].shape)} != {expected[n]}" for n in sorted(found)
             if tuple(found[n].shape) != expected[n]]
    if wrong:
        raise LmforgeError(f"{where}: wrong tensor shapes for this config.json: {_first(wrong)}")
    return found


def _first(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---- save / load ----


def save_t5(model: torch.nn.Module, cfg: T5Config, run_dir: str | os.PathLike, tokenizer: Any = None,
            meta: dict[str, Any] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` (a T5 built from `cfg`) as a run directory that transformers opens as
    T5ForConditionalGeneration.

    Same files and guarantees as `save_run`: config.json, model.safetensors (sharded above max_shard_bytes,
    default 5 GiB as there), tokenizer files when given a tokenizer, lmforge.json (`meta` merged over its
    defaults); every file written atomically.
    """
    run_dir = Path(run_dir)
    model = run._unwrap(model)
    tensors = to_hf_state_dict(model.state_dict(), cfg.tie_embeddings)
    from_hf_state_dict(tensors, cfg, where=f"save_t5({run_dir})")  # model and cfg must agree
    return run.write_run_files(run_dir, tensors, cfg.to_hf, tokenizer, meta, max_shard_bytes)


def load_t5_config(run_dir: str | os.PathLike) -> T5Config:
    """The T5Config of a run directory's config.json (before `resolve_tie` looks at the weights)."""
    return T5Config.from_hf(run._read_json(run._existing_dir(run_dir) / run.CONFIG))


def load_t5(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[T5, T5Config]:
    """Build the T5 a run directory describes and fill it with its weights; returns (model, cfg) in eval mode.

    Built on the meta device (no random init of weights about to be overwritten), then the checked tensors are
    assigned. `dtype` casts the weights (default: as stored).
    """
    run_dir = run._existing_dir(run_dir)
    tensors = run.load_tensors(run_dir, device=device)
    cfg = resolve_tie(tensors, load_t5_config(run_dir))
    state = from_hf_state_dict(tensors, cfg, where=str(run_dir))
    return run.assign_weights(T5, cfg, state, dtype).eval(), cfg
