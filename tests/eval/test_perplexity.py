"""Perplexity: against hand-computed cross-entropy, against transformers' LlamaForCausalLM loss on the same
weights (strided windows), window bookkeeping as a property, bits per byte, the unigram baseline, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lmforge.common import LmforgeError
from lmforge.eval.perplexity import (
    IGNORE_INDEX,
    perplexity,
    sliding_windows,
    token_byte_lengths,
    unigram_perplexity,
)

V = 40


class CausalMean(nn.Module):
    """Stand-in LM whose predictions depend on the whole left context (so window placement matters)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, idx):
        h = self.embed(idx).cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None]
        return self.head(torch.tanh(h)) * 3


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_batches_match_hand_computed_cross_entropy():
    model = CausalMean()
    x, y = ids(24).view(3, 8), ids(24, seed=1).view(3, 8)
    y[0, :5] = IGNORE_INDEX
    r = perplexity(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert r["tokens"] == 19
    assert r["nll"] == pytest.approx(ref.item(), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(ref.item()), rel=1e-6)
    assert "bits_per_byte" not in r


def test_disjoint_windows_match_hand_computed_cross_entropy():
    model = CausalMean()
    t = ids(33)  # 32 targets = 4 windows of 8
    with torch.no_grad():
        logits = model(t[:-1].view(4, 8))
    ref = F.cross_entropy(logits.flatten(0, 1), t[1:])
    for data in (t, t.numpy(), t.tolist()):
        r = perplexity(model, data, seq_len=8, batch_size=3)
        assert r["tokens"] == 32 and r["nll"] == pytest.approx(ref.item(), rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 60), seq_len=st.integers(1, 20), data=st.data())
def test_every_target_is_scored_once_with_enough_context(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    windows = sliding_windows(n, seq_len, stride)
    scored = []
    for begin, end, after in windows:
        assert 0 <= begin < end <= n - 1 and end - begin == min(seq_len, n - 1)
        for j in range(max(after, begin) + 1, end + 1):  # targets this window scores
            scored.append(j)
            assert j - begin >= min(j, seq_len - stride + 1)  # tokens of context
    assert scored == list(range(1, n))


def test_stride_adds_context_and_lowers_nll_for_a_context_model():
    model = CausalMean()
    t = torch.arange(200) % 7  # a pattern the context mean can only capture with enough context
    disjoint = perplexity(model, t, seq_len=16)
    strided = perplexity(model, t, seq_len=16, stride=4)
    assert disjoint["tokens"] == strided["tokens"] == 199
    assert disjoint["nll"] != strided["nll"]


def test_matches_transformers_llama_loss_on_the_same_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import save_run
    from lmforge.model import Llama, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Llama(cfg)
    save_run(model, cfg, tmp_path)
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    t = ids(101, seed=3)
    for seq_len, stride in [(16, 16), (16, 5), (16, 1), (32, 7)]:
        ours = perplexity(model, t, seq_len=seq_len, stride=stride, batch_size=4)
        nll_sum, count = 0.0, 0
        for begin, end, after in sliding_windows(len(t), seq_len, stride):
            inputs = t[begin:end + 1][None]  # HF shifts labels inside: label i is predicted from tokens < i
            labels = inputs.clone()
            labels[:, : after - begin + 1] = IGNORE_INDEX  # targets up to `after` were scored by earlier windows
            with torch.no_grad():
                loss = peer(input_ids=inputs, labels=labels, use_cache=False).loss
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            nll_sum, count = nll_sum + loss.item() * n, count + n
        assert ours["tokens"] == count == 100
        assert ours["nll"] == pytest.approx(nll_sum / count, rel=1e-5), (seq_len, stride)


def test_bits_per_byte_from_token_bytes_and_from_a_byte_count():
    model = CausalMean()
    t = ids(41)
    token_bytes = [0] + [1 + i % 3 for i in range(1, V)]  # id 0 is a "special" token of 0 bytes
    r = perplexity(model, t, seq_len=8, token_bytes=token_bytes)
    with torch.no_grad():
        nll = F.cross_entropy(model(t[:-1].view(5, 8)).flatten(0, 1), t[1:], reduction="none")
    nbytes = torch.tensor(token_bytes)[t[1:]]
    expected = nll[nbytes > 0].sum().item() / math.log(2) / nbytes.sum().item()
    assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    r = perplexity(model, t, seq_len=8, n_bytes=100)
    assert r["bits_per_byte"] == pytest.approx(nll.sum().item() / math.log(2) / 100, rel=1e-6)


def test_unigram_baseline_is_add_one_smoothed_frequency():
    counts = np.array([5, 0, 3, 2])
    tokens = [2, 0, 1, 0, 3]
    r = unigram_perplexity(counts, tokens, token_bytes=[1, 2, 0, 1])
    p = (counts + 1) / (counts.sum() + 4)
    nll = -np.log(p[[0, 1, 0, 3]])
    assert r["tokens"] == 4 and r["nll"] == pytest.approx(nll.mean())
    assert r["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / 5)  # bytes 1 + 2 + 1 + 1


def test_token_byte_lengths_of_a_real_tokenizer():
    from lmforge.tokenizer import train_bpe

    text = "hello world, hello tokens! naïve café 🙂 " * 20
    tok = train_bpe([text], vocab_size=300, special_tokens=["<|endoftext|>"])
    lengths = token_byte_lengths(tok)
    assert len(lengths) == tok.vocab_size and lengths[tok.special_tokens["<|endoftext|>"]] == 0
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode())


def test_mode_is_restored_and_no_graph_is_built():
    model = CausalMean().train()
    perplexity(model, ids(20), seq_len=8)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_an_error():
    model = CausalMean()
    with pytest.raises(LmforgeError, match="stride <= seq_len"):
        perplexity(model, ids(20), seq_len=8, stride=9)
    with pytest.raises(LmforgeError, match="at least 2 tokens"):
        perplexity(model, [3], seq_len=8)
    with pytest.raises(LmforgeError, match="give seq_len"):
        perplexity(model, ids(20))
    y = torch.full((1, 4), IGNORE_INDEX)
    with pytest.raises(LmforgeError, match="no tokens to score"):
        perplexity(model, [(ids(4)[None], y)])


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lmforge.checkpoint import save_run
    from lmforge.model import Llama, LlamaConfig
    from lmforge.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("evalcli")
    text = "the cat sat on the mat. the dog sat on the log. " * 30
    tok = train_bpe([text], vocab_size=280, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=24)
    save_run(Llama(cfg), cfg, root / "run", tokenizer=tok)
    (root / "text.txt").write_text(text)
    return root


def test_cli_json_prints_exactly_one_object(run_dir, capsys):
    from lmforge.checkpoint import load_run
    from lmforge.eval.cli import main
    from lmforge.tokenizer import load_tokenizer

    assert main(["perplexity", "--model", str(run_dir / "run"), "--data", str(run_dir / "text.txt"), "--stride", "8",
                 "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert out.count("\n") == 1 and set(result) == {"perplexity", "nll", "tokens", "bits_per_byte"}
    model, cfg = load_run(run_dir / "run")
    tok = load_tokenizer(run_dir / "run")
    expected = perplexity(model, tok.encode((run_dir / "text.txt").read_text()), seq_len=cfg.max_seq_len, stride=8)
    assert result["nll"] == pytest.approx(expected["nll"], rel=1e-6) and result["tokens"] == expected["tokens"]


def test_cli_text_output_and_errors(run_dir, capsys):
    from lmforge.eval.cli import main

    base = ["perplexity", "--model", str(run_dir / "run"), "--data", str(run_dir / "text.txt")]
    assert main(base + ["--seq-len", "16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity ") and "bits/byte" in line and "\n" not in line
    with pytest.raises(LmforgeError, match="--stride must be between 1 and the window length 16"):
        main(base + ["--seq-len", "16", "--stride", "17"])
    with pytest.raises(LmforgeError, match="exceeds the model's max_seq_len 24"):
        main(base + ["--seq-len", "64"])
    with pytest.raises(LmforgeError, match="run directory not found"):
        main(["perplexity", "--model", str(run_dir / "nope"), "--data", str(run_dir / "text.txt")])
    with pytest.raises(LmforgeError, match="not found"):
        main(["perplexity", "--model", str(run_dir / "run"), "--data", str(run_dir / "missing.txt")])


def test_equals_the_hugging_face_guides_sliding_window_loop(tmp_path):
    """The loop of transformers' "Perplexity of fixed-length models" guide, run on transformers' Llama with the
    same weights, equals ours with align_last=False and seq_len = max_length - 1, within 1e-4.

    One correction to the guide: it weights each window's mean loss by `num_valid_tokens - batch_size`, which is
    the number of scored labels only for the first window (whose first label the internal shift drops); later
    windows keep their first label, so the weight here is the count of labels actually scored."""
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import load_run, save_run
    from lmforge.model import Llama, LlamaConfig

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    save_run(Llama(cfg), cfg, tmp_path)
    model, _ = load_run(tmp_path)
    peer = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    encodings = ids(157, seed=5)[None]  # (1, n)
    for max_length, stride in [(16, 8), (16, 5), (32, 31), (24, 1)]:
        nll_sum, n_tokens, prev_end_loc, seq_len = 0.0, 0, 0, encodings.size(1)
        for begin_loc in range(0, seq_len, stride):  # the guide's loop
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = encodings[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                loss = peer(input_ids, labels=target_ids, use_cache=False).loss
            scored = int((target_ids[:, 1:] != -100).sum())  # the correction (the guide: valid - batch_size)
            nll_sum, n_tokens = nll_sum + loss.item() * scored, n_tokens + scored
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
        ours = perplexity(model, encodings[0], seq_len=max_length - 1, stride=stride, align_last=False)
        assert ours["tokens"] == n_tokens == 156
        assert abs(ours["nll"] - nll_sum / n_tokens) < 1e-4, (max_length, stride)
        assert abs(ours["perplexity"] - math.exp(nll_sum / n_tokens)) < 1e-4 * ours["perplexity"]
