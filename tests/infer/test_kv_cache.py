"""KVCache: the model's cache hook (docs/internals.md) and cached decoding equal to full recomputation."""

from __future__ import annotations

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.kv_cache import KVCache
from lmforge.model import Llama, LlamaConfig

ATOL = 1e-5


@pytest.fixture(scope="module", params=[4, 2, 1], ids=["mha", "gqa", "mqa"])
def model(request) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=request.param, max_seq_len=48,
                      rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return Llama(cfg).eval()


def test_prefill_then_decode_equals_full_recompute(model):
    torch.manual_seed(1)
    idx = torch.randint(0, 97, (1, 20))
    full = model(idx)
    cache = KVCache(model.cfg, batch_size=1, max_len=32)
    out = [model(idx[:, :8], input_pos=torch.arange(8)[None], cache=cache)]
    for t in range(8, 20):
        out.append(model(idx[:, t : t + 1], input_pos=torch.tensor([[t]]), cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)


def test_chunked_prefill(model):
    idx = torch.randint(0, 97, (2, 18))
    cache = KVCache(model.cfg, batch_size=2, max_len=18)
    pos = torch.arange(18).expand(2, 18)
    out = torch.cat([model(idx[:, a:b], input_pos=pos[:, a:b], cache=cache) for a, b in ((0, 5), (5, 12), (12, 18))], 1)
    torch.testing.assert_close(out, model(idx), atol=ATOL, rtol=0)


def test_batched_left_padding_with_per_row_positions(model):
    """Rows of different prompt lengths, left padded, decoded together: each row equals its own full forward."""
    torch.manual_seed(2)
    lengths, n_new, pad = [5, 9, 2], 6, 0
    seqs = [torch.randint(1, 97, (L + n_new,)) for L in lengths]
    T = max(lengths)
    idx = torch.full((3, T), pad)
    pos = torch.full((3, T), -1)
    for b, L in enumerate(lengths):
        idx[b, T - L :] = seqs[b][:L]
        pos[b, T - L :] = torch.arange(L)
    cache = KVCache(model.cfg, batch_size=3, max_len=24)
    prefill = model(idx, input_pos=pos, cache=cache)
    assert torch.isfinite(prefill).all()  # padding queries attend slot 0 only: no NaN
    steps = [prefill[:, -1]]
    next_pos = torch.tensor(lengths)
    for i in range(n_new):
        tok = torch.stack([seqs[b][lengths[b] + i] for b in range(3)])[:, None]
        steps.append(model(tok, input_pos=next_pos[:, None], cache=cache)[:, 0])
        next_pos = next_pos + 1
    for b, L in enumerate(lengths):
        ref = model(seqs[b][None])[0]  # uncached, positions 0..L+n_new-1
        torch.testing.assert_close(prefill[b, T - L :], ref[:L], atol=ATOL, rtol=0)
        got = torch.stack([s[b] for s in steps])  # logits at the last prompt token, then at each new token
        torch.testing.assert_close(got, ref[L - 1 :], atol=ATOL, rtol=0)


def test_attn_mask_semantics():
    """The mask spans the active prefix: slots 0..(largest position in this forward)."""
    cache = KVCache((1, 1, 4), batch_size=2, max_len=6)
    pos = torch.tensor([[-1, 0, 1], [0, 1, 2]])
    mask = cache.attn_mask(pos)
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    expect0 = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    expect1 = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expect0) and torch.equal(mask[1, 0], expect1)
    # Next step: row 0 at position 2, row 1 at 3; unwritten slots stay closed.
    mask = cache.attn_mask(torch.tensor([[2], [3]]))
    assert mask.shape == (2, 1, 1, 4)
    assert mask[0, 0, 0].tolist() == [True, True, True, False]
    assert mask[1, 0, 0].tolist() == [True, True, True, True]
    # A padding query in a row with nothing written still has exactly one True (slot 0).
    fresh = KVCache((1, 1, 4), batch_size=1, max_len=4)
    assert fresh.attn_mask(torch.tensor([[-1]]))[0, 0, 0].tolist() == [True]


def test_update_writes_at_position_and_skips_padding():
    cache = KVCache((2, 2, 3), batch_size=2, max_len=5)
    pos = torch.tensor([[-1, 0], [3, 4]])
    k = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).view(2, 2, 2, 3) + 1
    cache.attn_mask(pos)
    k_all, v_all = cache.update(1, pos, k, -k)
    assert k_all.shape == (2, 2, 5, 3)
    torch.testing.assert_close(k_all[0, :, 0], k[0, :, 1])  # row 0: token 1 at slot 0
    assert k_all[0, :, 1:].abs().sum() == 0  # the padding token was not written anywhere
    torch.testing.assert_close(k_all[1, :, 3:5], k[1])
    torch.testing.assert_close(v_all[1, :, 3:5], -k[1])
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    assert cache.written[:, :5].tolist() == [[True, False, False, False, False], [False, False, False, True, True]]


def test_reset_and_n_bytes():
    cfg = LlamaConfig(vocab_size=10, dim=32, n_layers=3, n_heads=4, n_kv_heads=2)
    cache = KVCache(cfg, batch_size=2, max_len=7, dtype=torch.bfloat16)
    assert cache.n_bytes() == 2 * 3 * (2 * 2 * 8 * 8) * 2  # k and v, layers, B*H*(S+1)*D, 2 bytes
    cache.attn_mask(torch.tensor([[0], [0]]))
    assert cache.written.any()
    cache.reset()
    assert not cache.written.any()
    assert cache.attn_mask(torch.tensor([[1], [1]]))[0, 0, 0].tolist() == [False, True]  # slot 0 forgotten


def test_errors():
    with pytest.raises(LmforgeError, match="n_layers, n_kv_heads, head_dim"):
        KVCache(object(), 1, 4)
    with pytest.raises(LmforgeError, match="batch_size and max_len"):
        KVCache((1, 1, 2), 0, 4)
    cache = KVCache((1, 1, 2), batch_size=1, max_len=4)
    with pytest.raises(LmforgeError, match="does not fit"):
        cache.attn_mask(torch.tensor([[4]]))
    with pytest.raises(LmforgeError, match=r"input_pos must be \(batch=1, T\)"):
        cache.attn_mask(torch.tensor([[0], [1]]))
    with pytest.raises(LmforgeError, match="KVCache"):
        cache.update(0, torch.tensor([[0]]), torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))


def test_model_with_cache_checks_positions(model):
    cache = KVCache(model.cfg, batch_size=1, max_len=4)
    with pytest.raises(LmforgeError, match="does not fit"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([[4]]), cache=cache)
