"""Encoder-decoder generation (T5): encode the inputs once, then decode one token per step with two caches.

    for step in generate_seq2seq(model, [[13, 7, 1], [42, 1]], SamplingParams(temperature=0, max_new_tokens=32)):
        print(step)          # one new id per input row, None once that row has finished

The encoder runs once over the right-padded inputs (an attention mask hides the padding; T5's positions are
relative, so each row computes what it would alone). Its states are projected once into every decoder layer's
cross-attention keys and values (`model.cross_attention_cache`); the decoder's own keys and values go into a
`KVCache`, as in `generate`. Every row starts from `decoder_start_token_id` at position 0, so the decoder side
is never padded. Sampling, penalties and stop strings are generate's (`process_logits`, `sample`,
`StopChecker`); the repetition penalty sees the decoder's ids (start token and output), as in transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.common import LmforgeError
from lmforge.infer.generate import RowSampler, eos_ids
from lmforge.infer.kv_cache import KVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import kernels


def pad_inputs(inputs: Sequence[Sequence[int]], pad_id: int, vocab_size: int,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad encoder inputs: ids (B, S) with pad_id after each row, attention mask (B, S) bool."""
    lengths = [len(x) for x in inputs]
    if not inputs or min(lengths) == 0:
        raise LmforgeError("every encoder input needs at least one token")
    ids = torch.full((len(inputs), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[b, : len(x)] = True
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise LmforgeError(f"encoder input has token ids outside the model's vocabulary (0..{vocab_size - 1})")
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_seq2seq(model: torch.nn.Module, input_ids_list: Sequence[Sequence[int]],
                     params: SamplingParams | None = None, *, eos_token_id: int | Sequence[int] | None = None,
                     decoder_start_token_id: int | None = None, token_bytes: Sequence[bytes] | None = None
                     ) -> Iterator[list[int | None]]:
    """Yield one list per step: the new id of each input row, or None for a row that has already finished.

    A row finishes on `eos_token_id` (default: the model config's; pass [] for none), on one of
    `params.stop_token_ids`, when one of `params.stop` strings completes (needs `token_bytes`, the vocabulary
    as bytes), or after `params.max_new_tokens`. `decoder_start_token_id` defaults to the config's.
    """
    params = params or SamplingParams()
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if params.stop and token_bytes is None:
        raise LmforgeError("stop strings need the vocabulary as bytes (token_bytes)")
    start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    if not 0 <= start < cfg.vocab_size:
        raise LmforgeError(f"decoder_start_token_id {start} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    ids, mask = pad_inputs(input_ids_list, cfg.pad_token_id, cfg.vocab_size, device)
    memory = model.cross_attention_cache(model.encode(ids, mask), mask)  # once for the whole generation
    B, n_new = ids.shape[0], params.max_new_tokens
    cache = KVCache((cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim), B, n_new, dtype=dtype, device=device)
    new = torch.full((B,), start, dtype=torch.long, device=device)  # the decoder's first input
    rows = RowSampler(params, new[:, None], cfg.vocab_size, token_bytes=token_bytes,
                      stop_ids=eos_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id))
    for step in range(n_new):
        pos = torch.full((B, 1), step, dtype=torch.long, device=device)
        with kernels.decoding(B):  # small batches: the compiled GEMV's thread pool takes the cores
            logits = model.decode(new[:, None], memory, input_pos=pos, cache=cache)[:, -1]  # (B, V)
        new, out = rows.step(logits)
        yield out
        if rows.all_finished:
            return

def generate_seq2seq_ids(model: torch.nn.Module, input_ids_list: Sequence[Sequence[int]],
                         params: SamplingParams | None = None, **kwargs) -> list[list[int]]:
    """Every row's generated ids (its eos id included when it produced one), after generation ends."""
    outs: list[list[int]] = [[] for _ in input_ids_list]
    for step in generate_seq2seq(model, input_ids_list, params, **kwargs):
        for row, t in zip(outs, step):
            if t is not None:
                row.append(t)
    return outs
