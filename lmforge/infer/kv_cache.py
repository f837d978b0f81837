"""A preallocated key/value cache: the object behind the model's KV-cache hook (docs/internals.md).

    cache = KVCache(cfg, batch_size=B, max_len=S, dtype=torch.float32, device="cpu")
    logits = model(prompt, input_pos=pos, cache=cache)        # prefill: pos (B, T), -1 for left padding
    logits = model(next_ids, input_pos=pos[:, -1:] + 1, cache=cache)   # one decode step

As in gpt-fast's `KVCache`, each layer owns fixed (B, H_kv, S, D) tensors and a token's keys and values are
written at slot == its absolute position in its row, so rows of a batch advance independently and nothing is
ever reallocated. Differences: positions are per row (batched prompts of different lengths), padding tokens
(position < 0) are never written, and the cache tracks which slots hold data so the mask needs nothing else.

Padding writes go to one extra "trash" slot at index S (sliced off what `update` returns): a scatter with fixed
shapes, no boolean indexing, no host sync.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.common import LmforgeError


def _dims(cfg_or_dims: Any) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) from a model config or a plain tuple / dict of those three."""
    if isinstance(cfg_or_dims, (tuple, list)) and len(cfg_or_dims) == 3:
        dims = tuple(cfg_or_dims)
    elif isinstance(cfg_or_dims, dict):
        dims = tuple(cfg_or_dims.get(k) for k in ("n_layers", "n_kv_heads", "head_dim"))
    else:
        dims = tuple(getattr(cfg_or_dims, k, None) for k in ("n_layers", "n_kv_heads", "head_dim"))
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise LmforgeError(f"KVCache needs n_layers, n_kv_heads, head_dim (a model config or a 3-tuple), got "
                           f"{cfg_or_dims!r}")
    return dims  # type: ignore[return-value]


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` positions each."""

    def __init__(self, cfg_or_dims: Any, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.n_layers, self.n_kv_heads, self.head_dim = _dims(cfg_or_dims)
        if batch_size <= 0 or max_len <= 0:
            raise LmforgeError(f"KVCache needs batch_size and max_len > 0, got {batch_size} and {max_len}")
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, self.n_kv_heads, max_len + 1, self.head_dim)  # + 1: the trash slot for padding
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.written = torch.zeros(batch_size, max_len + 1, dtype=torch.bool, device=device)  # (B, S + 1)
        self._slots = torch.arange(max_len, device=device)  # (S,)

    def reset(self) -> None:
        """Forget every row (the tensors are kept; stale values are unreachable once `written` is cleared)."""
        self.written.zero_()

    def n_bytes(self) -> int:
        """Memory held by the key and value tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _slot_index(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(B, T) slot of each token: its position, or the trash slot S for padding (position < 0)."""
        return torch.where(input_pos >= 0, input_pos, self.max_len)

    def attn_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Bool (B, 1, T, S), True = may attend: slot written (now or before) and slot <= the query's position.

        Called once per forward, before the layers' `update`s; it records the new tokens' slots as written.
        A padding query (position < 0) attends to slot 0 only, so its softmax has one finite entry (no NaN).
        """
        self._check_pos(input_pos)
        self.written.scatter_(1, self._slot_index(input_pos), True)
        # Only slots up to the largest position in this forward can be attended: attend over that prefix, so a
        # decode step costs O(tokens so far), not O(max_len).
        self._active = max(1, int(input_pos.max()) + 1)
        written = self.written[:, None, None, : self._active]  # (B, 1, 1, S)
        pos = input_pos[:, None, :, None]  # (B, 1, T, 1)
        mask = written & (self._slots[: self._active] <= pos)  # (B, 1, T, S)
        mask[..., 0] |= pos[..., 0] < 0
        return mask

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at slot == position per row; return the active slots (B, H_kv, S, D),
        S = 1 + the largest position of this forward (as set by `attn_mask`)."""
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch_size, self.n_kv_heads, self.head_dim) or input_pos.shape != (B, T):
            raise LmforgeError(f"KVCache(batch={self.batch_size}, kv_heads={self.n_kv_heads}, "
                               f"head_dim={self.head_dim}) got k {tuple(k.shape)}, input_pos {tuple(input_pos.shape)}")
        index = self._slot_index(input_pos)[:, None, :, None].expand(B, H, T, D)
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
        active = getattr(self, "_active", self.max_len)
        return k_cache[:, :, :active], v_cache[:, :, :active]

    def _check_pos(self, input_pos: torch.Tensor) -> None:
        if input_pos.dim() != 2 or input_pos.shape[0] != self.batch_size:
            raise LmforgeError(f"input_pos must be (batch={self.batch_size}, T), got {tuple(input_pos.shape)}")
        if not torch.compiler.is_compiling() and int(input_pos.max()) >= self.max_len:
            raise LmforgeError(f"position {int(input_pos.max())} does not fit the KV cache (max_len {self.max_len})")
