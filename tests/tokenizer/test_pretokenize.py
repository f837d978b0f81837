"""The compiled scanners must split exactly like the `regex` module running the same pattern."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import pretokenize
from lmforge.tokenizer.bpe import BPETokenizer, has_compiled_core

pytestmark = pytest.mark.skipif(not has_compiled_core(), reason="compiled core not built")

PATTERNS = ["gpt2", "gpt4", "cl100k", "o200k"]


def compiled_splitter(pattern: str):
    tokens = [bytes([b]) for b in range(256)]
    return BPETokenizer(tokens, [], pattern)._core.split


@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_split_matches_regex_on_varied_strings(pattern, strings):
    split = compiled_splitter(pattern)
    for s in strings:
        data = s.encode("utf-8")
        assert split(data) == pretokenize.split_bytes(data, pattern), s


@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_split_matches_regex_on_edge_cases(pattern):
    split = compiled_splitter(pattern)
    cases = ["", " ", "a", "  a", "a  ", "\n", " \n", "\n ", "x \n ", "hi\n ", "hi\n \n", "  \t\n\r\n  end   ",
             "'s'S'ſ'll'LL", "'", "a'", " '", "1234567", " 123", "\u0301", " \u0301a", "ÀB中", "ABC", "aBC",
             "AbC'S", "x//\n/", "!!\n\n", " !!\r\n", "\x00\x1f", "e\u0301\u0301", "Ǆǅǆ", "\u2028x", "a\u00a0b"]
    for s in cases:
        data = s.encode("utf-8")
        assert split(data) == pretokenize.split_bytes(data, pattern), s


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_compiled_split_matches_regex_on_arbitrary_bytes(pattern, data):
    """Invalid UTF-8 bytes are one punctuation-like character each on both paths."""
    assert compiled_splitter(pattern)(data) == pretokenize.split_bytes(data, pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=48))
def test_compiled_split_matches_regex_on_arbitrary_text(pattern, text):
    data = text.encode("utf-8")
    assert compiled_splitter(pattern)(data) == pretokenize.split_bytes(data, pattern)


def test_split_pieces_concatenate_to_input(strings):
    for s in strings[:300]:
        for p in PATTERNS:
            assert "".join(pretokenize.split(s, p)) == s


def test_pattern_names_and_kinds():
    assert pretokenize.scanner_kind("gpt2") == pretokenize.scanner_kind(pretokenize.TIKTOKEN_R50K_PATTERN) == 1
    assert pretokenize.scanner_kind(r"\w+|\W") == 0
    assert pretokenize.pattern_name(pretokenize.O200K_PATTERN) == "o200k"


@pytest.mark.parametrize("pattern", [r"[a-z]+", r"\d", "", r"(?<=a)"])
def test_custom_patterns_keep_unmatched_text_like_hf(pattern):
    """HF's Split(behavior=Isolated) keeps the text between matches as pieces; so do we."""
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    from tokenizers import Regex

    hf = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    for text in ["hello world, again!", "a1b22c", "", "abc", "ÀB 中 x"]:
        ours = pretokenize.split(text, pattern)
        assert "".join(ours) == text
        assert ours == [p for p, _ in hf.pre_tokenize_str(text)], (pattern, text)
