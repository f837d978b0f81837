"""The fused chunked head + cross-entropy: equal to the unfused loss in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model import Llama, LlamaConfig, losses
from lmforge.model.losses import chunk_rows, linear_cross_entropy

RTOL, ATOL = 1e-5, 1e-7


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 101, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 24, **kw})


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def make(n: int = 37, c: int = 16, v: int = 50, ignored: int = 5, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(v, c, generator=g, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:ignored]] = -100
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 5, 16, 36, 37, 64])  # 37 rows: most chunk sizes leave a short last chunk
def test_equals_unfused_loss_and_grads(chunk):
    h, w, t = make()
    ref = F.cross_entropy(h @ w.T, t)
    ref_grads = grads_of(ref * 3.0, [h, w])  # a non-unit upstream gradient, as the loop's loss * n_tokens
    out = linear_cross_entropy(h, w, t, chunk=chunk)
    out_grads = grads_of(out * 3.0, [h, w])
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_leading_dims_custom_ignore_index_and_int32_targets():
    h, w, t = make(n=24)
    t = torch.where(t == -100, torch.full_like(t, 7), t)  # 7 is now the ignored id
    ref = F.cross_entropy(h @ w.T, t, ignore_index=7)
    out = linear_cross_entropy(h.view(4, 6, -1), w, t.view(4, 6).int(), ignore_index=7, chunk=5)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for a, b in zip(grads_of(out, [h, w]), grads_of(ref, [h, w])):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_gradcheck_float64():
    h, w, t = make(n=7, c=4, v=5, ignored=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, t, chunk=3), (h, w))


def test_all_ignored_is_nan_with_zero_grads_as_unfused():
    h, w, t = make(n=6)
    t[:] = -100
    ref = F.cross_entropy(h @ w.T, t)
    out = linear_cross_entropy(h, w, t, chunk=4)
    assert ref.isnan() and out.isnan()
    for a, b in zip(grads_of(out, [h, w]), grads_of(ref, [h, w])):
        assert torch.equal(a, b) and not a.any()


def test_no_grad_and_frozen_inputs():
    h, w, t = make()
    ref = F.cross_entropy(h @ w.T, t)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=8), ref, rtol=RTOL, atol=ATOL)
    ref_gh, ref_gw = grads_of(ref, [h, w])
    (gw,) = grads_of(linear_cross_entropy(h.detach(), w, t, chunk=8), [w])  # only the weight trains
    torch.testing.assert_close(gw, ref_gw, rtol=RTOL, atol=ATOL)
    (gh,) = grads_of(linear_cross_entropy(h, w.detach(), t, chunk=8), [h])  # only the input (a frozen head)
    torch.testing.assert_close(gh, ref_gh, rtol=RTOL, atol=ATOL)


def test_bf16_autocast_close_to_unfused():
    h, w, t = make(n=64, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.T).float(), t)
        out = linear_cross_entropy(h, w, t, chunk=10)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    gh, gw = grads_of(out, [h, w])
    assert gh.dtype == gw.dtype == torch.float32  # back to the parameters' dtype through the casts
    for a, b in zip((gh, gw), grads_of(ref, [h, w])):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


def test_chunk_rows():
    assert chunk_rows(2048, 8192) == 512  # 16 MB of fp32 logits
    assert chunk_rows(100, 8192) == 100  # never more than the rows
    assert chunk_rows(4096, 1 << 20) == 16  # a huge vocabulary still gets a useful matmul


# ------------------------------------------------------------------------------------ through the model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 1])  # one chunk, or 16-row chunks (39 rows: 16 + 16 + 7)
def test_model_targets_equal_unfused(tie, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(losses, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    model = Llama(tiny(tie_embeddings=tie))
    idx = torch.randint(0, 101, (3, 13))
    y = torch.randint(0, 101, (3, 13))
    y[0, :4] = -100
    y[2, -1] = -100
    params = [p for p in model.parameters()]
    ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    ref_grads = grads_of(ref * 5.0, params)
    out = model(idx, targets=y)
    out_grads = grads_of(out * 5.0, params)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) != tie  # tied: one parameter, both uses' gradients summed into it
    for name, a, b in zip(names, out_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_model_targets_with_explicit_positions_and_errors():
    torch.manual_seed(0)
    model = Llama(tiny())
    idx = torch.randint(0, 101, (2, 7))
    y = torch.randint(0, 101, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(idx, input_pos=pos, targets=y), ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(LmforgeError, match="targets must be an integer tensor shaped like idx"):
        model(idx, targets=y[:, :-1])
    with pytest.raises(LmforgeError, match="targets must be an integer tensor"):
        model(idx, targets=y.float())


def test_swapped_head_falls_back_to_its_own_forward():
    class Scaled(nn.Module):  # stands in for a LoRA or quantized head: its forward is not x @ W.T
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base

        def forward(self, x):
            return 2.0 * self.base(x)

    torch.manual_seed(0)
    model = Llama(tiny())
    model.lm_head = Scaled(model.lm_head)
    idx = torch.randint(0, 101, (2, 5))
    y = torch.randint(0, 101, (2, 5))
    ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(idx, targets=y), ref, rtol=RTOL, atol=ATOL)
