"""Perplexity, mean negative log-likelihood and bits per byte: THE one implementation (training validation uses it).

    from lmforge.eval.perplexity import perplexity
    perplexity(model, token_ids, seq_len=512, stride=256)     # long text, strided sliding window
    perplexity(model, [(x, y), ...])                          # ready-made batches; y == -100 is ignored

`nll` is the mean over predicted tokens of -log p(token | context), natural log; `perplexity` = exp(nll).
Long texts are scored with a sliding window as in the Hugging Face perplexity guide, except that every
token after the first is scored exactly once: a window of `seq_len` inputs moves by `stride`, and only
its targets not scored by an earlier window count, so each gets at least `seq_len - stride + 1` tokens of
context (all of it near the start); the last window is right-aligned to the end of the text, so it is
full length too. `stride == seq_len` gives (nearly) disjoint windows, the cheapest setting.

Bits per byte normalizes away the tokenizer: total nll / ln 2 / bytes of the scored text. With
`token_bytes` (bytes per vocabulary id) it is exact per target; tokens of 0 bytes (special tokens such
as an end-of-text separator) are left out of both sums, as nanochat's `evaluate_bpb` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError

IGNORE_INDEX = -100  # label value that is not scored (the Hugging Face / PyTorch convention)


class _Totals:
    """Running float64 sums, so millions of tokens add up without float32 drift."""

    def __init__(self, token_bytes: torch.Tensor | None):
        self.token_bytes = token_bytes
        self.nll = 0.0
        self.tokens = 0
        self.nll_with_bytes = 0.0
        self.bytes = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Score (B, T, V) logits against (B, T) targets."""
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        self.add_nll(nll, y)

    def add_nll(self, nll: torch.Tensor, y: torch.Tensor) -> None:
        """Add per-target negative log-likelihoods (shaped like y; ignored targets are skipped)."""
        nll = nll.flatten()
        keep = y.flatten() != IGNORE_INDEX
        self.nll += nll[keep].double().sum()  # device tensors: no host sync per batch
        self.tokens += keep.sum()
        if self.token_bytes is not None:
            nbytes = self.token_bytes[y.flatten().clamp(min=0)] * keep
            self.nll_with_bytes += nll[nbytes > 0].double().sum()
            self.bytes += nbytes.sum()

    def result(self, n_bytes: int | None) -> dict:
        self.nll, self.tokens, self.nll_with_bytes = float(self.nll), int(self.tokens), float(self.nll_with_bytes)
        self.bytes = int(self.bytes)
        if self.tokens == 0:
            raise LmforgeError("perplexity: no tokens to score (every label is ignored or the data is empty)")
        mean = self.nll / self.tokens
        out = {"perplexity": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": self.tokens}
        if self.token_bytes is not None and self.bytes > 0:
            out["bits_per_byte"] = self.nll_with_bytes / math.log(2) / self.bytes
        elif n_bytes:
            out["bits_per_byte"] = self.nll / math.log(2) / n_bytes
        return out


def sliding_windows(n_tokens: int, seq_len: int, stride: int, align_last: bool = True) -> list[tuple[int, int, int]]:
    """(begin, end, scored_after) per window over a text of `n_tokens` ids.

    A window's inputs are ids[begin:end] and its targets ids[begin+1:end+1]; a target at absolute index j
    counts only if j > scored_after, so targets 1..n_tokens-1 are each scored exactly once, each with at
    least min(j, seq_len - stride + 1) tokens of context. Every window has min(seq_len, n_tokens - 1) inputs.
    `align_last=False` starts the last window at its multiple of `stride` like the others (shorter, less
    context): exactly the windows of the Hugging Face perplexity guide's loop with max_length = seq_len + 1.
    """
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise LmforgeError(f"need 1 <= stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    windows, begin, scored = [], 0, 0
    last = n_tokens - 1  # index of the last target
    while scored < last:
        end = min(begin + seq_len, last)
        start = max(0, end - seq_len) if align_last else begin  # right-aligned: full context, the same length
        windows.append((start, end, scored))
        scored = end
        begin += stride
    return windows


def _window_batches(ids: torch.Tensor, seq_len: int, stride: int, batch_size: int, align_last: bool = True):
    """Yield (x, y) batches of windows of one length, already-scored targets masked with IGNORE_INDEX."""
    windows = sliding_windows(len(ids), seq_len, stride, align_last)
    chunks: list[list[tuple[int, int, int]]] = []
    for w in windows:  # consecutive windows of equal length share a batch (only a short last window differs)
        if chunks and len(chunks[-1]) < batch_size and chunks[-1][0][1] - chunks[-1][0][0] == w[1] - w[0]:
            chunks[-1].append(w)
        else:
            chunks.append([w])
    for chunk in chunks:
        x = torch.stack([ids[b:e] for b, e, _ in chunk])
        y = torch.stack([ids[b + 1:e + 1] for b, e, _ in chunk])
        for row, (b, _, scored) in enumerate(chunk):
            y[row, :max(0, scored - b)] = IGNORE_INDEX  # targets b+1..scored were scored by earlier windows
        yield x, y


def _as_token_tensor(data) -> torch.Tensor | None:
    """The data as a 1-D int64 tensor if it is a flat token sequence, else None (it is a batch iterable)."""
    if isinstance(data, torch.Tensor):
        return data.long() if data.ndim == 1 else None
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data.astype(np.int64)) if data.ndim == 1 else None
    if isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], (int, np.integer)):
        return torch.tensor(list(data), dtype=torch.long)
    return None


def _is_encoder_decoder(model: nn.Module) -> bool:
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "shift_right", None))


def _encdec_logits(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder (T5) scores a window's targets as its output for an empty input (`</s>` alone): the
    decoder is the language model, teacher-forced with the targets shifted right. Logits (B, T, V)."""
    eos = model.cfg.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    src = torch.full((y.shape[0], 1), eos, dtype=torch.long, device=y.device)
    return model(src, model.shift_right(y))


def _default_seq_len(model: nn.Module) -> int:
    if _is_encoder_decoder(model):
        return 512  # T5's pretraining target length; relative positions set no hard limit
    for name in ("config", "cfg"):
        value = getattr(getattr(model, name, None), "max_seq_len", None)
        if value:
            return int(value)
    raise LmforgeError("perplexity: give seq_len (the model does not say its max_seq_len)")


def perplexity(model: nn.Module, data, *, seq_len: int | None = None, stride: int | None = None,
               batch_size: int = 8, token_bytes: Sequence[int] | torch.Tensor | None = None,
               n_bytes: int | None = None, max_tokens: int | None = None, align_last: bool = True) -> dict:
    """Score `data` with `model` (`model(x) -> (B, T, V)` logits) and return perplexity, nll, tokens[, bits_per_byte].

    `data` is either a flat sequence of token ids (list, 1-D array or tensor), scored with the sliding
    window described in the module docstring (`seq_len` defaults to the model's max_seq_len, `stride`
    to `seq_len`; `max_tokens` caps the targets scored), or an iterable of `(x, y)` int batches of shape
    (B, T) with y == -100 where a position is not scored (`align_last=False`: the Hugging Face guide's windows,
    see `sliding_windows`). `token_bytes[id]` (bytes per vocabulary id) or
    `n_bytes` (bytes of the scored text) adds bits_per_byte. The model runs in eval mode without gradients
    (its train/eval mode is restored); autocast, if any, is the caller's (the training loop sets it).
    """
    device = next(model.parameters()).device
    table = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.long, device=device)
    ids = _as_token_tensor(data)
    if ids is not None:
        if max_tokens is not None:
            ids = ids[:max_tokens + 1]
        if len(ids) < 2:
            raise LmforgeError(f"perplexity: need at least 2 tokens, got {len(ids)}")
        seq_len = seq_len or _default_seq_len(model)
        batches: Iterable = _window_batches(ids, seq_len, stride or seq_len, batch_size, align_last)
    else:
        batches = data
    totals = _Totals(table)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                totals.add(_encdec_logits(model, y) if _is_encoder_decoder(model) else model(x), y)
    finally:
        model.train(was_training)
    return totals.result(n_bytes)


def token_byte_lengths(tokenizer: Any) -> list[int]:
    """UTF-8 bytes of every id of a BPETokenizer (0 for special tokens and unused ids): `token_bytes` above."""
    specials = set(tokenizer.special_tokens.values())
    lengths = []
    for i in range(tokenizer.vocab_size):
        try:
            lengths.append(0 if i in specials else len(tokenizer.token_bytes(i)))
        except LmforgeError:  # a hole in the id range
            lengths.append(0)
    return lengths


def unigram_perplexity(counts: Sequence[int] | np.ndarray, tokens: Sequence[int] | np.ndarray | torch.Tensor,
                       token_bytes: Sequence[int] | None = None) -> dict:
    """The baseline a language model must beat: each token scored by its frequency alone, ignoring context.

    p(id) = (counts[id] + 1) / (sum(counts) + V) (add-one / Laplace smoothing, so unseen ids keep some mass);
    the targets are tokens[1:], the same ones `perplexity` scores, so the two numbers compare directly.
    Returns the same keys as `perplexity`.
    """
    counts = np.asarray(counts, dtype=np.float64)
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[1:]
    if len(ids) == 0:
        raise LmforgeError("unigram baseline: need at least 2 tokens")
    logp = torch.from_numpy(np.log(counts + 1.0) - np.log(counts.sum() + len(counts)))
    totals = _Totals(None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.long))
    totals.add_nll(-logp[ids], ids)
    return totals.result(None)
