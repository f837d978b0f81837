"""Building blocks of Llama-family decoders: RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP.

Each computes what its Hugging Face counterpart (`transformers/models/llama/modeling_llama.py`) computes, so
HF weights load without any permutation and logits agree to float rounding. RMSNorm and RoPE carry hand-written
backwards (autograd Functions) that save less and allocate fewer temporaries than autograd through their
elementwise chains; tests/model/test_layers.py checks both against HF and with gradcheck.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import kernels
from lmforge.model.kernels import linears


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction.

    As HF `LlamaRMSNorm`: normalize in fp32 (a bf16 sum of squares loses too much), cast back to the input
    dtype, then scale by the weight. The backward is written by hand (`_RMSNormFn`).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        if x.dtype is torch.float32 and self.weight.dtype is torch.float32 and not _wants_grad(x, self.weight):
            y = kernels.rms_norm(x, self.weight, self.eps)  # decode steps: one compiled call
            return y if y is not None else F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return _RMSNormFn.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16/fp32, fp64 stays fp64


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward that keeps only x and the per-row 1/rms for it.

    Autograd through the forward's elementwise chain would save the normalized activations and allocate a
    fresh tensor per op in backward; here the backward makes one activation-sized buffer. With r = 1/rms(x),
    y = w * x * r and dr/dx = -r^3 x / C (C = dim), so
        dx = r * (g * w) - x * r^3 * sum(g * w * x) / C,    dw = sum over rows of g * x * r.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))  # no copy when x is already fp32
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        y = (xf * rstd).to(x.dtype)
        return y.mul_(weight) if y.dtype == weight.dtype else weight * y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        C = x.shape[-1]
        dt = _compute_dtype(x)
        xf, gf, r = x.to(dt).reshape(-1, C), grad.to(dt).reshape(-1, C), rstd.reshape(-1, 1)  # (N, C), (N, 1)
        buf = gf * xf  # (N, C): the one large allocation
        dw = (buf.T @ r).view(C) if ctx.needs_input_grad[1] else None  # sum_n g*x*r as a matrix-vector product
        torch.mul(gf, weight.to(dt), out=buf)  # g * w
        dot = torch.einsum("nc,nc->n", buf, xf).unsqueeze(1)  # (N, 1), batched dot products without a temporary
        buf.mul_(r).addcmul_(xf, dot * r.pow(3) / C, value=-1)  # dx
        return buf.view(x.shape).to(x.dtype), (dw.to(weight.dtype) if dw is not None else None), None


# ---- rotary position embeddings (Su et al. 2021, "RoFormer") ----


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, optionally rescaled for long context by Llama 3.1's rule.

    Computed exactly as HF does (int64 arange cast to fp32, fp32 division), so the tables agree bit for bit.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (D/2,)
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is not None:
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 RoPE scaling: keep high frequencies, divide low ones by `factor`, blend smoothly in between.

    Line for line HF `modeling_rope_utils._compute_llama3_parameters` (itself from Meta's llama-models
    `apply_scaling`): wavelengths shorter than original_len / high_freq_factor are untouched, longer than
    original_len / low_freq_factor are interpolated by `factor`, the band between is a linear blend.
    """
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_tables(max_seq_len: int, head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, each (max_seq_len, head_dim // 2) fp32.

    Half width: HF builds (S, D) tables by repeating the half (`cat((freqs, freqs))`); storing one copy
    halves the memory and `apply_rotary` broadcasts it over both halves.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (S, D/2), same product HF forms per forward
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by position-dependent angles: HF's rotate_half convention.

    x (..., D); cos, sin (..., D/2) broadcastable to x's leading dims. Equals HF's
    `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)` (rotate_half(x) = cat(-x2, x1)) up to one rounding
    (a fused multiply-add), so HF checkpoints need no q/k permutation (Meta's original checkpoints interleave
    pairs and HF permutes them at conversion time).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if _wants_grad(x):
        return _RotaryFn.apply(x, cos, sin)
    y = kernels.rope(x, cos, sin)  # decode steps: one compiled call
    return y if y is not None else _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 cos - x2 sin, x2 cos + x1 sin], written straight into one output (no rotate_half / cat temporaries)."""
    out = torch.empty_like(x)
    (x1, x2), (o1, o2) = x.chunk(2, dim=-1), out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _RotaryFn(torch.autograd.Function):
    """RoPE as an autograd op: a rotation by angle t has the rotation by -t as its transpose, so the backward is
    `_rotate(grad, cos, -sin)` and nothing activation-sized is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class SwiGLU(nn.Module):
    """Gated MLP of Llama: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = linears(x, self.gate_proj, self.up_proj)  # (B, T, F) each; one kernel call when decoding on CPU
        return linears(F.silu(gate) * up, self.down_proj)[0]
