"""Tokenizer fertility statistics: bytes/chars per token, tokens per word (overall and per script),
vocabulary usage, and a histogram of token lengths in bytes.

Works with any tokenizer exposing `encode(text) -> list[int]`, `token_bytes(id) -> bytes` and a
`vocab_size` property, so it can compare our BPE with a tiktoken or HF tokenizer behind a thin adapter.
Fertility (tokens per word) is the usual measure of how well a vocabulary covers a language
(Rust et al. 2021, "How Good is Your Tokenizer?"); per-script numbers show which languages it neglects.
"""

from __future__ import annotations

import io
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from lmforge.common import LmforgeError, atomic_write_bytes


class TokenizerLike(Protocol):
    """The three members the statistics need; any tokenizer can be adapted to this."""

    def encode(self, text: str) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    @property
    def vocab_size(self) -> int: ...


# Script of a letter, read off the first word of its Unicode name ("LATIN SMALL LETTER A",
# "CJK UNIFIED IDEOGRAPH-4E2D", "HIRAGANA LETTER A", "HANGUL SYLLABLE GA", ...). Names are stable across
# Unicode versions and far more readable than a table of code point ranges.
_SCRIPT_BY_NAME_PREFIX = {
    "LATIN": "Latin",
    "CYRILLIC": "Cyrillic",
    "GREEK": "Greek",
    "ARABIC": "Arabic",
    "HEBREW": "Hebrew",
    "CJK": "Han",  # CJK UNIFIED IDEOGRAPH-*, CJK COMPATIBILITY IDEOGRAPH-*
    "HIRAGANA": "Japanese kana",
    "KATAKANA": "Japanese kana",
    "KATAKANA-HIRAGANA": "Japanese kana",  # the prolonged sound mark ー
    "HANGUL": "Hangul",
    "DEVANAGARI": "Devanagari",
    "THAI": "Thai",
}
# Width variants name their script second: "FULLWIDTH LATIN CAPITAL LETTER A", "HALFWIDTH KATAKANA ...".
_WIDTH_PREFIXES = ("FULLWIDTH ", "HALFWIDTH ")
NO_LETTER = "Digits/Symbols"
OTHER_SCRIPT = "Other"


def script_of_word(word: str) -> str:
    """Script group of a word: that of its first letter (Unicode category L*), or Digits/Symbols if none."""
    for ch in word:
        if unicodedata.category(ch).startswith("L"):
            name = unicodedata.name(ch, "")
            for prefix in _WIDTH_PREFIXES:
                name = name.removeprefix(prefix)
            return _SCRIPT_BY_NAME_PREFIX.get(name.split(" ", 1)[0], OTHER_SCRIPT)
    return NO_LETTER


def _ratio(numerator: int, denominator: int) -> float | None:
    """numerator / denominator, or None (JSON null) when the denominator is zero."""
    return numerator / denominator if denominator else None


def _fertility_by_script(tokenizer: TokenizerLike, word_counts: Counter[str]) -> dict[str, dict[str, Any]]:
    """Per script group: words, tokens and tokens/word, each distinct word encoded once as " " + word.

    Encoding words on their own approximates in-context fertility: GPT-2-style pre-tokenizers split text
    into words that carry their leading space, so " word" is how a mid-sentence word is normally seen,
    and no token that spans two words has to be split between their scripts. It differs from in-context
    counts at line starts, after several spaces, and where merges cross a word boundary.
    """
    words: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for word, count in word_counts.items():
        script = script_of_word(word)
        words[script] += count
        tokens[script] += count * len(tokenizer.encode(" " + word))
    return {
        script: {"n_words": n, "n_tokens": tokens[script], "tokens_per_word": tokens[script] / n}
        for script, n in words.most_common()
    }


def compute_stats(tokenizer: TokenizerLike, text: str) -> dict[str, Any]:
    """Fertility statistics of `tokenizer` on `text`, as a JSON-serialisable dict (see module docstring).

    The full text is encoded once and each distinct word once more, so multi-MB corpora stay fast.
    """
    if not text:
        raise LmforgeError("cannot compute tokenizer statistics: the text is empty")
    ids = tokenizer.encode(text)
    if not ids:
        raise LmforgeError("the tokenizer produced no tokens for a non-empty text")
    id_counts = Counter(ids)
    length_hist: Counter[int] = Counter()
    for token_id, count in id_counts.items():  # token_bytes once per distinct id, not per token
        length_hist[len(tokenizer.token_bytes(token_id))] += count
    word_counts = Counter(text.split())
    n_words = sum(word_counts.values())
    n_bytes = len(text.encode("utf-8", errors="surrogateescape"))  # read_text_file keeps bad bytes this way
    vocab_size = int(tokenizer.vocab_size)
    return {
        "n_bytes": n_bytes,
        "n_chars": len(text),
        "n_words": n_words,
        "n_tokens": len(ids),
        "bytes_per_token": n_bytes / len(ids),
        "chars_per_token": len(text) / len(ids),
        "tokens_per_word": _ratio(len(ids), n_words),
        "vocab_size": vocab_size,
        "vocab_used": len(id_counts),
        "vocab_usage": _ratio(len(id_counts), vocab_size),
        "by_script": _fertility_by_script(tokenizer, word_counts),
        "token_length_hist": dict(sorted(length_hist.items())),
    }


def _length_hist(stats: dict[str, Any]) -> dict[int, int]:
    """The histogram with int keys, also for stats read back from JSON (where keys became strings)."""
    return dict(sorted((int(k), int(v)) for k, v in stats["token_length_hist"].items()))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text report of `compute_stats` output for the CLI: totals, per-script fertility, lengths."""
    usage = "n/a" if stats["vocab_usage"] is None else f"{100 * stats['vocab_usage']:.1f}%"
    lines = [
        f"{'bytes':<18}{stats['n_bytes']:>14,}",
        f"{'chars':<18}{stats['n_chars']:>14,}",
        f"{'words':<18}{stats['n_words']:>14,}",
        f"{'tokens':<18}{stats['n_tokens']:>14,}",
        f"{'bytes/token':<18}{_fmt(stats['bytes_per_token']):>14}",
        f"{'chars/token':<18}{_fmt(stats['chars_per_token']):>14}",
        f"{'tokens/word':<18}{_fmt(stats['tokens_per_word']):>14}",
        f"{'vocab used':<18}{stats['vocab_used']:>14,} of {stats['vocab_size']:,} ({usage})",
        "",
        f"{'script':<18}{'words':>14}{'tokens/word':>14}",
    ]
    for script, row in stats["by_script"].items():
        lines.append(f"{script:<18}{row['n_words']:>14,}{_fmt(row['tokens_per_word']):>14}")
    hist = _length_hist(stats)
    total = sum(hist.values())
    lines += ["", f"{'token bytes':<18}{'tokens':>14}{'share':>8}"]
    for length, count in hist.items():
        share = count / total
        lines.append(f"{length:<18}{count:>14,}{100 * share:>7.1f}% {'#' * round(40 * share)}")
    return "\n".join(lines)


def plot_token_lengths(stats: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG bar chart of token lengths in bytes to `path` (atomically) and return the path."""
    # An explicit Agg canvas on a bare Figure: no display needed, and pyplot's global state is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hist = _length_hist(stats)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(list(hist), list(hist.values()), width=0.8, color="tab:blue")
    ax.set_xlabel("token length (bytes)")
    ax.set_ylabel("tokens in text")
    ax.set_title(f"Token lengths: {_fmt(stats['bytes_per_token'], 2)} bytes/token "
                 f"over {stats['n_tokens']:,} tokens")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # lengths and counts are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
