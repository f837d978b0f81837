"""The Llama decoder: token embedding -> n pre-norm blocks -> final RMSNorm -> output head.

    model = Llama(LlamaConfig.from_depth(6, vocab_size=8192))
    logits = model(idx)                                     # (B, T) int64 -> (B, T, V) float32, causal
    logits = model(idx, input_pos=pos, cache=cache)         # cached decoding, see docs/internals.md
    loss = model(idx, targets=y)                            # mean cross-entropy, the (B, T, V) logits never formed
                                                            # (+ coef * load-balancing loss for a MixtralConfig)

Module names follow HF `LlamaForCausalLM` minus its `model.` prefix (embed_tokens, layers.{i}.self_attn.q_proj,
..., norm, lm_head), so the checkpoint name map (lmforge/checkpoint/hf.py) only adds or strips that prefix and
LoRA targets ("q_proj", "v_proj", ...) mean the same thing as in PEFT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.model.attention import Attention
from lmforge.model.config import LlamaConfig
from lmforge.model.contract import check_decoder_inputs, head_loss
from lmforge.model.kernels import linears
from lmforge.model.layers import RMSNorm, SwiGLU, rope_tables
from lmforge.model.moe import MoE, load_balancing_loss


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (as in GPT-2, Llama)."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        n_experts = getattr(cfg, "n_experts", None)  # MixtralConfig: a sparse mixture of SwiGLU experts
        self.mlp = (MoE(cfg.dim, cfg.ffn_dim, n_experts, cfg.n_experts_per_tok) if n_experts
                    else SwiGLU(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any = None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos, mask)  # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # RoPE tables: derived from cfg, so non-persistent (never saved); fp32 whatever the model dtype.
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S_max, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head when cfg.tie_embeddings (Press & Wolf 2017)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the RoPE tables in fp32 (after building on the meta device, or after a cast to bf16)."""
        device = self.embed_tokens.weight.device if device is None else device
        cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling,
                               device=device)
        self.rope_cos, self.rope_sin = cos, sin  # assignment to a registered buffer name stays a buffer

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init (Radford et al. 2019; nanoGPT `_init_weights`): N(0, 0.02) for matrices and embeddings,
        N(0, 0.02 / sqrt(2 * n_layers)) for the projections that write into the residual stream (o_proj,
        down_proj), so the residual's variance does not grow with depth. Norm weights start at 1."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, Block):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(module.self_attn.o_proj.weight, mean=0.0, std=std)
            for mlp in (module.mlp.experts if isinstance(module.mlp, MoE) else [module.mlp]):
                nn.init.normal_(mlp.down_proj.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # `apply` visits children before parents: a Block's projections get 0.02 first, then the scaled std.

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache: Any = None, *,
                targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V) float32; with targets (B, T), the mean cross-entropy instead.

        input_pos (B, T) int64 gives each token's absolute position (negative = left padding); required with a
        cache, optional without (default 0..T-1, and attention stays plain causal over the T tokens).
        targets: the next-token ids; the loss is their mean negative log-likelihood over the targets that are not
        `ignore_index`, as `F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())`, computed by the fused
        chunked head + loss (lmforge/model/losses.py) so the logits are never materialized.
        """
        check_decoder_inputs("Llama", idx, input_pos, cache, self.cfg.max_seq_len)
        if self.rope_cos.dtype != torch.float32:  # a model.to(bfloat16) cast the tables: rebuild at full precision
            self.reset_rope(self.rope_cos.device)
        cos, sin = self._rope(idx.shape[1], input_pos)
        mask = self._mask(idx.shape[1], input_pos, cache)  # once per forward
        x = self.embed_tokens(idx)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, cache, input_pos, mask)
        x = self.norm(x)
        if targets is None:
            return linears(x, self.lm_head)[0].float()  # (B, T, V)
        loss = head_loss(self.lm_head, x, idx, targets, ignore_index)
        coef = getattr(self.cfg, "router_aux_loss_coef", 0.0)
        if coef:  # MoE: the load-balancing loss joins the training loss (as HF's with output_router_logits)
            self.aux_loss = load_balancing_loss([b.mlp.router_logits for b in self.layers], self.cfg.n_experts,
                                                self.cfg.n_experts_per_tok)
            loss = loss + coef * self.aux_loss
        return loss

    def _mask(self, T: int, input_pos: torch.Tensor | None, cache: Any) -> torch.Tensor | None:
        """What each query may see: the cache's mask (B, 1, T, S); without a cache None (plain causal), or a
        (T, T) causal band when a sliding window is shorter than T. A window keeps key positions p with
        query_pos - p < sliding_window, as HF's `sliding_window_overlay` (Mistral, Jiang et al. 2023)."""
        W = self.cfg.sliding_window
        if cache is not None:
            mask = cache.attn_mask(input_pos)  # (B, 1, T, S), slot == position
            if W is not None:
                slots = torch.arange(mask.shape[-1], device=mask.device)  # (S,)
                mask = mask & (slots > input_pos[:, None, :, None] - W)
                mask[..., 0] |= input_pos[:, None, :] < 0  # padding queries keep their one slot (no NaN)
            return mask
        if W is None or T <= W:
            return None
        i = torch.arange(T, device=self.rope_cos.device)  # without a cache, attention is over the T tokens in order
        return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W)  # (T, T): key j <= query i, within W

    def _rope(self, T: int, input_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the tokens: (T, 1, D/2) for positions 0..T-1, else gathered per row (B, T, 1, D/2)."""
        if input_pos is None:
            return self.rope_cos[:T, None, :], self.rope_sin[:T, None, :]
        pos = input_pos.clamp(min=0)  # padding tokens (negative positions) get position 0; their output is unused
        return self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)
