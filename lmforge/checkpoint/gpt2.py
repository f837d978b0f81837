"""GPT-2 run directories: lmforge's GPT2 <-> an HF `GPT2LMHeadModel` checkpoint (config.json + safetensors).

    save_gpt2(model, cfg, "runs/gpt2-tiny", tokenizer=tok, meta={"stage": "pretrain"})
    model, cfg = load_gpt2("runs/gpt2-tiny")     # also what transformers' save_pretrained writes

The files, atomic writes, sharding and lmforge.json are those of lmforge/checkpoint/run.py (its helpers do the
work); only the config and the tensor names differ. Ours are HF's minus the `transformer.` prefix, and the four
projection weights per block are transposed, because HF's GPT-2 uses `Conv1D` (weight (in, out), y = x W + b,
a leftover of OpenAI's TensorFlow code) where we use `nn.Linear` (weight (out, in)):

    lmforge                                   HF safetensors
    wte.weight, wpe.weight                    transformer.wte.weight, transformer.wpe.weight
    h.{i}.ln_{1,2}.{weight,bias}              transformer.h.{i}.ln_{1,2}.{weight,bias}
    h.{i}.attn.c_attn.weight    (3C, C)       transformer.h.{i}.attn.c_attn.weight    (C, 3C)    transposed
    h.{i}.attn.c_proj.weight    (C, C)        transformer.h.{i}.attn.c_proj.weight    (C, C)     transposed
    h.{i}.mlp.c_fc.weight       (F, C)        transformer.h.{i}.mlp.c_fc.weight       (C, F)     transposed
    h.{i}.mlp.c_proj.weight     (C, F)        transformer.h.{i}.mlp.c_proj.weight     (F, C)     transposed
    h.{i}.{attn,mlp}.*.bias                   transformer.h.{i}.{attn,mlp}.*.bias
    ln_f.{weight,bias}                        transformer.ln_f.{weight,bias}
    lm_head.weight              (V, C)        lm_head.weight (an nn.Linear in HF too; absent when tied)

Loading also accepts what older checkpoints hold: names without `transformer.` (saved from `GPT2Model`, as the
original OpenAI upload), the causal-mask buffers `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` that older
transformers releases saved (derived: dropped), and a tied checkpoint that still carries `lm_head.weight` (the
copy is dropped).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import run  # module access at call time: run.py may import this module back (dispatch)
from lmforge.common import LmforgeError
from lmforge.model.gpt2 import GPT2, GPT2Config

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # old transformers' persistent causal-mask buffers


# ---- names and layouts ----


def to_hf_state_dict(state: Mapping[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names and Conv1D layout; the head is dropped when tied (transformers re-ties it)."""
    out = {}
    for name, t in state.items():
        if name == LM_HEAD:
            if not tied:
                out[name] = t
            continue
        out[PREFIX + name] = t.t() if name.endswith(CONV1D) else t
    return out


def expected_hf_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape that a checkpoint of `cfg` must hold (from a meta-device model: nothing allocated)."""
    with torch.device("meta"):
        state = GPT2(cfg).state_dict()
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(state, cfg.tie_embeddings).items()}


def from_hf_state_dict(tensors: Mapping[str, torch.Tensor], cfg: GPT2Config, where: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our names and layout (contiguous), after checking names and shapes against `cfg`.

    Missing, unexpected or misshapen tensors are one LmforgeError naming the first few (by HF name).
    """
    expected = expected_hf_shapes(cfg)
    found: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        canon = name if name == LM_HEAD or name.startswith(PREFIX) else PREFIX + name  # GPT2Model saves unprefixed
        if MASK_BUFFER.fullmatch(canon.removeprefix(PREFIX)) or (canon == LM_HEAD and LM_HEAD not in expected):
            continue
        if canon in found:
            raise LmforgeError(f"{where}: tensor {canon!r} appears both with and without the {PREFIX!r} prefix")
        found[canon] = t
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise LmforgeError(f"{where}: missing {len(missing)} tensor(s): {_first(missing)}")
    if unexpected:
        raise LmforgeError(f"{where}: {len(unexpected)} unexpected tensor(s) for a GPT-2 checkpoint: "
                           f"{_first(unexpected)}")
    wrong = [f"{n} {tuple(found[n].shape)} != {expected[n]}" for n in sorted(found)
             if tuple(found[n].shape) != expected[n]]
    if wrong:
        raise LmforgeError(f"{where}: wrong tensor shapes for this config.json: {_first(wrong)}")
    state = {}
    for name, t in found.items():
        ours = name.removeprefix(PREFIX)
        state[ours] = t.t().contiguous() if ours.endswith(CONV1D) else t  # contiguous: the CPU kernels need it
    return state


def _first(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---- save / load ----


def save_gpt2(model: torch.nn.Module, cfg: GPT2Config, run_dir: str | os.PathLike, tokenizer: Any = None,
              meta: dict[str, Any] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` (a GPT2 built from `cfg`) as a run directory that transformers opens as GPT2LMHeadModel.

    Same files and guarantees as `save_run`: config.json, model.safetensors (sharded above max_shard_bytes,
    default 5 GiB as there), tokenizer files when given a tokenizer, lmforge.json (`meta` merged over its
    defaults); every file written atomically.
    """
    run_dir = Path(run_dir)
    model = run._unwrap(model)
    tensors = to_hf_state_dict(model.state_dict(), cfg.tie_embeddings)
    from_hf_state_dict(tensors, cfg, where=f"save_gpt2({run_dir})")  # model and cfg must agree
    return run.write_run_files(run_dir, tensors, cfg.to_hf, tokenizer, meta, max_shard_bytes)


def load_gpt2_config(run_dir: str | os.PathLike) -> GPT2Config:
    """The GPT2Config of a run directory's config.json."""
    return GPT2Config.from_hf(run._read_json(run._existing_dir(run_dir) / run.CONFIG))


def load_gpt2(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> tuple[GPT2, GPT2Config]:
    """Build the GPT2 a run directory describes and fill it with its weights; returns (model, cfg) in eval mode.

    Built on the meta device (no random init of weights about to be overwritten), then the checked tensors are
    assigned. `dtype` casts the weights (default: as stored).
    """
    run_dir = run._existing_dir(run_dir)
    cfg = load_gpt2_config(run_dir)
    state = from_hf_state_dict(run.load_tensors(run_dir, device=device), cfg, where=str(run_dir))
    return run.assign_weights(GPT2, cfg, state, dtype).eval(), cfg
