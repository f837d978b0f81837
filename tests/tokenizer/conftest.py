"""Shared fixtures for tokenizer tests: a varied string corpus, trained tokenizers, offline tiktoken."""

from __future__ import annotations

import os
import random

import pytest

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "It's what they've said: we'll see, I'd guess.",
           "HELLO WORLD'S END", "Don't STOP'LL 'VE", "state-of-the-art results (see Table 3)",
           "Mr. O'Neil paid $1,234.56 on 2024-01-31 at 10:45pm."]
CODE = ["def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "if __name__ == '__main__':\n\tmain()\r\n", "const url = `https://example.com/a/b?q=1&r=2`;",
        '{"key": [1, 2.5, null, true], "nested": {"x": "y"}}', "SELECT * FROM t WHERE id IN (1,2,3);",
        "    \n        pass\n\n\n", "x=1;y=2//3/**/"]
SCRIPTS = ["中文字符和标点符号。", "日本語のテキスト、カタカナ", "한국어 문장입니다", "Привет, мир! Ёлка",
           "Καλημέρα κόσμε", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก", "שלום עולם", "naïve café résumé",
           "e\u0301 a\u0300\u0301 \u0301start", "ÀB中 ÉCOLE étÉ", "ǅungla ᾈ ǈ"]
EMOJI = ["🤖", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "🙂🙃😀", "∑∫√∞ ≤≥ ±×÷", "→ ⇒ ∀x∃y", "©®™", "\u200b\u200d\ufeff"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t \n", "\u00a0", "\u3000", "\u2028", "\x0b\x0c",
              "     \n\n  ", " \r\n\r\n "]
DIGITS = ["0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "1e-10", "٣٤٥", "Ⅻ", "½", "²³"]
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>", "<|endoftext", "|>"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'ſ", "'x", "''", "'"]
FRAGMENTS = ENGLISH + CODE + SCRIPTS + EMOJI + WHITESPACE + DIGITS + SPECIALS + CONTRACTIONS
# Long-established blocks only, so Unicode-version differences between regex engines cannot matter.
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
          (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
          (0x1F300, 0x1F64F), (0x300, 0x36F)]


def varied_strings(n: int = 2400, seed: int = 0) -> list[str]:
    """Deterministic mix of prose, code, many scripts, emoji, whitespace runs, digits, contractions, specials."""
    rng = random.Random(seed)
    out = list(FRAGMENTS)
    seps = ["", " ", "  ", "\n", "\t", " \n", "\r\n", ", "]
    while len(out) < n:
        r = rng.random()
        if r < 0.6:
            parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 6))]
            out.append("".join(p + rng.choice(seps) for p in parts))
        elif r < 0.85:
            chars = []
            for _ in range(rng.randint(1, 40)):
                lo, hi = rng.choice(RANGES)
                chars.append(chr(rng.randint(lo, hi)))
            out.append("".join(chars))
        else:  # ASCII soup: letters, digits, punctuation and whitespace in odd combinations
            out.append("".join(rng.choice("aZ'sSt \t\n\r09.,!?-_/\\\"") for _ in range(rng.randint(1, 60))))
    return out


@pytest.fixture(scope="session")
def strings() -> list[str]:
    return varied_strings()


@pytest.fixture(scope="session")
def train_text() -> str:
    """~300 KB of mixed training text: the standard library's own source and the fixtures' fragments."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    parts.append("\n".join(varied_strings(3000, seed=1)))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def trained(train_text):
    """Tokenizers trained once per session: pattern name -> tokenizer (vocab 1000, one special)."""
    from lmforge.tokenizer import train_bpe

    return {p: train_bpe([train_text], vocab_size=1000, pattern=p, special_tokens=["<|endoftext|>"])
            for p in ("gpt2", "gpt4", "o200k")}


@pytest.fixture(scope="session")
def tiktoken_mod():
    """tiktoken, pointed at lmforge's offline copies of the public rank files."""
    from lmforge import assets

    os.environ["TIKTOKEN_CACHE_DIR"] = str(assets.tiktoken_cache_dir())
    import tiktoken

    return tiktoken
