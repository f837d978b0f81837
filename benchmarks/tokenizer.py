"""Tokenizer speed: lmforge against tiktoken (encoding) and HF tokenizers (BPE training), same corpus.

    python benchmarks/tokenizer.py [--mb 20] [--repeats 5] [--threads N] [--json-out PATH]

Corpus: `lmforge.assets.mixed_corpus(mb * 1e6)`, stdlib code and State of the Union prose (~60/40), all
fetched from package registries once and cached. Every measurement runs in this one process, ours and the
peer alternating (A B A B ...) so drift in machine load hits both, with the same thread count, and
reports medians. Before any timing, ours and tiktoken must give identical ids on every document.

stdout carries one JSON line per measurement:
    {"bench", "ours", "peer", "ratio", "unit", "higher_is_better", ...}
ratio is always ours / peer in `unit`: with higher_is_better true (MB/s) a ratio above 1 means ours is
faster; with higher_is_better false (seconds) a ratio below 1 means ours is faster. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmforge import assets
from lmforge.common import cpu_count

TRAIN_VOCAB = 8192


def log(msg: str) -> None:
    print(f"[tokenizer bench] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes (after a collection, so garbage from the last run is not billed to it)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


Prepare = Callable[[], Callable[[], object]]  # untimed set-up of one run, returning the run to time


def interleaved(ours: Prepare, peer: Prepare, repeats: int, label: str) -> tuple[list[float], list[float]]:
    """Time ours then peer, `repeats` times, alternating; returns both lists of seconds.

    Each side is prepared afresh (untimed) before every run, so no run inherits a warm cache from the last.
    """
    ours_s, peer_s = [], []
    for i in range(repeats):
        ours_s.append(timed(ours()))
        peer_s.append(timed(peer()))
        log(f"{label} {i + 1}/{repeats}: ours {ours_s[-1]:.3f}s, peer {peer_s[-1]:.3f}s")
    return ours_s, peer_s


def emit(record: dict, json_out: Path | None) -> None:
    """One JSON line on stdout (and appended to --json-out)."""
    line = json.dumps(record)
    print(line, flush=True)
    if json_out is not None:
        with open(json_out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def throughput_record(bench: str, n_bytes: int, ours_s: list[float], peer_s: list[float], **extra) -> dict:
    ours = n_bytes / 1e6 / statistics.median(ours_s)
    peer = n_bytes / 1e6 / statistics.median(peer_s)
    return {"bench": bench, "ours": round(ours, 3), "peer": round(peer, 3), "ratio": round(ours / peer, 4),
            "unit": "MB/s", "higher_is_better": True, **extra,
            "ours_seconds": [round(s, 4) for s in ours_s], "peer_seconds": [round(s, 4) for s in peer_s]}


def check_identical(ours_tok, enc, docs: list[str], threads: int) -> None:
    """Ours must reproduce tiktoken's ids exactly, per document and in batch, before anything is timed."""
    for i, doc in enumerate(docs):
        a, b = ours_tok.encode(doc), enc.encode_ordinary(doc)
        if a != b:
            pairs = enumerate(zip(a, b, strict=False))
            at = next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))
            raise AssertionError(f"doc {i}: ids differ from tiktoken at token {at} "
                                 f"(ours {a[at:at + 5]}, tiktoken {b[at:at + 5]}); near {doc[:80]!r}")
    assert ours_tok.encode_batch(docs, num_threads=threads) == enc.encode_ordinary_batch(
        docs, num_threads=threads), "encode_batch differs from tiktoken's encode_ordinary_batch"
    log(f"ids identical to tiktoken on all {len(docs)} documents")


def bench_encode(load_ours: Callable[[], object], enc, docs: list[str], n_bytes: int, args,
                 json_out: Path | None) -> None:
    """a. one thread, one document at a time; b. a whole batch on `threads` threads.

    Ours is a fresh tokenizer for every run: it memoizes piece -> ids inside the object, which would
    otherwise start each repeat warm from the one before. tiktoken keeps no such cache.
    """
    def ours_single() -> Callable[[], object]:
        tok = load_ours()
        return lambda: [tok.encode(d) for d in docs]

    def peer_single() -> Callable[[], object]:
        return lambda: [enc.encode_ordinary(d) for d in docs]

    ours_s, peer_s = interleaved(ours_single, peer_single, args.repeats, "encode 1 thread")
    emit(throughput_record("tokenizer_encode_single_thread", n_bytes, ours_s, peer_s, threads=1,
                           peer_name=f"tiktoken {_version('tiktoken')} encode_ordinary", vocab="cl100k_base",
                           mb=round(n_bytes / 1e6, 3), docs=len(docs), fresh_tokenizer_per_run=True), json_out)

    t = args.threads

    def ours_batch() -> Callable[[], object]:
        tok = load_ours()
        return lambda: tok.encode_batch(docs, num_threads=t)

    def peer_batch() -> Callable[[], object]:
        return lambda: enc.encode_ordinary_batch(docs, num_threads=t)

    ours_s, peer_s = interleaved(ours_batch, peer_batch, args.repeats, f"encode batch {t} threads")
    emit(throughput_record("tokenizer_encode_batch", n_bytes, ours_s, peer_s, threads=t,
                           peer_name=f"tiktoken {_version('tiktoken')} encode_ordinary_batch",
                           vocab="cl100k_base", mb=round(n_bytes / 1e6, 3), docs=len(docs),
                           fresh_tokenizer_per_run=True), json_out)


def bench_train(docs: list[str], n_bytes: int, args, json_out: Path | None) -> None:
    """c. seconds to train a byte-level BPE of TRAIN_VOCAB tokens with the GPT-2 split pattern."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lmforge.tokenizer import train_bpe

    # Same thread count for both: HF trains on rayon's pool (RAYON_NUM_THREADS, set in main).
    trained: dict[str, object] = {}

    def ours() -> Callable[[], object]:
        def run() -> None:
            trained["ours"] = train_bpe(docs, vocab_size=TRAIN_VOCAB, pattern="gpt2", num_threads=args.threads)
        return run

    def peer() -> Callable[[], object]:
        def run() -> None:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(vocab_size=TRAIN_VOCAB, min_frequency=2, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator(docs, trainer, length=len(docs))
            trained["peer"] = tok
        return run

    ours_s, peer_s = interleaved(ours, peer, args.train_repeats, f"train BPE vocab {TRAIN_VOCAB}")
    ours_tokens = sum(len(ids) for ids in trained["ours"].encode_batch(docs, num_threads=args.threads))
    peer_tokens = sum(len(e.ids) for e in trained["peer"].encode_batch(docs))
    ours, peer = statistics.median(ours_s), statistics.median(peer_s)
    emit({"bench": "tokenizer_train_bpe", "ours": round(ours, 3), "peer": round(peer, 3),
          "ratio": round(ours / peer, 4), "unit": "s", "higher_is_better": False, "vocab_size": TRAIN_VOCAB,
          "threads": args.threads,
          "peer_name": f"tokenizers {_version('tokenizers')} BpeTrainer (ByteLevel)",
          "ours_bytes_per_token": round(n_bytes / ours_tokens, 4),
          "peer_bytes_per_token": round(n_bytes / peer_tokens, 4),
          "ours_vocab": trained["ours"].vocab_size, "peer_vocab": trained["peer"].get_vocab_size(),
          "mb": round(n_bytes / 1e6, 3), "docs": len(docs),
          "ours_seconds": [round(s, 4) for s in ours_s], "peer_seconds": [round(s, 4) for s in peer_s]},
         json_out)


def _version(module: str) -> str:
    return getattr(sys.modules.get(module), "__version__", "?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8 (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side, encode benches")
    p.add_argument("--train-repeats", type=int, default=None, help="timed runs, training (default --repeats)")
    p.add_argument("--threads", type=int, default=cpu_count(), help="threads, batch and training benches")
    p.add_argument("--only", choices=["encode", "train"], default=None, help="run one group of benches")
    p.add_argument("--json-out", type=Path, default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    args.train_repeats = args.train_repeats or args.repeats
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Thread pools read these once, when first used: set them before importing the tokenizer libraries.
    for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(assets.tiktoken_cache_dir())  # offline: our cached rank files

    import tiktoken

    from lmforge.tokenizer import load_tokenizer

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)

    docs = assets.mixed_corpus(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    log(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.2f} MB; threads {args.threads}")

    if args.only in (None, "encode"):
        enc = tiktoken.get_encoding("cl100k_base")
        check_identical(load_tokenizer("cl100k_base"), enc, docs, args.threads)
        bench_encode(lambda: load_tokenizer("cl100k_base"), enc, docs, n_bytes, args, args.json_out)
    if args.only in (None, "train"):
        bench_train(docs, n_bytes, args, args.json_out)


if __name__ == "__main__":
    main()
