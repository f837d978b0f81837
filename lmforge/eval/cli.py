"""`lmforge eval perplexity|bleu|chrf|rouge|bertscore|run|compare ...`.

    lmforge eval perplexity --model RUN --data PATH [--stride N] [--seq-len N] [--json]
    lmforge eval bleu|chrf|rouge|bertscore --hyp FILE --ref FILE [--ref FILE ...] [metric options] [--json]
    lmforge eval run --model RUN --tasks TASK_FILE_OR_DIR [...] --out DIR
    lmforge eval compare DIR_A DIR_B

Each metric's options and output live in its own module (METRICS); `--json` prints exactly one JSON object.

PATH is a text / jsonl / parquet file or a directory of them (documents joined by the tokenizer's
<|endoftext|>, as in training shards), or a token-shard directory (meta.json; --split picks train or val).
The text is tokenized with the run's own tokenizer. --json prints exactly one JSON object:
{"perplexity", "nll", "tokens"} plus "bits_per_byte" (always known here: the tokenizer gives bytes per id).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from pathlib import Path

import torch

from lmforge.checkpoint import load_run
from lmforge.common import LmforgeError, pick_device
from lmforge.data import TokenShards, read_documents
from lmforge.eval.perplexity import perplexity, token_byte_lengths
from lmforge.tokenizer import load_tokenizer

ENDOFTEXT = "<|endoftext|>"


# metric subcommand -> (module with add_arguments(parser), run(args) -> dict, optional format_text(dict), help)
METRICS = {
    "bleu": ("lmforge.eval.bleu", "corpus BLEU of a hypothesis file against references (sacreBLEU's numbers)"),
    "chrf": ("lmforge.eval.chrf", "corpus chrF / chrF++ (sacreBLEU's numbers)"),
    "rouge": ("lmforge.eval.rouge", "ROUGE-1/2/L/Lsum (rouge-score's numbers), optional Porter stemming"),
    "bertscore": ("lmforge.eval.bertscore", "BERTScore precision/recall/F1 with an lmforge encoder run"),
}
# subcommands with their own parser: argv goes to module:function as is
DELEGATED = {
    "run": "lmforge.eval.run_cli:run_main",
    "compare": "lmforge.eval.run_cli:compare_main",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge eval", description="Evaluate a run directory or text files.")
    names = ["perplexity", *METRICS, *DELEGATED]
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    for name, (module, summary) in METRICS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=summary, description=summary))
    for name in DELEGATED:
        sub.add_parser(name, help=f"see lmforge eval {name} --help", add_help=False)
    e = sub.add_parser("perplexity", help="perplexity, mean nll and bits per byte of a model on text",
                       description="Perplexity with a strided sliding window (each token scored once).")
    e.add_argument("--model", required=True, metavar="RUN", help="run directory (config.json, model.safetensors, "
                   "tokenizer.json)")
    e.add_argument("--data", required=True, type=Path, metavar="PATH", help="text/jsonl/parquet file or directory, "
                   "or a token-shard directory")
    e.add_argument("--split", default="val", choices=["train", "val"], help="split of a token-shard directory")
    e.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    e.add_argument("--stride", type=int, help="window step (default: seq-len; smaller = more context, slower)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    e.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    e.add_argument("--device", help="cuda, cpu, mps (default: the best available)")
    e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def load_tokens(path: Path, tokenizer) -> torch.Tensor:
    """Token ids of the documents in PATH, each encoded and joined by the end-of-text id (as in training shards)."""
    sep = tokenizer.special_tokens.get(ENDOFTEXT)
    ids: list[int] = []
    for doc in read_documents([path]):
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer.encode(doc))
    return torch.tensor(ids, dtype=torch.long)


def cmd_perplexity(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    model, cfg = load_run(args.model, device=device)
    tokenizer = load_tokenizer(args.model)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"tokenizer/model vocab mismatch in {args.model}: tokenizer {tokenizer.vocab_size} ids, "
                           f"model {cfg.vocab_size}")
    if (args.data / "meta.json").is_file():
        shards = TokenShards(args.data, args.split)
        tokens = torch.from_numpy(shards.tokens(0, shards.n_tokens))
    else:
        tokens = load_tokens(args.data, tokenizer)
    max_len = getattr(cfg, "max_seq_len", None)  # None: relative positions (T5), no hard limit
    seq_len = args.seq_len or max_len or 512
    if max_len is not None and seq_len > max_len:
        raise LmforgeError(f"--seq-len {seq_len} exceeds the model's max_seq_len {max_len}")
    if args.stride is not None and not 1 <= args.stride <= seq_len:
        raise LmforgeError(f"--stride must be between 1 and the window length {seq_len}, got {args.stride}")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda"))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        result = perplexity(model, tokens, seq_len=seq_len, stride=args.stride, batch_size=args.batch_size,
                            token_bytes=token_byte_lengths(tokenizer), max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        bpb = f"  bits/byte {result['bits_per_byte']:.4f}" if "bits_per_byte" in result else ""
        print(f"perplexity {result['perplexity']:.4f}  nll {result['nll']:.4f}  tokens {result['tokens']}{bpb}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module, _, function = DELEGATED[argv[0]].partition(":")
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "perplexity":
        return cmd_perplexity(args)
    if args.command in METRICS:
        module = importlib.import_module(METRICS[args.command][0])
        result = module.run(args)
        text = getattr(module, "format_text", None)
        print(json.dumps(result) if args.json or text is None else text(result))
        return 0
    raise LmforgeError(f"unknown eval command {args.command!r}")  # pragma: no cover - argparse rejects it first
