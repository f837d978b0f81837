"""Sparse mixture of experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): a router sends each token to its
top-k SwiGLU experts and mixes their outputs by the renormalized router probabilities.

    moe = MoE(dim=64, hidden_dim=96, n_experts=8, top_k=2)
    y = moe(x)                          # (B, T, C) -> (B, T, C); moe.router_logits: (B*T, E) of this call
    aux = load_balancing_loss([moe.router_logits], n_experts=8, top_k=2)

Computes what HF `MixtralSparseMoeBlock` computes (softmax in fp32, top-k, weights renormalized to sum to 1,
each expert run on just the tokens routed to it); `load_balancing_loss` is the Switch Transformer auxiliary
loss (Fedus et al. 2021, eqs. 4-6) exactly as HF's `load_balancing_loss_func` computes it for Mixtral.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers import SwiGLU


class MoE(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(dim, hidden_dim) for _ in range(n_experts))
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward, for the auxiliary loss

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), top-k expert ids (N, k), their mixing weights (N, k) in x's dtype."""
        logits = self.gate(x)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalized over the chosen k (Mixtral)
        return logits, experts, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits, experts, weights = self.route(flat)
        self.router_logits = logits
        out = torch.zeros_like(flat)
        # Each expert sees only its tokens: (token, slot) pairs where that expert was chosen.
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)  # (n_e,) each
            y = self.experts[e](flat[token]) * weights[token, slot, None]  # (n_e, C)
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(B, T, C)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style balance loss over all layers: E * sum_e (fraction of top-k picks to e) * (mean prob of e).

    router_logits: one (N, E) tensor per MoE layer. Fractions and mean probabilities are pooled over every
    layer's rows, as HF's `load_balancing_loss_func` does (without an attention mask). 1.0 * top_k when the
    routing is perfectly uniform; it grows as the router favours a few experts.
    """
    logits = torch.cat([t.float() for t in router_logits], dim=0)  # (L*N, E)
    probs = F.softmax(logits, dim=-1)
    picks = torch.topk(probs, top_k, dim=-1).indices  # (L*N, k)
    counts = torch.zeros(n_experts, device=logits.device).index_add_(
        0, picks.reshape(-1), torch.ones(picks.numel(), device=logits.device))
    rows = logits.shape[0]
    return n_experts * torch.sum((counts / rows) * (probs.sum(dim=0) / rows))
