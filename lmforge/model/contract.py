"""What every decoder's `forward(idx, input_pos=None, cache=None, *, targets=None)` shares (docs/internals.md):
the checks on its inputs and the language-modeling loss of its head. Llama, GPT-2 and the lab decoder call these
so a bad input gets the same one-line error from each, and the fused loss has one dispatch rule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model.losses import linear_cross_entropy


def check_decoder_inputs(name: str, idx: Any, input_pos: torch.Tensor | None, cache: Any, max_seq_len: int) -> None:
    """idx (B, T) integer ids with T >= 1; input_pos shaped like idx (required with a cache); positions below
    max_seq_len. `name` (the model class) starts the error messages."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise LmforgeError(f"{name} expects token ids as an int64 tensor (B, T), got {got}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise LmforgeError(f"{name} expects token ids of shape (B, T) with T >= 1, got {tuple(idx.shape)}")
    if input_pos is None:
        if cache is not None:
            raise LmforgeError(f"{name}: a KV cache needs input_pos (B, T), the absolute position of each token")
        if idx.shape[1] > max_seq_len:
            raise LmforgeError(f"sequence length {idx.shape[1]} exceeds max_seq_len {max_seq_len}")
        return
    if input_pos.shape != idx.shape or input_pos.dtype not in (torch.int64, torch.int32):
        raise LmforgeError(f"input_pos must be an integer tensor shaped like idx {tuple(idx.shape)}, got "
                           f"{input_pos.dtype} {tuple(input_pos.shape)}")
    if not torch.compiler.is_compiling() and int(input_pos.max()) >= max_seq_len:
        raise LmforgeError(f"position {int(input_pos.max())} exceeds max_seq_len {max_seq_len}")


def head_loss(head: nn.Module, x: torch.Tensor, idx: torch.Tensor, targets: Any, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of head(x) for x (B, T, C) against targets (B, T); fused (the logits never formed) unless
    the head was swapped for another module (LoRA, quantized), whose own forward then makes the logits."""
    if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape or targets.is_floating_point():
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets)
        raise LmforgeError(f"targets must be an integer tensor shaped like idx {tuple(idx.shape)}, got {got}")
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(x, head.weight, targets, ignore_index=ignore_index)
    return F.cross_entropy(head(x).float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
