"""The compiled decode kernels (lmforge/model/_cpu.c) against their torch references, and their dispatch rules."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.kv_cache import KVCache
from lmforge.model import Llama, LlamaConfig, kernels
from lmforge.model.attention import small_query_attention
from lmforge.model.layers import _rotate

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="compiled CPU kernels not built or no AVX2 here")

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=[1, 2], ids=["pool1", "pool2"])
def pool(request, monkeypatch):
    """Run each kernel test with the calling thread alone and with a two-thread pool."""
    monkeypatch.setattr(kernels, "_pool_threads", request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 5), (16, 64), (13, 130), (768, 259), (1000, 1027)])
def test_gemv_equals_linear(pool, rows, K, N):
    g = torch.Generator().manual_seed(K * 1000 + N + rows)
    x, w = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g)
    (y,) = kernels.gemv(x, w)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-4 * K**0.5, rtol=1e-5)


def test_gemv_several_matrices_one_call(pool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 96, generator=g)  # (B, T, C): leading dims are kept
    ws = [torch.randn(n, 96, generator=g) for n in (96, 32, 32, 257)]
    outs = kernels.gemv(x, *ws)
    assert [o.shape for o in outs] == [(1, 1, n) for n in (96, 32, 32, 257)]
    for o, w in zip(outs, ws):
        torch.testing.assert_close(o, F.linear(x, w), **TOL)


def test_gemv_declines_what_it_cannot_do():
    w = torch.randn(8, 16)
    assert kernels.gemv(torch.randn(kernels.MAX_ROWS + 1, 16), w) is None  # a GEMM's job
    assert kernels.gemv(torch.randn(1, 16, dtype=torch.float64), w.double()) is None
    assert kernels.gemv(torch.randn(1, 16).bfloat16(), w.bfloat16()) is None
    assert kernels.gemv(torch.randn(1, 16), w.t().contiguous().t()) is None  # weight not contiguous
    assert kernels.gemv(torch.randn(1, 15), w) is None  # wrong K
    assert kernels.gemv(torch.randn(1, 16, requires_grad=True), w) is None  # autograd needs the torch op
    with torch.no_grad():
        assert kernels.gemv(torch.randn(1, 16, requires_grad=True), w) is not None


def test_linears_uses_module_forward_for_swapped_or_hooked_modules():
    x = torch.randn(1, 16)
    lin = nn.Linear(16, 8, bias=True)

    class Swapped(nn.Linear):  # e.g. a LoRA layer: its own forward must run
        def forward(self, x):
            return super().forward(x) + 1.0

    sw = Swapped(16, 8, bias=False)
    with torch.no_grad():
        y_lin, y_sw = kernels.linears(x, lin, sw)
        torch.testing.assert_close(y_lin, lin(x), **TOL)  # bias added after the kernel
        torch.testing.assert_close(y_sw, sw(x), **TOL)
        seen = []
        lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        kernels.linears(x, lin)
        assert seen == [(1, 8)]


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 1, 768), (3, 2, 1000), (64, 13)])
def test_rms_norm_equals_torch(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    ref = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w  # HF LlamaRMSNorm in fp32
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ref, **TOL)
    assert kernels.rms_norm(torch.randn(kernels.MAX_NORM_ROWS + 1, 8), torch.ones(8), 1e-6) is None


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (3, 1)])
def test_rope_equals_torch(B, T):
    g = torch.Generator().manual_seed(B * 10 + T)
    H, D = 3, 8
    x = torch.randn(B, T, H * D + 5, generator=g)[..., : H * D].reshape(B, T, H, D)  # strided, as from a fused gemv
    cos, sin = torch.randn(B, T, 1, D // 2, generator=g), torch.randn(B, T, 1, D // 2, generator=g)
    torch.testing.assert_close(kernels.rope(x, cos, sin), _rotate(x, cos, sin), **TOL)
    if B == 1:  # the (T, 1, D/2) tables of an uncached forward
        torch.testing.assert_close(kernels.rope(x, cos[0], sin[0]), _rotate(x, cos[0], sin[0]), **TOL)
    assert kernels.rope(torch.randn(2, 2, H, D), cos[:1, :1].expand(2, 2, 1, D // 2), sin[:1, :1]) is None


@pytest.mark.parametrize("H,Hkv,S", [(4, 4, 1), (4, 2, 37), (8, 1, 300)])
def test_attention_equals_torch_over_a_cache(pool, H, Hkv, S):
    """One query per row against a partly written cache with padding (masked slots), GQA and MQA."""
    g = torch.Generator().manual_seed(H * 100 + S)
    B, D = 3, 16
    cache_k = torch.randn(B, Hkv, S + 9, D, generator=g)  # a longer cache: the kernel sees views of it
    cache_v = torch.randn(B, Hkv, S + 9, D, generator=g)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # (B, H, 1, D), strided like the model's
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.7
    mask[..., 0] = True
    y = kernels.attention(q, k, v, mask)
    torch.testing.assert_close(y, small_query_attention(q, k, v, mask), **TOL)


def test_decoding_lends_the_threads_back():
    n = torch.get_num_threads()
    with kernels.decoding(1):
        inside = torch.get_num_threads(), kernels._pool_threads
    assert (torch.get_num_threads(), kernels._pool_threads) == (n, 1)
    assert inside == ((1, n) if n > 1 else (1, 1))
    with pytest.raises(RuntimeError), kernels.decoding(1):
        raise RuntimeError("boom")
    assert (torch.get_num_threads(), kernels._pool_threads) == (n, 1)
    with kernels.decoding(kernels.MAX_ROWS + 1):  # a GEMM-sized batch keeps torch's threads
        assert torch.get_num_threads() == n


def _tiny_model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return Llama(cfg).eval()


def test_model_decode_step_same_with_and_without_kernels(monkeypatch):
    model = _tiny_model()
    prompt = torch.randint(0, 97, (2, 6))
    pos = torch.arange(6).repeat(2, 1)

    def run() -> torch.Tensor:
        cache = KVCache(model.cfg, 2, 16)
        with torch.inference_mode():
            model(prompt, input_pos=pos, cache=cache)
            with kernels.decoding(2):
                return model(prompt[:, -1:], input_pos=pos[:, -1:] + 1, cache=cache)

    fast = run()
    monkeypatch.setattr(kernels, "ENABLED", False)
    torch.testing.assert_close(fast, run(), atol=1e-5, rtol=1e-5)


def _child_gemv(x, w, q) -> None:
    # torch's own OpenMP pool cannot run in a forked child (libgomp), so only the kernel's pool is used here.
    kernels._pool_threads = 2
    q.put(kernels.gemv(x, w)[0].tolist())


def test_pool_survives_fork(monkeypatch):
    """A pool started in the parent is restarted in a forked child (pthread_atfork), not waited on forever."""
    x, w = torch.randn(1, 256), torch.randn(512, 256)
    monkeypatch.setattr(kernels, "_pool_threads", 2)
    want = kernels.gemv(x, w)[0]  # starts the parent's pool
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_gemv, args=(x, w, q))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    torch.testing.assert_close(torch.tensor(got), want, **TOL)
