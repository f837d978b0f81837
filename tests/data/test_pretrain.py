"""Token shards: build (split, dtype, shards, determinism), read (windows, batches), resume, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.data import BatchStream, TokenShards, build_shards, check_vocab, tokenizer_hash
from lmforge.tokenizer import BPETokenizer, train_bpe

EOT = "<|endoftext|>"
WORDS = ("the model reads text and learns to predict the next token; data flows from files to shards, "
         "naïve café 中文 🙂 def f(x): return x").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe(["\n".join(make_docs(200, seed=99))], vocab_size=300, special_tokens=[EOT])


def build(docs, tok, out, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return build_shards(docs, tok, out, **kw)


def stream(tok, out, split) -> list[int]:
    shards = TokenShards(out, split)
    return shards.tokens(0, shards.n_tokens).tolist()


def documents_of(tok, ids) -> list[str]:
    text = tok.decode(ids)
    assert text.endswith(EOT)
    return text[: -len(EOT)].split(EOT)


# ---------------------------------------------------------------------------------------------- building

def test_round_trip_without_val(tok, tmp_path):
    docs = make_docs(30)
    meta = build(docs, tok, tmp_path, val_fraction=0)
    sep = tok.special_tokens[EOT]
    expected = [i for d in docs for i in tok.encode(d) + [sep]]
    assert stream(tok, tmp_path, "train") == expected
    assert tok.decode(expected) == "".join(d + EOT for d in docs)
    assert meta["n_tokens"] == {"train": len(expected), "val": 0}
    assert meta["separator_id"] == sep and meta["separator"] == EOT and meta["vocab_size"] == tok.vocab_size
    with pytest.raises(LmforgeError, match="'val' split .* has no tokens"):
        TokenShards(tmp_path, "val")


def test_split_by_document_keeps_every_document_in_order(tok, tmp_path):
    docs = make_docs(200)
    meta = build(docs, tok, tmp_path, val_fraction=0.2, seed=3)
    train, val = documents_of(tok, stream(tok, tmp_path, "train")), documents_of(tok, stream(tok, tmp_path, "val"))
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    assert 10 < len(val) < 70  # about 40 expected
    assert meta["n_documents"] == {"train": len(train), "val": len(val)}
    assert meta["text_bytes"] == sum(len(d.encode()) for d in docs)


def test_separator_text_inside_a_document_is_ordinary_text(tok, tmp_path):
    docs = [f"a document that mentions {EOT} literally", "second"]
    build(docs, tok, tmp_path, val_fraction=0)
    ids = stream(tok, tmp_path, "train")
    assert ids.count(tok.special_tokens[EOT]) == 2 and tok.decode(ids) == "".join(d + EOT for d in docs)


def test_files_and_directories(tok, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a whole file\n\nis one document")
    (src / "sub" / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    meta = build([src, "in memory"], tok, tmp_path / "out", val_fraction=0)
    assert documents_of(tok, stream(tok, tmp_path / "out", "train")) == [
        "in memory", "a whole file\n\nis one document", "json one", "two"]
    assert meta["sources"] == [str(src), "<1 in-memory text>"] and meta["n_files"] == 2


def test_uint16_or_uint32_by_vocab_size(tok, tmp_path):
    meta = build(["hello world"], tok, tmp_path / "small", val_fraction=0)
    assert meta["dtype"] == "uint16"
    assert (tmp_path / "small" / "train.bin").stat().st_size == 2 * meta["n_tokens"]["train"]
    big = BPETokenizer([bytes([b]) for b in range(256)], [], "gpt4", {EOT: 70_000})  # ids up to 70000
    meta = build(["hello world", "more text"], big, tmp_path / "big", val_fraction=0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    assert (tmp_path / "big" / "train.bin").stat().st_size == 4 * meta["n_tokens"]["train"]
    ids = stream(big, tmp_path / "big", "train")
    assert ids.count(70_000) == 2 and big.decode(ids) == f"hello world{EOT}more text{EOT}"


def test_split_is_deterministic_and_independent_of_threads_and_chunks(tok, tmp_path):
    docs = make_docs(300)
    build(docs, tok, tmp_path / "a", seed=7, val_fraction=0.1, num_threads=1)
    build(docs, tok, tmp_path / "b", seed=7, val_fraction=0.1, num_threads=4, chunk_bytes=500)
    build(docs, tok, tmp_path / "c", seed=8, val_fraction=0.1, num_threads=4)
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()


def test_duplicate_documents_land_in_the_same_split(tok, tmp_path):
    docs = make_docs(50) * 3
    build(docs, tok, tmp_path, val_fraction=0.3)
    train, val = documents_of(tok, stream(tok, tmp_path, "train")), documents_of(tok, stream(tok, tmp_path, "val"))
    assert not set(train) & set(val)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("val_fraction", [0.001, 0.999])
def test_both_splits_non_empty_with_two_documents(tok, tmp_path, seed, val_fraction):
    meta = build(["first document", "second document"], tok, tmp_path, val_fraction=val_fraction, seed=seed)
    assert meta["n_documents"] == {"train": 1, "val": 1}
    both = documents_of(tok, stream(tok, tmp_path, "train")) + documents_of(tok, stream(tok, tmp_path, "val"))
    assert sorted(both) == ["first document", "second document"]


def test_single_document_is_cut_at_the_tail(tok, tmp_path):
    doc = make_docs(1)[0] * 5
    build([doc], tok, tmp_path, val_fraction=0.1)
    full = tok.encode(doc) + [tok.special_tokens[EOT]]
    train, val = stream(tok, tmp_path, "train"), stream(tok, tmp_path, "val")
    assert train + val == full
    assert len(val) == max(1, round(len(full) * 0.1))


def test_shards_split_a_long_stream_and_read_back_as_one(tok, tmp_path):
    docs = make_docs(40)
    build(docs, tok, tmp_path / "one", val_fraction=0.1)
    meta = build(docs, tok, tmp_path / "many", val_fraction=0.1, shard_tokens=50)
    files = [e["file"] for e in meta["shards"]["train"]]
    assert len(files) > 3 and files[:2] == ["train_000.bin", "train_001.bin"]
    assert all(e["n_tokens"] == 50 for e in meta["shards"]["train"][:-1])
    one, many = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "many")
    assert one.n_tokens == many.n_tokens
    assert np.array_equal(one.tokens(0, one.n_tokens), many.tokens(0, many.n_tokens))
    assert np.array_equal(one.tokens(45, 120), many.tokens(45, 120))  # spans three files
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for a, b in zip(one.sample_batch(16, 60, g1), many.sample_batch(16, 60, g2)):
        assert torch.equal(a, b)


def test_rebuild_removes_stale_shards_and_leaves_no_temp_files(tok, tmp_path):
    build(make_docs(40), tok, tmp_path, shard_tokens=50)
    (tmp_path / "keep.txt").write_text("not ours")
    build(make_docs(40), tok, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "meta.json", "train.bin", "val.bin"]


def test_failed_build_leaves_no_meta_and_no_temp_files(tok, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    out = tmp_path / "out"
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: invalid JSON"):
        build([src], tok, out, chunk_bytes=1)
    assert list(out.iterdir()) == []


def test_summary_goes_to_log(tok, tmp_path):
    lines = []
    build(make_docs(5), tok, tmp_path, log=lines.append)
    assert len(lines) == 1 and "train" in lines[0] and "uint16" in lines[0] and str(tmp_path) in lines[0]


def test_tokenizer_without_separator(tmp_path):
    plain = train_bpe(["some text to learn from"], vocab_size=260)
    with pytest.raises(LmforgeError, match="no <\\|endoftext\\|> special token"):
        build(["a", "b"], plain, tmp_path)
    meta = build(["a", "b"], plain, tmp_path, separator_id=10, val_fraction=0)
    assert meta["separator_id"] == 10 and meta["separator"] is None
    assert stream(plain, tmp_path, "train") == [ord("a"), 10, ord("b"), 10]
    with pytest.raises(LmforgeError, match="outside the tokenizer"):
        build(["a"], plain, tmp_path, separator_id=plain.vocab_size)


def test_build_argument_errors(tok, tmp_path):
    with pytest.raises(LmforgeError, match="val_fraction"):
        build(["a"], tok, tmp_path, val_fraction=1.0)
    with pytest.raises(LmforgeError, match="corpus is empty"):
        build(["", ""], tok, tmp_path)
    assert not (tmp_path / "meta.json").exists()


# ---------------------------------------------------------------------------------------------- reading

@pytest.fixture(scope="module")
def shards_dir(tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build(make_docs(60), tok, out, val_fraction=0.1)
    return out


def test_sample_batch_shapes_shift_bounds_and_reproducibility(shards_dir, tok):
    train = TokenShards(shards_dir)
    full = train.tokens(0, train.n_tokens)
    x, y = train.sample_batch(8, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(torch.maximum(x, y).max()) < tok.vocab_size
    for row_x, row_y in zip(x.numpy(), y.numpy()):  # every row is a real window of the stream
        starts = [s for s in range(train.n_tokens - 32) if np.array_equal(full[s : s + 32], row_x)]
        assert any(full[s + 32] == row_y[-1] for s in starts)
    x2, y2 = train.sample_batch(8, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = train.sample_batch(8, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_iter_batches_walks_every_window_in_order(shards_dir):
    val = TokenShards(shards_dir, "val")
    T = 7
    n_windows = (val.n_tokens - 1) // T
    batches = list(val.iter_batches(4, T))
    assert [len(x) for x, _ in batches[:-1]] == [4] * (len(batches) - 1) and len(batches[-1][0]) <= 4
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert len(xs) == n_windows * T
    assert np.array_equal(xs.numpy(), val.tokens(0, n_windows * T))
    assert np.array_equal(ys.numpy(), val.tokens(1, n_windows * T))


def test_data_shorter_than_one_window(shards_dir):
    val = TokenShards(shards_dir, "val")
    val.sample_batch(2, val.n_tokens - 1)  # exactly one window fits
    for call in (lambda: val.sample_batch(2, val.n_tokens), lambda: val.iter_batches(2, val.n_tokens),
                 lambda: BatchStream(val, 2, val.n_tokens)):
        with pytest.raises(LmforgeError, match="shorter than one training window"):
            call()


def test_meta_and_shard_file_errors(shards_dir, tmp_path):
    with pytest.raises(LmforgeError, match="meta.json missing"):
        TokenShards(tmp_path)
    with pytest.raises(LmforgeError, match="no split 'test'"):
        TokenShards(shards_dir, "test")
    for f in shards_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "train.bin").write_bytes((tmp_path / "train.bin").read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train.bin is .* bytes, expected"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(LmforgeError, match="not a token-shards meta.json"):
        TokenShards(tmp_path / "meta.json")


def test_check_vocab(shards_dir, tok):
    meta = TokenShards(shards_dir).meta
    check_vocab(meta, tok.vocab_size, tok)
    check_vocab(meta, tok.vocab_size + 64)  # a padded embedding is fine
    with pytest.raises(LmforgeError, match="model has only"):
        check_vocab(meta, tok.vocab_size - 1)
    other = train_bpe(["different text entirely"], vocab_size=280, special_tokens=[EOT])
    assert tokenizer_hash(other) != tokenizer_hash(tok) == meta["tokenizer"]["hash"]
    with pytest.raises(LmforgeError, match="different tokenizer"):
        check_vocab(meta, tok.vocab_size, other)


# ---------------------------------------------------------------------------------------------- BatchStream

def take(stream_, n):
    return [next(stream_) for _ in range(n)]


def test_batch_stream_resumes_exactly(shards_dir):
    train = TokenShards(shards_dir)
    T, B = 16, 5
    n_windows = (train.n_tokens - 1) // T
    steps = 3 * n_windows // B + 2  # several epochs, with steps that straddle epoch ends
    reference = take(BatchStream(train, B, T, seed=4), steps)
    for cut in (0, 1, n_windows // B, steps - 1):
        s = BatchStream(train, B, T, seed=4)
        take(s, cut)
        state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
        resumed = BatchStream(TokenShards(shards_dir), B, T, seed=123)  # the seed comes from the state
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(reference[cut:], take(resumed, steps - cut)):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_batch_stream_covers_each_window_once_per_epoch(shards_dir):
    train = TokenShards(shards_dir)
    T = 16
    n_windows = (train.n_tokens - 1) // T
    s = BatchStream(train, 1, T, seed=0)
    epoch0 = sorted(tuple(next(s)[0][0].tolist()) for _ in range(n_windows))
    assert s.epoch == 1 and s.position == 0
    expected = sorted(tuple(train.tokens(k * T, T).tolist()) for k in range(n_windows))
    assert epoch0 == expected
    epoch1 = [tuple(next(s)[0][0].tolist()) for _ in range(n_windows)]
    assert sorted(epoch1) == expected and epoch1 != epoch0  # reshuffled
    ordered = BatchStream(train, n_windows, T, shuffle=False)
    assert np.array_equal(next(ordered)[0].flatten().numpy(), train.tokens(0, n_windows * T))


def test_batch_stream_ranks_split_the_global_batch(shards_dir):
    train = TokenShards(shards_dir)
    whole = take(BatchStream(train, 6, 8, seed=2), 4)
    ranks = [take(BatchStream(train, 2, 8, seed=2, rank=r, world_size=3), 4) for r in range(3)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(x, torch.cat([ranks[r][step][0] for r in range(3)]))
        assert torch.equal(y, torch.cat([ranks[r][step][1] for r in range(3)]))


def test_batch_stream_refuses_a_mismatched_state(shards_dir):
    train = TokenShards(shards_dir)
    state = BatchStream(train, 4, 16).state_dict()
    with pytest.raises(LmforgeError, match="seq_len was 16 when saved, now 8"):
        BatchStream(train, 4, 8).load_state_dict(state)
    with pytest.raises(LmforgeError, match="n_tokens"):
        BatchStream(TokenShards(shards_dir, "val"), 4, 16).load_state_dict(state)
