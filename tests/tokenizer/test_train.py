"""Trainer: compiled == reference merge for merge, compression on par with HF's trainer, clear errors."""

from pathlib import Path

import pytest

from lmforge.common import LmforgeError
from lmforge.tokenizer import train_bpe
from lmforge.tokenizer.bpe import has_compiled_core
from lmforge.tokenizer.train import count_pieces, learn_merges, read_corpus


@pytest.mark.skipif(not has_compiled_core(), reason="compiled core not built")
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "o200k"])
def test_compiled_trainer_equals_reference(train_text, pattern):
    docs = read_corpus([train_text[:60_000]])
    counts_c = count_pieces(docs, pattern, ["<|endoftext|>"], num_threads=2, backend="c")
    counts_py = count_pieces(docs, pattern, ["<|endoftext|>"], backend="python")
    assert counts_c == counts_py
    for min_frequency in (2, 40):
        fast = learn_merges(counts_c, 200, min_frequency, backend="c")
        slow = learn_merges(counts_py, 200, min_frequency, backend="python")
        assert fast == slow
    assert len(learn_merges(counts_c, 10_000, 40, backend="c")) < 10_000  # stopped by min_frequency


def test_tie_breaking_is_deterministic_and_documented():
    # pieces ab - cd - ...: (a, b) and (c, d) both occur 3 times; the smaller pair (97, 98) wins the tie.
    tok = train_bpe(["ab-cd-ab-cd-ab-cd"], vocab_size=258, pattern="gpt2", min_frequency=1)
    assert tok.merges == [(97, 98), (99, 100)]
    assert train_bpe(["ab-cd-ab-cd-ab-cd"], vocab_size=258, pattern="gpt2", backend="python").merges == tok.merges


def test_overlapping_pairs_count_like_hf():
    """'aaaa' has three (a, a) windows; merging goes left to right: aa aa."""
    tok = train_bpe(["aaaa"] * 3, vocab_size=258, pattern="gpt2", min_frequency=1)
    assert tok.tokens[256] == b"aa" and tok.tokens[257] == b"aaaa"
    assert tok.encode("aaaaa") == [257, 97]


def test_compression_within_one_percent_of_hf_trainer():
    """Same corpus, same vocab size, GPT-2 split: bytes per token of ours vs HF's trained tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lmforge import assets

    docs = assets.mixed_corpus(3_000_000)
    held_out, train_docs = docs[::10], [d for i, d in enumerate(docs) if i % 10]
    ours = train_bpe(train_docs, vocab_size=4096, pattern="gpt2", min_frequency=2)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(train_docs, trainers.BpeTrainer(
        vocab_size=4096, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n_bytes = sum(len(d.encode()) for d in held_out)
    ours_bpt = n_bytes / sum(map(len, ours.encode_batch(held_out)))
    hf_bpt = n_bytes / sum(len(e.ids) for e in hf.encode_batch(held_out, add_special_tokens=False))
    assert abs(ours_bpt - hf_bpt) / hf_bpt < 0.01, (ours_bpt, hf_bpt)


def test_trains_from_files_and_directories_of_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello hello hello \xff\xfe invalid utf8 hello")
    tok = train_bpe([tmp_path / "a.txt"], vocab_size=270, pattern="gpt2")
    assert tok.decode_bytes(tok.encode_bytes(b"hello \xff")) == b"hello \xff"
    assert any(t == b" hello" for t in tok.tokens)


@pytest.mark.parametrize("inputs,vocab,specials,match", [
    ([""], 300, [], "corpus is empty"),
    ([], 300, [], "corpus is empty"),
    (["<|endoftext|>"], 300, ["<|endoftext|>"], "empty once special"),
    (["text"], 200, [], "too small"),
    (["text"], 256, ["<|a|>"], "too small"),
    (["text"], 300, ["<|a|>", "<|a|>"], "distinct"),
    ([Path("/no/such/file.txt")], 300, [], "not found"),
])
def test_bad_training_input(inputs, vocab, specials, match):
    with pytest.raises(LmforgeError, match=match):
        train_bpe(inputs, vocab_size=vocab, special_tokens=specials)


def test_invalid_custom_pattern():
    with pytest.raises(LmforgeError, match="invalid split pattern"):
        train_bpe(["text"], vocab_size=300, pattern="(unclosed")
