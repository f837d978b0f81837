"""Small-batch fp32 matrix-vector products on CPU, for decoding: `x @ W.T` for a few rows of x.

Decoding one token reads every weight once, so its speed is memory bandwidth. The compiled kernel
(`_cpu.c`, AVX2/FMA, a persistent thread pool) streams the weights near this machine's read bandwidth,
about twice what torch's CPU GEMV manages here. `gemv` returns None when it does not apply (no compiled core
or no AVX2, not CPU fp32, more than MAX_ROWS rows, gradients wanted, tracing) and callers then use
`F.linear`; `LMFORGE_CPU_KERNELS=0` in the environment turns all of them off.

Threads: outside `decoding()` the kernel runs on the calling thread alone. Inside it, torch's intra-op pool is
parked at one thread and the kernel's own pool takes the cores instead: two pools that both spin-wait on the
same cores make each other wait for time slices (measured: 2-3x slower decoding than either pool alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

try:  # the compiled core is optional (setup.py builds it when a C compiler is present)
    from lmforge.model import _cpu
except ImportError:  # pragma: no cover - exercised only where the extension did not build
    _cpu = None

MAX_ROWS = 8  # measured: the kernel beats MKL here up to 16 rows; at 8 a GEMM elsewhere (Intel MKL) draws level
MAX_NORM_ROWS = 64  # above this torch's threaded norm wins
ENABLED = _cpu is not None and _cpu.has_avx2() and os.environ.get("LMFORGE_CPU_KERNELS", "1") != "0"


_F32 = torch.float32
_pool_threads = 1  # kernel threads; more only inside `decoding()`


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` will handle x (..., K) against weight (N, K). Cheap: it runs before every decode matmul."""
    return (ENABLED and x.is_cpu and x.dtype is _F32 and weight.dtype is _F32 and weight.is_cpu
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
            and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling())


def gemv(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(x @ W.T for W in weights) for x (..., K) with at most MAX_ROWS rows, weights (N_j, K): one kernel call
    for all (their rows are split across threads as one stack). None when the kernel does not apply."""
    if not all(applies(x, w) for w in weights):
        return None
    K = x.shape[-1]
    x = x.contiguous()
    rows = x.numel() // K
    outs = tuple(torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32) for w in weights)  # (..., N_j)
    _cpu.gemv(x.data_ptr(), rows, K, [(w.data_ptr(), y.data_ptr(), w.shape[0]) for w, y in zip(weights, outs)],
               _pool_threads)
    return outs


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _f32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype is _F32 and t.is_cpu for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """HF RMSNorm of a few rows x (..., C) in one call; None when the kernel does not apply."""
    C = weight.shape[0]
    if not (ENABLED and _f32_cpu(x, weight) and x.shape[-1] == C and 0 < x.numel() <= MAX_NORM_ROWS * C
            and x.is_contiguous() and weight.is_contiguous() and _no_grad(x, weight)
            and not torch.compiler.is_compiling()):
        return None
    y = torch.empty_like(x)
    _cpu.rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // C, C, eps)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """HF-convention rotary embedding of x (B, T, H, D) with B == 1 or T == 1, cos/sin (T, 1, D/2) or
    (B, T, 1, D/2); a new contiguous tensor. None when the kernel does not apply."""
    if not (ENABLED and x.dim() == 4 and _f32_cpu(x, cos, sin) and _no_grad(x)
            and not torch.compiler.is_compiling()):
        return None
    B, T, H, D = x.shape
    if (B != 1 and T != 1) or D % 2 or x.stride(-1) != 1 or cos.shape != sin.shape or cos.shape[-1] != D // 2:
        return None
    if cos.dim() == 3:
        cos, sin = cos[None], sin[None]  # (1, T, 1, D/2)
    cos, sin = cos.expand(B, T, 1, D // 2)[:, :, 0], sin.expand(B, T, 1, D // 2)[:, :, 0]  # (B, T, D/2) views
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        return None
    axis = 1 if B == 1 else 0  # the token axis: T tokens of one row, or one token of each of B rows
    out = torch.empty(B, T, H, D, dtype=_F32)
    _cpu.rope(x.data_ptr(), x.stride(axis), x.stride(2), cos.data_ptr(), sin.data_ptr(), cos.stride(axis),
              out.data_ptr(), B * T, H, D)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D), mask) v for one query per row: q (B, H, 1, D), k/v (B, Hkv, S, D) (views into a
    cache are fine), mask (B, 1, 1, S) bool -> (B, H, 1, D). None when the kernel does not apply."""
    if not (ENABLED and q.dim() == 4 and q.shape[2] == 1 and _f32_cpu(q, k, v) and mask.dtype is torch.bool
            and _no_grad(q, k, v) and not torch.compiler.is_compiling()):
        return None
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if (k.shape != (B, Hkv, S, D) or v.shape != k.shape or H % Hkv or mask.shape != (B, 1, 1, S)
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(-2) != D
            or v.stride(-2) != D or mask.stride(-1) != 1):
        return None
    out = torch.empty(B, 1, H, D, dtype=_F32)  # the (B, T, H, D) layout o_proj reads
    _cpu.attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
                   v.stride(0), v.stride(1), mask.data_ptr(), mask.stride(0), out.data_ptr(), B, H, Hkv, S, D,
                   D**-0.5, _pool_threads)
    return out.transpose(1, 2)


@contextmanager
def decoding(rows: int) -> Iterator[None]:
    """Run a forward of `rows` new tokens (a decode step) with the cores lent from torch's pool to the kernel's.

    Does nothing when the kernel is off, torch already uses one thread, or rows > MAX_ROWS (then the forward's
    matmuls are GEMMs that torch's threads do well). Restores torch's thread count on exit; not reentrant."""
    global _pool_threads
    n = torch.get_num_threads()
    if not ENABLED or n == 1 or rows > MAX_ROWS or _pool_threads != 1:
        yield
        return
    torch.set_num_threads(1)
    _pool_threads = n
    try:
        yield
    finally:
        _pool_threads = 1
        torch.set_num_threads(n)


def linears(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """(m(x) for m in modules), by one `gemv` call when every module is a plain hook-free `nn.Linear` and the
    kernel applies; otherwise each module's own forward (so LoRA or quantized swaps keep working)."""
    if ENABLED and all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules):
        out = gemv(x, *(m.weight for m in modules))
        if out is not None:
            for y, m in zip(out, modules):
                if m.bias is not None:
                    y.add_(m.bias)
            return out
    return tuple(m(x) for m in modules)
