"""Causal self-attention with rotary embeddings: multi-head, grouped-query and multi-query by `n_kv_heads`.

n_kv_heads == n_heads is MHA (Vaswani et al. 2017), 1 is MQA (Shazeer 2019), in between GQA (Ainslie et al.
2023): each group of n_heads // n_kv_heads query heads shares one key/value head. Projections are named as in
HF `LlamaAttention` (q_proj, k_proj, v_proj, o_proj) so checkpoints map one to one.

Two paths: without a cache, SDPA with `is_causal=True` (the training fast path, no mask tensor built); with a
cache (see docs/internals.md, "The KV-cache hook"), keys and values go through `cache.update` and the
boolean mask from `cache.attn_mask` decides what each query sees.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import kernels
from lmforge.model.config import LlamaConfig
from lmforge.model.kernels import linears
from lmforge.model.layers import apply_rotary

SMALL_QUERY = 8  # decode steps (and short appends) take the explicit path below


def small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for a few queries against a cache: q (B, H, T, D), k/v (B, Hkv, S, D),
    mask (B, 1, T, S) bool -> (B, H, T, D). The same math as SDPA, but for T of 1 two small matmuls beat SDPA's
    CPU flash kernel, which pays ~10 ms per call to set up a masked tile loop. Query heads are grouped onto
    their kv head by a view (GQA), so keys and values are never copied."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, D)  # heads h = kv * G + g, as repeat_interleave would pair them
    scores = (qg @ k.transpose(-1, -2)).view(B, Hkv, G, T, S) * D**-0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask (B, 1, 1, T, S)
    y = scores.softmax(dim=-1).view(B, Hkv, G * T, S) @ v  # (B, Hkv, G*T, D)
    return y.view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the cache's slot for this layer's keys and values
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any = None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); cos/sin (T, 1, D/2) or (B, T, 1, D/2); mask bool, (B, 1, T, S) with a cache, else None
        (plain causal) or (T, T) for a sliding window."""
        B, T, _ = x.shape
        # Rotate in the (B, T, H, D) layout the projection produces, then view heads-first for SDPA: the
        # transposes are free strides, no copies.
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)  # one kernel call when decoding on CPU
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, Hkv, S, D)
            y = kernels.attention(q, k, v, mask) if T == 1 else None  # decode steps: one compiled call
            if y is not None:
                pass
            elif T <= SMALL_QUERY:
                y = small_query_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self._gqa)
        elif mask is not None:  # a sliding window shorter than T: an explicit (T, T) mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self._gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self._gqa)  # (B, H, T, D)
        return linears(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), self.o_proj)[0]

    @property
    def _gqa(self) -> bool:
        # SDPA broadcasts each kv head over its query group itself (checked equal to repeat_interleave on CPU
        # in tests/model/test_attention.py), so no (B, H, S, D) copies of the keys and values are made.
        return self.n_kv_heads != self.n_heads
