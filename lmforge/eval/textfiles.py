"""Line-aligned hypothesis and reference files for the text metrics (`lmforge eval bleu|chrf`).

Lines are read the way sacreBLEU's command line reads them, so a score from `lmforge eval bleu` equals
`sacrebleu REF -i HYP` on the same files:
- UTF-8, split on "\\n" only (a lone "\\r", U+2028 or a form feed does not end a line, unlike
  `str.splitlines`); a final newline ends the last line rather than starting an empty one;
- each line right-stripped of whitespace (so "\\r\\n" files read like "\\n" files, and trailing spaces go);
- `.gz` files are decompressed.
One deliberate difference: a leading UTF-8 byte-order mark is dropped (sacreBLEU keeps U+FEFF glued to
the first word, which silently costs that segment its first n-grams).
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

from lmforge.common import LmforgeError

BOM = "\ufeff"


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (or .gz), right-stripped, without the final newline's empty line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{'expected a file, got a directory' if path.is_dir() else 'file not found'}: {path}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise LmforgeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    text = text.removeprefix(BOM)
    lines = text.split("\n")
    if lines[-1] == "":  # "a\nb\n" is two lines, and an empty file has none
        lines.pop()
    return [line.rstrip() for line in lines]


def read_hyp_refs(hyp: str | os.PathLike, refs: list[str | os.PathLike]) -> tuple[list[str], list[list[str]]]:
    """Hypothesis lines and one stream of lines per reference file, checked to be line-aligned."""
    if not refs:
        raise LmforgeError("no reference file given (use --ref FILE, repeated for more references)")
    hyps = read_lines(hyp)
    if not hyps:
        raise LmforgeError(f"{hyp} is empty: no lines to score")
    streams = []
    for ref in refs:
        lines = read_lines(ref)
        if len(lines) != len(hyps):
            raise LmforgeError(f"line counts differ: {hyp} has {len(hyps)} lines, {ref} has {len(lines)}")
        streams.append(lines)
    return hyps, streams


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """--hyp FILE and --ref FILE [--ref FILE ...], shared by the text-metric subcommands."""
    parser.add_argument("--hyp", required=True, metavar="FILE", help="system output, one segment per line "
                        "(UTF-8; .gz is decompressed)")
    parser.add_argument("--ref", required=True, action="append", metavar="FILE",
                        help="reference file, line-aligned with --hyp; repeat the flag for more references")
