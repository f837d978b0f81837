"""Tokenizer statistics against hand-computed numbers, using tiny stand-in tokenizers defined here."""

from __future__ import annotations

import json

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.tokenizer.stats import compute_stats, format_stats, plot_token_lengths, script_of_word


class ByteTokenizer:
    """Every UTF-8 byte is one token whose id is the byte value; counts every encode call."""

    vocab_size = 256

    def __init__(self) -> None:
        self.encode_calls = 0

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])


class WordTokenizer:
    """One token per whitespace-prefixed word (" bb"), ids handed out on first sight; vocab of 100."""

    vocab_size = 100

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in regex.findall(r"\s*\S+|\s+", text):
            if piece not in self.pieces:
                self.pieces.append(piece)
            ids.append(self.pieces.index(piece))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id].encode("utf-8")


def test_totals_with_byte_tokenizer():
    stats = compute_stats(ByteTokenizer(), "hello world")
    assert stats["n_bytes"] == stats["n_chars"] == stats["n_tokens"] == 11
    assert stats["n_words"] == 2
    assert stats["bytes_per_token"] == stats["chars_per_token"] == 1.0
    assert stats["tokens_per_word"] == 5.5
    assert stats["vocab_size"] == 256
    assert stats["vocab_used"] == len(set("hello world")) == 8
    assert stats["vocab_usage"] == 8 / 256
    assert stats["token_length_hist"] == {1: 11}
    # Each word is encoded on its own with a leading space: " hello" and " world" are 6 tokens each.
    assert stats["by_script"] == {"Latin": {"n_words": 2, "n_tokens": 12, "tokens_per_word": 6.0}}


def test_bytes_and_chars_differ_for_non_ascii():
    stats = compute_stats(ByteTokenizer(), "héllo")  # é is 2 bytes in UTF-8
    assert (stats["n_bytes"], stats["n_chars"], stats["n_tokens"]) == (6, 5, 6)
    assert stats["chars_per_token"] == pytest.approx(5 / 6)


def test_histogram_and_vocab_with_word_tokenizer():
    stats = compute_stats(WordTokenizer(), "a bb ccc bb")
    # Tokens: "a" (1 byte), " bb" (3), " ccc" (4), " bb" (3).
    assert stats["n_tokens"] == 4
    assert stats["token_length_hist"] == {1: 1, 3: 2, 4: 1}
    assert stats["vocab_used"] == 3
    assert stats["vocab_usage"] == 0.03
    assert stats["bytes_per_token"] == 11 / 4
    assert stats["tokens_per_word"] == 1.0


def test_by_script_on_mixed_text():
    text = "hello мир 中文 مرحبا 42 3rd !! мир"
    stats = compute_stats(ByteTokenizer(), text)
    by_script = stats["by_script"]
    assert set(by_script) == {"Latin", "Cyrillic", "Han", "Arabic", "Digits/Symbols"}
    # Tokens per word = 1 (the space) + UTF-8 bytes of the word.
    assert by_script["Latin"] == {"n_words": 2, "n_tokens": 6 + 4, "tokens_per_word": 5.0}  # hello, 3rd
    assert by_script["Cyrillic"] == {"n_words": 2, "n_tokens": 14, "tokens_per_word": 7.0}  # мир twice
    assert by_script["Han"] == {"n_words": 1, "n_tokens": 7, "tokens_per_word": 7.0}
    assert by_script["Arabic"] == {"n_words": 1, "n_tokens": 11, "tokens_per_word": 11.0}
    assert by_script["Digits/Symbols"] == {"n_words": 2, "n_tokens": 6, "tokens_per_word": 3.0}  # 42, !!
    assert sum(row["n_words"] for row in by_script.values()) == stats["n_words"] == 8
    assert list(by_script)[:2] == ["Latin", "Cyrillic"]  # most frequent scripts first


def test_each_distinct_word_is_encoded_once():
    tok = ByteTokenizer()
    compute_stats(tok, "the cat the cat the dog\nthe")
    assert tok.encode_calls == 1 + 3  # the full text, then "the", "cat", "dog"


@pytest.mark.parametrize(
    ("word", "script"),
    [
        ("hello", "Latin"), ("(Straße)", "Latin"), ("3rd", "Latin"), ("ＡＢＣ", "Latin"),
        ("«мир»", "Cyrillic"), ("αβγ", "Greek"), ("مرحبا", "Arabic"), ("שלום", "Hebrew"), ("中文", "Han"),
        ("ひらがな", "Japanese kana"), ("カタカナ", "Japanese kana"), ("ー", "Japanese kana"),
        ("ｶﾀｶﾅ", "Japanese kana"), ("한국어", "Hangul"), ("नमस्ते", "Devanagari"), ("ไทย", "Thai"),
        ("ქართული", "Other"), ("42", "Digits/Symbols"), ("3.14", "Digits/Symbols"), ("!?", "Digits/Symbols"),
    ],
)
def test_script_of_word(word, script):
    assert script_of_word(word) == script


def test_empty_text_is_an_error():
    with pytest.raises(LmforgeError, match="empty"):
        compute_stats(ByteTokenizer(), "")


def test_whitespace_only_text_has_no_fertility():
    stats = compute_stats(ByteTokenizer(), "  \n")
    assert stats["n_words"] == 0 and stats["tokens_per_word"] is None and stats["by_script"] == {}
    assert "n/a" in format_stats(stats)


def test_stats_are_json_and_format_reads_them_back():
    stats = compute_stats(WordTokenizer(), "hello мир 42 hello")
    again = json.loads(json.dumps(stats))  # histogram keys become strings
    report = format_stats(again)
    assert report == format_stats(stats)
    for needle in ("bytes/token", "tokens/word", "vocab used", "Latin", "Cyrillic", "Digits/Symbols"):
        assert needle in report


def test_plot_writes_a_png(tmp_path):
    stats = json.loads(json.dumps(compute_stats(WordTokenizer(), "a bb ccc bb dddd")))
    out = plot_token_lengths(stats, tmp_path / "plots" / "lengths.png")
    assert out == tmp_path / "plots" / "lengths.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000  # a rendered chart with axes and text, not an empty image
    assert [p.name for p in out.parent.iterdir()] == ["lengths.png"]  # no temp file left behind


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1))
def test_totals_are_consistent(text):
    stats = compute_stats(ByteTokenizer(), text)
    assert sum(stats["token_length_hist"].values()) == stats["n_tokens"] == stats["n_bytes"]
    assert sum(row["n_words"] for row in stats["by_script"].values()) == stats["n_words"]
