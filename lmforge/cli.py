"""`lmforge <stage> ...`: thin dispatch to each stage's `main(argv)`; user errors become one line + exit 2."""

from __future__ import annotations

import importlib
import sys

from lmforge import __version__
from lmforge.common import LmforgeError

# stage -> (module with main(argv), or "module:function", one-line summary). Later stages add themselves here.
STAGES = {
    "tokenizer": ("lmforge.tokenizer.cli", "train, encode, decode and measure byte-level BPE tokenizers"),
    "pretrain": ("lmforge.train.pretrain", "tokenize data and pretrain a Llama-family model (resumable)"),
    "convert": ("lmforge.checkpoint.convert", "convert a GGUF file or an HF directory into a run directory"),
    "generate": ("lmforge.textgen", "stream a continuation from a run directory (sampling, stop strings)"),
    "embed": ("lmforge.embed", "sentence embeddings from a BERT encoder run (or a sentence-transformers dir)"),
    "chat": ("lmforge.textgen:chat_main", "chat in the terminal with a run's model, using its chat template"),
    "eval": ("lmforge.eval.cli", "evaluate: perplexity, BLEU/chrF/ROUGE/BERTScore, task harness, reports"),
}


def _usage() -> str:
    lines = ["usage: lmforge <stage> [options]   (lmforge <stage> --help for each stage)", "", "stages:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"lmforge {__version__}")
        return 0
    if argv[0] not in STAGES:
        print(f"lmforge: error: unknown stage {argv[0]!r}\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = STAGES[argv[0]][0].partition(":")  # "module" runs main(), "module:fn" runs fn()
    entry = getattr(importlib.import_module(module_name), function or "main")
    try:
        return int(entry(argv[1:]) or 0)
    except LmforgeError as e:
        print(f"lmforge {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: a message, not a traceback
        print(f"lmforge {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
