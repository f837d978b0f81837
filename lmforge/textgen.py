"""Text in, text out: `lmforge generate` loads a run directory (model + tokenizer) and streams a continuation.

This is the one place that joins the tokenizer to `infer` (which sees only ids, logits and the vocabulary
as bytes). Later `lmforge chat` lives here too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.checkpoint.run import load_run
from lmforge.common import LmforgeError, pick_device
from lmforge.infer.generate import eos_ids, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.stopping import StopChecker, Utf8Stream
from lmforge.tokenizer import BPETokenizer, load_tokenizer


def load_for_generation(run: str | Path, device: str | None = None) -> tuple[torch.nn.Module, BPETokenizer]:
    """Model (eval mode) and tokenizer of a run directory, checked against each other."""
    model, cfg = load_run(run, device=pick_device(device))
    tok = load_tokenizer(run)
    if tok.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tok.vocab_size} ids but the model embeds only {cfg.vocab_size}")
    return model.eval(), tok


def stream_text(model: torch.nn.Module, tok: BPETokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the continuation of `prompt` as text chunks: stop strings removed, never half a character."""
    cfg = model.cfg
    ids = tok.encode(prompt)
    if cfg.bos_token_id is not None:
        ids = [cfg.bos_token_id, *ids]
    table = tok.vocab_bytes(cfg.vocab_size)
    checker = StopChecker(params.stop, table, eos_ids(cfg.eos_token_id))  # eos ends the text, unprinted
    utf8 = Utf8Stream()
    for t in generate(model, ids, params, eos_token_id=cfg.eos_token_id, token_bytes=table):
        result = checker.feed(t)
        chunk = utf8.feed(result.emit)
        if chunk:
            yield chunk
        if result.stopped:
            break
    tail = utf8.feed(checker.finish()) + utf8.finish()
    if tail:
        yield tail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge generate", description="Stream a continuation of a prompt.")
    p.add_argument("--model", required=True, help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, stop=args.stop)
    model, tok = load_for_generation(args.model, args.device)
    for chunk in stream_text(model, tok, args.prompt, params):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
