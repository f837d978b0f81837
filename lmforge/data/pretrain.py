"""Pretraining data: tokenize a corpus once into flat token shards, then read training windows from them.

A shard directory (written by `build_shards`, read by `TokenShards`):
  train.bin, val.bin   token ids back to back, little-endian uint16 when vocab_size <= 65536, else uint32;
                       a split longer than `shard_tokens` is cut into train_000.bin, train_001.bin, ...
                       and read back as one stream
  meta.json            dtype, vocab size, separator, tokens / documents / files per split, sources, bytes of
                       text, tokenizer hash; written last, so it marks a complete build
Every document is followed by the separator id (`<|endoftext|>`), as in GPT-2's training data: the model
learns where documents end, and a window that spans two documents sees the boundary.

Train/val split, by document: a document goes to val when a hash of its text keyed by `seed` falls below
`val_fraction`. The split is deterministic for a seed and does not depend on thread count, and exact
duplicate documents always land on the same side, so val text cannot leak into train by copy. Guarantees:
with >= 2 documents (and val_fraction > 0) both splits get at least one document (the last document is
moved if needed); with 1 document its token stream is cut instead, and val gets the last
max(1, round(n * val_fraction)) of its n tokens (separator included), train the rest.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge import __version__
from lmforge.common import LmforgeError, atomic_write_text
from lmforge.data.sources import Corpus
from lmforge.tokenizer import BPETokenizer

if TYPE_CHECKING:
    import torch

ENDOFTEXT = "<|endoftext|>"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M ids: 512 MB files at uint16
_FLUSH_TOKENS = 1 << 20  # ids buffered as Python ints before they are written as one array
_SHARD_FILE = re.compile(r"^(train|val)(_\d+)?\.bin$")


# ---------------------------------------------------------------------------------------------- building

def build_shards(inputs: Iterable[str | Path], tokenizer: BPETokenizer, out_dir: str | Path, *,
                 val_fraction: float = 0.01, seed: int = 0, num_threads: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, separator_id: int | None = None,
                 text_field: str = "text", glob: str = "*", chunk_bytes: int = 8 << 20, progress: bool = True,
                 log: Callable[[str], None] | None = print) -> dict:
    """Tokenize `inputs` (files, directories, texts; see `sources`) into token shards in `out_dir`; returns meta.

    Documents are tokenized `chunk_bytes` at a time with `tokenizer.encode_batch` (threads in the C core), so
    the result is the same for any `num_threads`. `separator_id` overrides the tokenizer's `<|endoftext|>`.
    """
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise LmforgeError(f"shard_tokens must be positive, got {shard_tokens}")
    t0 = time.perf_counter()
    vocab_size = tokenizer.vocab_size
    sep, sep_name = _separator(tokenizer, separator_id)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    corpus = Corpus(inputs, text_field, glob)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir, s, np.dtype(dtype).newbyteorder("<"), shard_tokens) for s in SPLITS}
    try:
        text_bytes = _tokenize(corpus, tokenizer, writers, sep, val_fraction, seed, num_threads, chunk_bytes,
                               progress)
        for w in writers.values():
            w.close()
        files = _publish(out_dir, writers)
    finally:
        for w in writers.values():
            w.discard()  # temp files left by an error; a no-op after _publish
    meta = {
        "format": "lmforge-token-shards",
        "version": 1,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "separator_id": sep,
        "separator": sep_name,
        "n_tokens": {s: writers[s].n_tokens for s in SPLITS},
        "n_documents": {s: writers[s].n_docs for s in SPLITS},
        "shards": files,
        "text_bytes": text_bytes,
        "sources": corpus.sources(),
        "n_files": len(corpus.files),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer": {"hash": tokenizer_hash(tokenizer), "vocab_size": vocab_size},
        "lmforge_version": __version__,
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
    if log:
        secs = time.perf_counter() - t0
        n_tok = sum(meta["n_tokens"].values())
        log(f"token shards: {meta['n_tokens']['train']:,} train + {meta['n_tokens']['val']:,} val tokens ({dtype}) "
            f"from {sum(meta['n_documents'].values()):,} documents, {text_bytes / 1e6:.1f} MB of text, "
            f"{n_tok / max(secs, 1e-9) / 1e6:.2f}M tokens/s -> {out_dir}")
    return meta


def _separator(tokenizer: BPETokenizer, separator_id: int | None) -> tuple[int, str | None]:
    """The id written after every document and its special-token name (None for a bare id)."""
    if separator_id is None:
        if ENDOFTEXT not in tokenizer.special_tokens:
            raise LmforgeError(f"the tokenizer has no {ENDOFTEXT} special token to separate documents; "
                               "pass separator_id (or train the tokenizer with that special token)")
        return tokenizer.special_tokens[ENDOFTEXT], ENDOFTEXT
    if not 0 <= separator_id < tokenizer.vocab_size:
        raise LmforgeError(f"separator_id {separator_id} is outside the tokenizer's {tokenizer.vocab_size} ids")
    names = [t for t, i in tokenizer.special_tokens.items() if i == separator_id]
    return separator_id, names[0] if names else None


def _tokenize(corpus: Corpus, tokenizer: BPETokenizer, writers: dict[str, _SplitWriter], sep: int,
              val_fraction: float, seed: int, num_threads: int | None, chunk_bytes: int, progress: bool) -> int:
    """Encode every document and hand it to its split's writer; returns bytes of text (UTF-8)."""
    from tqdm import tqdm

    key = hashlib.sha256(str(seed).encode()).digest()  # any int seed -> a valid 32-byte blake2b key
    held: tuple[list[int], str] | None = None  # the newest document; written once another one follows
    n_docs = text_bytes = 0
    with tqdm(total=corpus.nbytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for texts, used in _chunks(corpus.iter_with_size(), chunk_bytes):
            for text, ids in zip(texts, tokenizer.encode_batch(texts, num_threads=num_threads)):
                data = text.encode("utf-8", errors="replace")
                text_bytes += len(data)
                n_docs += 1
                if held is not None:
                    writers[held[1]].add_document(held[0], sep)
                held = (ids, "val" if _hash_fraction(data, key) < val_fraction else "train")
            bar.update(used)
    ids, split = held
    if n_docs == 1 and val_fraction > 0:  # one document: cut its stream, the tail is val
        stream = ids + [sep]
        n_val = min(len(stream), max(1, round(len(stream) * val_fraction)))
        writers["train"].add_piece(stream[: len(stream) - n_val])
        writers["val"].add_piece(stream[len(stream) - n_val :])
    else:
        if val_fraction > 0 and writers["val"].n_docs == 0:
            split = "val"
        elif writers["train"].n_docs == 0:
            split = "train"
        writers[split].add_document(ids, sep)
    return text_bytes


def _chunks(docs: Iterator[tuple[str, int]], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Group (document, size) pairs into lists of about `chunk_bytes` input bytes: one encode_batch call each."""
    texts, used = [], 0
    for text, size in docs:
        texts.append(text)
        used += size
        if used >= chunk_bytes:
            yield texts, used
            texts, used = [], 0
    if texts:
        yield texts, used


def _hash_fraction(data: bytes, key: bytes) -> float:
    """A uniform number in [0, 1) fixed by the document's bytes and the key (from the seed)."""
    digest = hashlib.blake2b(data, digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


class _SplitWriter:
    """Appends the ids of one split to temp shard files of at most `shard_tokens` ids each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.temps: list[tuple[Path, int]] = []  # (temp file, ids in it)
        self.n_tokens = self.n_docs = 0
        self._buf: list[int] = []
        self._file = None

    def add_document(self, ids: list[int], sep: int) -> None:
        self._buf.extend(ids)
        self._buf.append(sep)
        self.n_docs += 1
        if len(self._buf) >= _FLUSH_TOKENS:
            self._flush()

    def add_piece(self, ids: list[int]) -> None:
        """Part of a document (the single-document split): counts as a document if it holds any ids."""
        if ids:
            self._buf.extend(ids)
            self.n_docs += 1

    def _flush(self) -> None:
        arr = np.array(self._buf, dtype=self.dtype)
        self._buf = []
        pos = 0
        while pos < len(arr):
            if self._file is None or self.temps[-1][1] == self.shard_tokens:
                self._open_next()
            path, n = self.temps[-1]
            take = min(len(arr) - pos, self.shard_tokens - n)
            arr[pos : pos + take].tofile(self._file)
            self.temps[-1] = (path, n + take)
            self.n_tokens += take
            pos += take

    def _open_next(self) -> None:
        self._close_file()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.split}_{len(self.temps):03d}.", suffix=".tmp", dir=self.out_dir)
        self._file = os.fdopen(fd, "wb")
        self.temps.append((Path(tmp), 0))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._buf:
            self._flush()
        self._close_file()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for path, _ in self.temps:
            path.unlink(missing_ok=True)


def _publish(out_dir: Path, writers: dict[str, _SplitWriter]) -> dict[str, list[dict]]:
    """Rename temp shards to their final names (train.bin, or train_000.bin ... when several) and drop the old
    meta.json and shard files first, so a crash never pairs an old meta.json with new shards."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    names = {}
    for split, w in writers.items():
        many = len(w.temps) > 1
        names[split] = [(tmp, f"{split}_{k:03d}.bin" if many else f"{split}.bin", n)
                        for k, (tmp, n) in enumerate(w.temps)]
    keep = {name for entries in names.values() for _, name, _ in entries}
    for old in out_dir.iterdir():
        if _SHARD_FILE.match(old.name) and old.name not in keep:
            old.unlink()
    umask = os.umask(0)
    os.umask(umask)
    for entries in names.values():
        for tmp, name, _ in entries:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would have
            os.replace(tmp, out_dir / name)
    for w in writers.values():
        w.temps = []
    return {split: [{"file": name, "n_tokens": n} for _, name, n in entries] for split, entries in names.items()}


def tokenizer_hash(tokenizer: BPETokenizer) -> str:
    """A fingerprint of everything that decides the ids: vocabulary, merges, specials, split pattern."""
    h = hashlib.sha256()
    settings = {"pattern": tokenizer.pattern, "special_tokens": sorted(tokenizer.special_tokens.items()),
                "ignore_merges": tokenizer.ignore_merges, "add_prefix_space": tokenizer.add_prefix_space,
                "normalizer": tokenizer.normalizer}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(b"".join(b"\xff\xff\xff\xff" if t is None else len(t).to_bytes(4, "little") + t
                      for t in tokenizer.tokens))
    if tokenizer.merges is not None:
        h.update(np.asarray(tokenizer.merges, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def check_vocab(meta: dict, vocab_size: int, tokenizer: BPETokenizer | None = None) -> None:
    """Raise when shards built per `meta` can hold ids >= the model's `vocab_size`, or (given `tokenizer`)
    when they were built with a different tokenizer."""
    built = meta["vocab_size"]
    if built > vocab_size:
        raise LmforgeError(f"the token shards were built with a tokenizer of {built} ids, but the model has only "
                           f"{vocab_size}: ids >= {vocab_size} would index past its embedding; rebuild the shards "
                           "with the model's tokenizer or raise the model's vocab_size")
    if tokenizer is not None and meta.get("tokenizer", {}).get("hash") != tokenizer_hash(tokenizer):
        raise LmforgeError("the token shards were built with a different tokenizer than this one "
                           "(tokenizer hash differs); rebuild the shards with this tokenizer")


# ---------------------------------------------------------------------------------------------- reading

class TokenShards:
    """A read-only, memory-mapped view of one split of a shard directory as one flat stream of ids.

    `path` is the directory or its meta.json. Windows may span shard files; nothing is loaded up front.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        path = Path(path)
        meta_path = path / "meta.json" if path.is_dir() else path
        if not meta_path.is_file():
            raise LmforgeError(f"no token shards at {path} (meta.json missing); build them with build_shards first")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            entries = meta["shards"]
            if split not in entries:
                raise LmforgeError(f"{meta_path} has no split {split!r} (splits: {', '.join(entries)})")
            self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            self.vocab_size: int = meta["vocab_size"]
            self.separator_id: int = meta["separator_id"]
            files = [(meta_path.parent / e["file"], int(e["n_tokens"])) for e in entries[split]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LmforgeError(f"{meta_path} is not a token-shards meta.json ({type(e).__name__}: {e})") from None
        self.meta, self.split, self.dir = meta, split, meta_path.parent
        self._maps: list[np.memmap] = []
        self._starts = [0]  # stream position of each file's first id, then the total
        for file, n in files:
            expected = n * self.dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                found = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
                raise LmforgeError(f"token shard {file} is {found}, expected {expected} bytes; rebuild the shards")
            self._maps.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(n,)))
            self._starts.append(self._starts[-1] + n)
        self.n_tokens = self._starts[-1]
        if self.n_tokens == 0:
            raise LmforgeError(f"the {split!r} split of {self.dir} has no tokens"
                               + (" (built with val_fraction=0)" if split == "val" else ""))

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.dir)!r}, split={self.split!r}, n_tokens={self.n_tokens}, "
                f"files={len(self._maps)}, dtype={self.dtype.name})")

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` ids from stream position `start` as int64 (a copy; may span shard files)."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.n_tokens}")
        k = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while length > 0:
            offset = start - self._starts[k]
            take = min(length, self._starts[k + 1] - start)
            parts.append(self._maps[k][offset : offset + take])
            start, length, k = start + take, length - take, k + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def check_window(self, seq_len: int) -> None:
        """Raise unless the split holds at least one window of seq_len + 1 ids (inputs plus shifted targets)."""
        if seq_len < 1:
            raise LmforgeError(f"seq_len must be positive, got {seq_len}")
        if self.n_tokens < seq_len + 1:
            raise LmforgeError(f"the {self.split!r} split of {self.dir} has {self.n_tokens} tokens, shorter than one "
                               f"training window of seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")

    def batch_at(self, starts: Iterable[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y = x shifted by one, int64 (B, T), for windows beginning at `starts`."""
        import torch

        starts = [int(s) for s in starts]
        buf = np.empty((len(starts), seq_len + 1), dtype=np.int64)
        for row, start in enumerate(starts):
            buf[row] = self.tokens(start, seq_len + 1)
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)

    def sample_batch(self, batch_size: int, seq_len: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows at uniformly random positions (nanoGPT's get_batch); reproducible per generator."""
        import torch

        self.check_window(seq_len)
        starts = torch.randint(0, self.n_tokens - seq_len, (batch_size,), generator=generator)
        return self.batch_at(starts.tolist(), seq_len)

    def iter_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every non-overlapping window in order, `batch_size` per batch (the last may be smaller): evaluation.

        Window k covers inputs [k*T, (k+1)*T); the last < T ids that do not fill a window are left out.
        """
        self.check_window(seq_len)
        n_windows = (self.n_tokens - 1) // seq_len

        def batches():
            for first in range(0, n_windows, batch_size):
                last = min(first + batch_size, n_windows)
                yield self.batch_at(range(first * seq_len, last * seq_len, seq_len), seq_len)

        return batches()


class BatchStream:
    """Endless training batches: every non-overlapping window once per epoch, in an order shuffled per epoch.

    Resumable exactly: `load_state_dict(state_dict())` on a fresh stream continues with the very batches the
    original would have produced next. With `world_size` > 1 each step takes batch_size * world_size windows
    and rank r gets its own slice of them (the state is the same on every rank).
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        shards.check_window(seq_len)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise LmforgeError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                               f"{world_size}")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.n_windows = (shards.n_tokens - 1) // seq_len
        self.epoch = 0
        self.position = 0  # windows of this epoch already handed out
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.batch_size * self.world_size
        windows: list[int] = []
        while len(windows) < need:  # a step may run over into the next epoch
            if self._order is None:
                self._order = self._epoch_order()
            take = min(need - len(windows), self.n_windows - self.position)
            windows.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        mine = windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.shards.batch_at([w * self.seq_len for w in mine], self.seq_len)

    def state_dict(self) -> dict:
        """A small JSON-able dict: where the stream is, and what it must be reading to resume there."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "n_tokens": self.shards.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "n_tokens", "shuffle"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise LmforgeError(f"cannot resume the data stream: {key} was {state[key]} when saved, now {mine} "
                                   "(the shards or the window length changed)")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = None
