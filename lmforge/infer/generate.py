"""Autoregressive generation with a KV cache (gpt-fast style): prefill the prompt once, then one cheap
decode step per new token. `generate` is a generator of ids so callers can stream; it never sees text.

Batched prompts of different lengths are left-padded; each row keeps its own positions 0..L_b-1 (padding
gets position -1 and is never written to the cache), so every row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.common import LmforgeError
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams, make_generator, process_logits, sample
from lmforge.infer.stopping import StopChecker
from lmforge.model import kernels


def prefill(model: torch.nn.Module, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the whole (left-padded) prompt through the model, filling the cache; logits of the last column."""
    return model(ids, input_pos=input_pos, cache=cache)[:, -1]  # (B, V)


def decode_step(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row: ids (B,), pos (B,) -> logits (B, V)."""
    with kernels.decoding(ids.shape[0]):  # small batches: the compiled GEMV's thread pool takes the cores
        return model(ids[:, None], input_pos=pos[:, None], cache=cache)[:, -1]


def _pack_prompts(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts: ids (B, T), positions (B, T) with -1 on padding, lengths (B,)."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise LmforgeError("every prompt needs at least one token")
    B, T = len(prompts), max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.full((B, T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        pos[b, T - len(p):] = torch.arange(len(p))
        ids[b, : T - len(p)] = p[0]  # padding repeats a real token: harmless for repetition penalties
    return ids.to(device), pos.to(device), torch.tensor(lengths, device=device)


class RowSampler:
    """Per-row state of one generation, shared by decoder-only and encoder-decoder decoding: the logits
    processors' history and counts (kept only when a penalty is on), stop ids and stop strings, finished rows."""

    def __init__(self, params: SamplingParams, history: torch.Tensor, vocab_size: int, stop_ids: Sequence[int],
                 token_bytes: Sequence[bytes] | None):
        B, device = history.shape[0], history.device
        self.params = params
        self.generator = make_generator(params.seed, device)
        self.stop_ids = set(params.stop_token_ids or ()) | set(stop_ids)
        self.checkers = [StopChecker(params.stop, token_bytes, ()) for _ in range(B)] if params.stop else None
        # (B, L + steps) ids so far, for the repetition penalty; output-token counts for frequency / presence
        self.history = history if params.repetition_penalty != 1.0 else None
        track_counts = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
        self.counts = torch.zeros(B, vocab_size, dtype=torch.long, device=device) if track_counts else None
        self.rows = torch.arange(B, device=device)
        self.finished = [False] * B

    @property
    def all_finished(self) -> bool:
        return all(self.finished)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[int | None]]:
        """Sample one id per row from logits (B, V): (ids (B,), the new id of each unfinished row or None)."""
        new = sample(process_logits(logits.float(), self.params, self.history, self.counts), self.params,
                     self.generator)  # (B,)
        out: list[int | None] = []
        for b, t in enumerate(new.tolist()):
            if self.finished[b]:
                out.append(None)
                continue
            out.append(t)
            if t in self.stop_ids or (self.checkers is not None and self.checkers[b].feed(t).stopped):
                self.finished[b] = True
        if self.counts is not None:
            self.counts[self.rows, new] += 1
        if self.history is not None:
            self.history = torch.cat([self.history, new[:, None]], dim=1)
        return new, out


def eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """A config's eos id(s) as a list (Llama 3 configs give several)."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                   *, eos_token_id: int | Sequence[int] | None = None, token_bytes: Sequence[bytes] | None = None
                   ) -> Iterator[list[int | None]]:
    """Yield one list per step: the new id of each row, or None for a row that has already finished.

    A row finishes on `eos_token_id`, on one of `params.stop_token_ids`, or when one of `params.stop`
    strings completes (needs `token_bytes`, the vocabulary as bytes), or after `params.max_new_tokens`.
    """
    params = params or SamplingParams()
    cfg = model.cfg
    vocab = cfg.vocab_size
    device = next(model.parameters()).device
    ids, pos, lengths = _pack_prompts(prompts, device)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise LmforgeError(f"prompt has token ids outside the model's vocabulary (0..{vocab - 1})")
    B, T = ids.shape
    n_new = params.max_new_tokens
    if T + n_new > cfg.max_seq_len:
        raise LmforgeError(f"prompt ({T} tokens) + max_new_tokens ({n_new}) exceeds the model's context "
                           f"({cfg.max_seq_len})")
    if params.stop and token_bytes is None:
        raise LmforgeError("stop strings need the vocabulary as bytes (token_bytes)")
    cache = KVCache(cfg, B, T + n_new, dtype=next(model.parameters()).dtype, device=device)
    rows = RowSampler(params, ids, vocab, stop_ids=eos_ids(eos_token_id), token_bytes=token_bytes)
    logits = prefill(model, ids, pos, cache)
    next_pos = lengths.clone()
    for step in range(n_new):
        new, out = rows.step(logits)
        yield out
        if rows.all_finished or step == n_new - 1:
            return
        logits = decode_step(model, new, next_pos, cache)
        next_pos += 1


def generate(model: torch.nn.Module, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
             eos_token_id: int | Sequence[int] | None = None,
             token_bytes: Sequence[bytes] | None = None) -> Iterator[int]:
    """Stream the new ids for one prompt (the prompt itself is not repeated)."""
    for step in generate_batch(model, [prompt_ids], params, eos_token_id=eos_token_id, token_bytes=token_bytes):
        if step[0] is None:
            return
        yield step[0]
