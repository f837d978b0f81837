"""Train a byte-level BPE vocabulary on your own text.

Algorithm (Sennrich et al. 2016, byte-level as in GPT-2): pre-tokenize, count distinct pieces, then
repeatedly merge the most frequent adjacent pair of symbols. Ties go to the smallest (left id, right id),
so training is deterministic. Ids: 0..255 are the bytes, 256+k is merge k, special tokens come last.
Special-token text in the corpus is cut out before counting, so no merge ever spans or builds one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import regex

from lmforge.common import LmforgeError, cpu_count
from lmforge.tokenizer import pretokenize
from lmforge.tokenizer.bpe import BPETokenizer, _bpe, _fix_surrogates


def read_corpus(inputs: Iterable[str | Path]) -> list[bytes]:
    """Corpus documents as UTF-8 bytes: `str` items are texts, `Path` items are files (read as raw bytes)."""
    docs = []
    for item in inputs:
        if isinstance(item, Path):
            if not item.exists():
                raise LmforgeError(f"training file not found: {item}")
            if item.is_dir():
                raise LmforgeError(f"expected a file, got a directory: {item}")
            try:
                docs.append(item.read_bytes())
            except OSError as e:
                raise LmforgeError(f"cannot read {item}: {e.strerror or e}") from None
        elif isinstance(item, str):
            docs.append(_fix_surrogates(item).encode("utf-8"))
        else:
            raise LmforgeError(f"corpus items must be str (text) or Path (file), got {type(item).__name__}")
    return docs


def count_pieces(docs: Sequence[bytes], pattern: str, special_tokens: Sequence[str] = (),
                 num_threads: int | None = None, backend: str = "auto") -> dict[bytes, int]:
    """Frequency of every pre-tokenized piece in the corpus (special-token text removed first)."""
    if special_tokens:
        splitter = regex.compile(b"|".join(regex.escape(s.encode("utf-8")) for s in special_tokens))
        docs = [seg for d in docs for seg in splitter.split(d) if seg]
    kind = pretokenize.scanner_kind(pattern)
    if backend != "python" and _bpe is not None and kind:
        return _bpe.count_words(list(docs), kind, num_threads or cpu_count())
    counts: Counter[bytes] = Counter()
    for d in docs:
        counts.update(pretokenize.split_bytes(d, pattern))
    return dict(counts)


def learn_merges(word_counts: dict[bytes, int], n_merges: int, min_frequency: int = 2, backend: str = "auto",
                 progress: Callable[[int], None] | None = None) -> list[tuple[int, int]]:
    """Up to `n_merges` merges (left id, right id); stops early when the best pair is rarer than `min_frequency`."""
    words, counts = list(word_counts.keys()), list(word_counts.values())
    if backend != "python" and _bpe is not None:
        return _bpe.train_merges(words, counts, n_merges, min_frequency, progress)
    return learn_merges_py(words, counts, n_merges, min_frequency, progress)


def learn_merges_py(words: list[bytes], counts: list[int], n_merges: int, min_frequency: int,
                    progress: Callable[[int], None] | None = None) -> list[tuple[int, int]]:
    """Reference trainer: recount every pair each round (slow, obviously correct)."""
    symbols = [list(w) for w in words]
    merges: list[tuple[int, int]] = []
    for k in range(n_merges):
        stats: Counter[tuple[int, int]] = Counter()
        for sym, c in zip(symbols, counts):
            for pair in zip(sym, sym[1:]):
                stats[pair] += c
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        if stats[best] < min_frequency:
            break
        new = 256 + k
        for i, sym in enumerate(symbols):
            out, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and sym[j] == best[0] and sym[j + 1] == best[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(sym[j])
                    j += 1
            symbols[i] = out
        merges.append(best)
        if progress and ((k + 1) % 64 == 0 or k + 1 == n_merges):
            progress(k + 1)
    return merges


def train_bpe(inputs: Iterable[str | Path], vocab_size: int, pattern: str = "gpt4",
              special_tokens: Sequence[str] = (), min_frequency: int = 2, num_threads: int | None = None,
              backend: str = "auto", show_progress: bool = False) -> BPETokenizer:
    """Train a tokenizer whose vocabulary (bytes + merges + specials) has at most `vocab_size` ids."""
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not s for s in special_tokens):
        raise LmforgeError("special tokens must be distinct, non-empty strings")
    if vocab_size < 256 + len(special_tokens):
        raise LmforgeError(f"vocab size {vocab_size} is too small: the byte alphabet needs 256 ids plus "
                           f"{len(special_tokens)} for special tokens")
    pattern = pretokenize.resolve_pattern(pattern)
    try:
        pretokenize.compile_pattern(pattern)
    except regex.error as e:
        raise LmforgeError(f"invalid split pattern: {e}") from None
    docs = read_corpus(inputs)
    if not any(docs):
        raise LmforgeError("training corpus is empty")
    counts = count_pieces(docs, pattern, special_tokens, num_threads, backend)
    if not counts:
        raise LmforgeError("training corpus is empty once special tokens are removed")
    n_merges = vocab_size - 256 - len(special_tokens)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="merges", unit="merge")

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    merges = learn_merges(counts, n_merges, min_frequency, backend, progress if bar else None)
    if bar:
        bar.close()
    tokens, merges = _vocab_from_merges(merges)
    specials = {s: len(tokens) + i for i, s in enumerate(special_tokens)}
    return BPETokenizer(tokens, merges, pattern, specials, backend=backend)


def _vocab_from_merges(merges: list[tuple[int, int]]) -> tuple[list[bytes | None], list[tuple[int, int]]]:
    """Tokens and merges in final ids. Merge k makes symbol 256+k; if two merges build the same bytes
    (possible in BPE, rare), the later one reuses the earlier id, as HF's trainer does."""
    tokens: list[bytes | None] = [bytes([b]) for b in range(256)]
    index = {t: i for i, t in enumerate(tokens)}
    symbol_to_id = list(range(256))
    out = []
    for a, b in merges:
        a, b = symbol_to_id[a], symbol_to_id[b]
        joined = tokens[a] + tokens[b]
        if joined not in index:
            index[joined] = len(tokens)
            tokens.append(joined)
        symbol_to_id.append(index[joined])
        out.append((a, b))
    return tokens, out
