"""Fused output projection + cross-entropy: the language-modeling loss without the (N, V) logits.

    loss = linear_cross_entropy(h, weight, targets)      # == F.cross_entropy(h @ weight.T, targets), mean
    loss = model(idx, targets=targets)                    # what Llama.forward does with targets

The unfused loss materializes the logits, their log-softmax and two gradients of the same size: at batch 8 x
seq 256 x vocab 8192, four 67 MB fp32 buffers per step, each above glibc's mmap threshold, so each is mapped
fresh and page-faulted in again on every step. Here the rows go through in chunks (Liger-Kernel's
`LigerFusedLinearCrossEntropy`, Hsu et al. 2024; Apple's Cut Cross-Entropy, Wijmans et al. 2024, does the same
inside one kernel): per chunk, logits = h_c @ W^T into one reused buffer, log-softmax in place, the loss from
its target entries, and since d loss / d logits = (softmax - onehot) / n_valid is known right there, the
buffer becomes that gradient in place and is consumed at once: dh_c = g @ W, dW += g^T @ h_c. The forward
thus finishes the output layer's backward; `backward` only scales the stored dh, dW by the incoming gradient
(a scalar). Same three matmuls as the unfused path, the logits never exist whole, and nothing
activation-sized is saved but dh.
"""

from __future__ import annotations

import torch

# fp32 logits per chunk. Well under glibc's largest dynamic mmap threshold (32 MB on 64-bit), so after the first
# step the buffer comes from the heap, with no page faults; large enough that per-op overhead stays small (on
# 2 CPU cores, 512 rows x 8192 ran faster than 128 or 256 rows and without the faults of 1024 or more).
CHUNK_BYTES = 16 << 20


def chunk_rows(n_rows: int, vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes about `chunk_bytes` (default CHUNK_BYTES), >= 16."""
    return max(1, min(n_rows, max(16, (chunk_bytes or CHUNK_BYTES) // (4 * vocab_size))))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets, over the targets != ignore_index.

    h (..., C), weight (V, C), targets (...) integer. Equals `F.cross_entropy((h @ weight.T).float().flatten(0, -2),
    targets.flatten(), ignore_index=ignore_index)` in value and in the gradients for h and weight (a tied embedding
    gets its share through autograd as usual); with no target left the loss is NaN and the gradients zero, as there.
    Under autocast the matmuls run in the autocast dtype (as an autocast nn.Linear would) and the softmax in fp32.
    `chunk` rows per chunk (default: `chunk_rows`).
    """
    C = weight.shape[1]
    h2, t = h.reshape(-1, C), targets.reshape(-1).long()  # gather/scatter take int64 indices
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match the {h2.shape[0]} rows of h {tuple(h.shape)}")
    dtype = torch.promote_types(h.dtype, weight.dtype)
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    chunk = chunk or chunk_rows(h2.shape[0], weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit inside
        return _LinearCrossEntropyFn.apply(h2.to(dtype), weight.to(dtype), t, ignore_index, chunk,
                                           torch.is_grad_enabled())


class _LinearCrossEntropyFn(torch.autograd.Function):
    """h (N, C), w (V, C) of one dtype, t (N,) -> mean nll; gradients computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int, chunk: int,
                grad_enabled: bool) -> torch.Tensor:
        N, V = h.shape[0], w.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax and sums in fp32 at least (fp64 stays fp64)
        valid = t != ignore_index
        n_valid = valid.sum()
        row_weight = valid.to(acc) / n_valid.clamp(min=1)  # d mean / d nll_i: 1/n, or 0 for an ignored row
        safe_t = t.masked_fill(~valid, 0)[:, None]  # (N, 1): any in-range id for ignored rows (weight 0)
        need_dh, need_dw = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
        # d mean / d nll_i is 1/n_valid (0 for an ignored row): it scales h's rows for dW and dh's rows at the end,
        # both (N, C), instead of the (n, V) gradient chunks.
        hw = h * row_weight[:, None].to(h.dtype) if need_dw else None
        nll = torch.empty(N, dtype=acc, device=h.device)
        minus_one = torch.full((min(chunk, N), 1), -1.0, dtype=acc, device=h.device)
        buf = torch.empty(min(chunk, N), V, dtype=acc, device=h.device) if acc == h.dtype else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            tc = safe_t[s:e]
            logits = torch.mm(h[s:e], w.t(), out=buf[:e - s]) if buf is not None else torch.mm(h[s:e], w.t()).to(acc)
            # In place on CPU, where the kernel reads each row whole before writing it (tests check the values) and a
            # fresh buffer would cost page faults; elsewhere a caching allocator makes the temporary free.
            logp = torch.log_softmax(logits, dim=1, out=logits if logits.device.type == "cpu" else None)
            torch.neg(logp.gather(1, tc).squeeze(1), out=nll[s:e])
            if not (need_dh or need_dw):
                continue
            g = logp.exp_().scatter_add_(1, tc, minus_one[:e - s]).to(h.dtype)  # softmax - onehot(t), in place
            if need_dh:
                torch.mm(g, w, out=dh[s:e])
            if need_dw and dw.dtype == h.dtype:
                dw.addmm_(g.t(), hw[s:e])
            elif need_dw:  # low-precision matmul, accumulated across chunks in fp32
                dw.add_(torch.mm(g.t(), hw[s:e]))
        if need_dh:
            dh.mul_(row_weight[:, None].to(h.dtype))
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w.dtype
        return nll.masked_fill_(~valid, 0).sum() / n_valid  # NaN when nothing is scored, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        dh = dh * grad if dh is not None else None
        dw = (dw * grad).to(ctx.w_dtype) if dw is not None else None
        return dh, dw, None, None, None, None
