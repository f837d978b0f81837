"""`lmforge tokenizer train|encode|decode|stats`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge import __version__
from lmforge.common import LmforgeError, atomic_write_text, list_files
from lmforge.tokenizer import pretokenize
from lmforge.tokenizer.formats import load_tokenizer, save_tokenizer
from lmforge.tokenizer.train import train_bpe

TOKENIZER_HELP = "a directory with tokenizer.json, a tokenizer.json, a .tiktoken file, or cl100k_base/o200k_base/..."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge tokenizer", description="Byte-level BPE tokenizers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,encode,decode,stats}")

    t = sub.add_parser("train", help="train a tokenizer on text files", description="Train byte-level BPE on "
                       "text files (directories are searched recursively for files matching --glob).")
    t.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH", help="files or directories")
    t.add_argument("--glob", default="*", help="file name pattern inside directories (default: all files)")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in total: 256 bytes + merges + specials")
    t.add_argument("--out", type=Path, required=True, help="output directory (tokenizer.json, lmforge.json)")
    t.add_argument("--pattern", default="gpt4", help="split pattern: gpt4 (default), gpt2, o200k, or a regex")
    t.add_argument("--special", nargs="*", default=[], metavar="TOKEN", help="special tokens, e.g. <|endoftext|>")
    t.add_argument("--min-frequency", type=int, default=2, help="stop when the best pair is rarer (default 2)")
    t.add_argument("--threads", type=int, default=None, help="threads for counting (default: all cores)")

    e = sub.add_parser("encode", help="text -> token ids")
    e.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to encode")
    src.add_argument("--file", type=Path, help="file whose whole content is encoded")
    e.add_argument("--json", action="store_true", help="print one JSON list of ids")
    e.add_argument("--allow-special", action="store_true", help="treat special-token text as control tokens")

    d = sub.add_parser("decode", help="token ids -> text")
    d.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    d.add_argument("--ids", required=True, help="ids as 1,2,3 or a JSON list")

    s = sub.add_parser("stats", help="bytes/token, fertility per script, vocab usage, token-length plot")
    s.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    s.add_argument("--file", type=Path, required=True, help="text file to measure on")
    s.add_argument("--plot", type=Path, help="write a PNG histogram of token lengths here")
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    files = list_files(args.input, args.glob)
    n_bytes = sum(f.stat().st_size for f in files)
    print(f"training on {len(files)} file(s), {n_bytes / 1e6:.1f} MB, vocab {args.vocab_size}, "
          f"pattern {pretokenize.pattern_name(args.pattern) or 'custom'}", file=sys.stderr)
    t0 = time.perf_counter()
    tok = train_bpe(files, args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                    min_frequency=args.min_frequency, num_threads=args.threads, show_progress=True)
    seconds = time.perf_counter() - t0
    save_tokenizer(tok, args.out)
    meta = {"stage": "tokenizer.train", "lmforge_version": __version__,
            "args": {"input": [str(p) for p in args.input], "glob": args.glob, "vocab_size": args.vocab_size,
                     "pattern": args.pattern, "special": args.special, "min_frequency": args.min_frequency},
            "metrics": {"train_seconds": round(seconds, 3), "corpus_bytes": n_bytes, "files": len(files),
                        "merges": len(tok.merges), "vocab_size": tok.vocab_size}}
    atomic_write_text(args.out / "lmforge.json", json.dumps(meta, indent=1))
    print(f"wrote {args.out}/tokenizer.json: {tok.vocab_size} ids ({len(tok.merges)} merges, "
          f"{len(tok.special_tokens)} special) in {seconds:.1f}s")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    allowed = "all" if args.allow_special else ()
    if args.file is not None:
        if not args.file.is_file():
            raise LmforgeError(f"file not found: {args.file}")
        data = args.file.read_bytes()
        try:
            ids = tok.encode(data.decode("utf-8"), allowed_special=allowed)
        except UnicodeDecodeError:  # not UTF-8: encode the raw bytes exactly
            ids = tok.encode_bytes(data)
    else:
        ids = tok.encode(args.text, allowed_special=allowed)
    print(json.dumps(ids) if args.json else ",".join(map(str, ids)))
    return 0


def parse_ids(text: str) -> list[int]:
    text = text.strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise LmforgeError(f"--ids must be integers like 1,2,3 or a JSON list, got {text[:40]!r}") from None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LmforgeError("--ids must be a list of integers")
    return values


def cmd_decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    sys.stdout.write(tok.decode(parse_ids(args.ids)) + "\n")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.tokenizer.stats import compute_stats, format_stats, plot_token_lengths

    tok = load_tokenizer(args.tokenizer)
    if not args.file.is_file():
        raise LmforgeError(f"file not found: {args.file}")
    text = args.file.read_bytes().decode("utf-8", errors="replace")
    stats = compute_stats(tok, text)
    print(json.dumps(stats) if args.json else format_stats(stats))
    if args.plot:
        plot_token_lengths(stats, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "encode": cmd_encode, "decode": cmd_decode, "stats": cmd_stats}[args.command](args)
