"""Text in, vectors out: `lmforge embed` turns sentences into unit-length embeddings with a BERT encoder run.

    lmforge embed --model RUN --text "A man is eating food." "A man is eating a piece of bread." --json
    lmforge embed --model RUN --file sentences.txt --batch-size 64 > vectors.txt

The run is an lmforge BERT run or any sentence-transformers / HF BERT directory (e.g. all-MiniLM-L6-v2). Pooling,
normalization and the maximum length come from the run (see docs/encoder.md); the output matches
`SentenceTransformer(RUN).encode(texts)`. Without --json each vector is one line of space-separated floats.

    from lmforge.embed import load_embedder
    embedder = load_embedder(RUN)
    vectors = embedder.encode(["first sentence", "second one"])     # (2, C) float32, rows of unit length
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.checkpoint.bert import SentenceConfig, load_bert, load_sentence_config, model_dir
from lmforge.common import LmforgeError, pick_device, read_text_file
from lmforge.model.encoder import Bert
from lmforge.tokenizer.wordpiece import Encoding, Truncation, WordPieceTokenizer, load_wordpiece


@dataclass
class Embedder:
    """A Bert, its tokenizer (set to truncate at `max_length`), its pooling, and the id that pads a batch."""

    model: Bert
    tokenizer: WordPieceTokenizer
    sentence: SentenceConfig
    max_length: int
    pad_id: int

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embeddings (N, C) float32 on the CPU, in the order of `texts`.

        Every text is tokenized first, then batched longest first, so each batch pads as little as possible
        (sentence-transformers sorts by characters, which a 300-letter [UNK] word fools); padding is masked
        out, so the grouping changes nothing in the result.
        """
        if isinstance(texts, str):
            raise LmforgeError("encode takes a list of texts, not one string")
        if batch_size < 1:
            raise LmforgeError(f"batch size must be at least 1, got {batch_size}")
        encs = [self.tokenizer.encode(t.lower() if self.sentence.do_lower_case else t) for t in texts]
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i]))
        out = torch.empty(len(encs), self.model.cfg.dim)
        device = self.model.tok_emb.weight.device
        with torch.inference_mode(), tqdm(total=len(encs), unit="text", disable=not progress, file=sys.stderr,
                                          dynamic_ncols=True) as bar:
            for start in range(0, len(encs), batch_size):
                rows = order[start:start + batch_size]
                ids, mask, types = _batch([encs[i] for i in rows], self.pad_id, device)  # (B, T) each
                vectors = self.model.embed(ids, mask, types, self.sentence.pooling, self.sentence.normalize)
                out[rows] = vectors.float().cpu()
                bar.update(len(rows))
        return out


def _batch(encs: list[Encoding], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and token types (B, T) int64, right-padded to the longest encoding."""
    T = max(len(e) for e in encs)

    def padded(name: str, value: int) -> torch.Tensor:
        return torch.tensor([getattr(e, name) + [value] * (T - len(e)) for e in encs], device=device)
    return padded("ids", pad_id), padded("attention_mask", 0), padded("type_ids", 0)


def load_embedder(run: str | Path, device: str | None = None, max_length: int | None = None) -> Embedder:
    """The model (eval mode), tokenizer and pooling of a BERT run directory or sentence-transformers directory.

    max_length (tokens, [CLS] and [SEP] included): the argument, else the run's max_seq_length
    (sentence-transformers' setting, or tokenizer_config.json's model_max_length), always capped by the model's
    position table. tokenizer.json's own truncation and padding are replaced, as sentence-transformers does.
    """
    model, cfg = load_bert(run, device=pick_device(device))
    sentence = load_sentence_config(run)
    tokenizer = load_wordpiece(model_dir(run))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {cfg.vocab_size}")
    limit = min(max_length or sentence.max_seq_length or cfg.max_seq_len, cfg.max_seq_len)
    if limit < tokenizer.num_special_tokens() + 1:
        raise LmforgeError(f"max length {limit} leaves no room for text after the special tokens")
    tokenizer.truncation, tokenizer.padding = Truncation(max_length=limit), None  # batches are padded here
    pad_id = tokenizer.token_to_id("[PAD]")
    return Embedder(model, tokenizer, sentence, limit, pad_id if pad_id is not None else cfg.pad_token_id or 0)


# ---- CLI ----


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge embed", description="Sentence embeddings from a BERT encoder run.")
    p.add_argument("--model", required=True, metavar="RUN", help="run directory (BERT config.json, weights, "
                   "tokenizer.json; a sentence-transformers directory works too)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="S", help="texts to embed")
    src.add_argument("--file", type=Path, metavar="F", help="a UTF-8 file: one text per non-empty line")
    p.add_argument("--json", action="store_true", help="print one JSON list of vectors (one per input)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward pass (default 32)")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate texts to N tokens (default: the run's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr for --file (default: when stderr is a terminal)")
    return p


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file (surrounding whitespace stripped)."""
    texts = [line.strip() for line in read_text_file(path).splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise LmforgeError(f"{path} has no non-empty lines to embed")
    return texts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise LmforgeError(f"--max-length must be at least 1, got {args.max_length}")
    texts = args.text if args.file is None else read_lines(args.file)
    embedder = load_embedder(args.model, args.device, args.max_length)
    progress = args.file is not None and (sys.stderr.isatty() if args.progress is None else args.progress)
    vectors = embedder.encode(texts, batch_size=args.batch_size, progress=progress).tolist()
    if args.json:
        print(json.dumps(vectors))
    else:
        for v in vectors:
            print(" ".join(f"{x:.7g}" for x in v))
    return 0
