"""Regex pre-tokenization: split text into the pieces BPE merges inside (never across).

The named patterns are the ones the ecosystem uses. The compiled core (`_bpe.c`) has hand-written
scanners for exactly these; any other pattern runs through the `regex` module (slower, same API).
"""

from __future__ import annotations

import regex

# GPT-2 (also r50k/p50k in tiktoken's spelling, which is equivalent).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TIKTOKEN_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# "GPT-4" as the HF ecosystem writes it (Llama 3 tokenizer.json): cl100k's split without the `$` rule,
# which Oniguruma (HF tokenizers' regex engine) would read as end-of-line.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tiktoken's cl100k_base (adds `\s++$`: trailing whitespace at the end of the text stays one piece).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# name -> (pattern, id of the compiled scanner in _bpe.c). Equivalent spellings share a scanner.
PATTERNS: dict[str, tuple[str, int]] = {
    "gpt2": (GPT2_PATTERN, 1),
    "gpt4": (GPT4_PATTERN, 2),
    "cl100k": (CL100K_PATTERN, 3),
    "o200k": (O200K_PATTERN, 4),
}
_KIND_BY_PATTERN = {p: k for p, k in PATTERNS.values()}
_KIND_BY_PATTERN[TIKTOKEN_R50K_PATTERN] = 1
# HF ByteLevel's built-in regex is GPT-2's; Llama 3's tokenizer.json spells GPT-4's this way.
_NAME_BY_KIND = {k: name for name, (_, k) in PATTERNS.items()}


def resolve_pattern(pattern: str) -> str:
    """A pattern name ('gpt2', 'gpt4', 'cl100k', 'o200k') or a regex string -> the regex string."""
    if pattern in PATTERNS:
        return PATTERNS[pattern][0]
    return pattern


def scanner_kind(pattern: str) -> int:
    """Id of the compiled scanner that implements `pattern` exactly, or 0 if only `regex` can run it."""
    return _KIND_BY_PATTERN.get(resolve_pattern(pattern), 0)


def pattern_name(pattern: str) -> str | None:
    """The short name of a known pattern (for messages and metadata), else None."""
    kind = scanner_kind(pattern)
    return _NAME_BY_KIND.get(kind) if kind else None


_compiled: dict[str, regex.Pattern] = {}


def compile_pattern(pattern: str) -> regex.Pattern:
    pat = resolve_pattern(pattern)
    if pat not in _compiled:
        _compiled[pat] = regex.compile(pat)
    return _compiled[pat]


def split(text: str, pattern: str) -> list[str]:
    """Reference pre-tokenizer: the matches of `pattern` and the text between them, in order (HF's
    Split behaviour "Isolated"), so concatenating the pieces always gives `text` back."""
    pieces, pos = [], 0
    for m in compile_pattern(pattern).finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        pos = max(pos, m.end())
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def split_bytes(data: bytes, pattern: str) -> list[bytes]:
    """Pre-tokenize arbitrary bytes: each invalid UTF-8 byte acts as one punctuation-like character."""
    text = data.decode("utf-8", errors="surrogateescape")
    return [p.encode("utf-8", errors="surrogateescape") for p in split(text, pattern)]
