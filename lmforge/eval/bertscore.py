"""BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT") from any lmforge BERT run.

    from lmforge.eval.bertscore import bertscore
    out = bertscore(["the cat sat"], [["a cat was sitting", "the cat sat down"]], "runs/enc", layer=5, idf=True)
    out["f1"], out["pairs"]["f1"][0]            # the mean over candidates; one candidate's score

    lmforge eval bertscore --hyp hyps.txt --ref refs.txt [--ref refs2.txt] --model RUN [--layer N] [--idf]
                           [--baseline P,R,F | --baseline FILE.tsv]

Computes what the reference implementation `bert-score` 0.3.13 computes (`bert_score/utils.py`):

1. Every text is stripped and tokenized with the run's WordPiece tokenizer, [CLS] and [SEP] added, cut at
   tokenizer_config.json's `model_max_length` (what `tokenizer.encode(..., truncation=True)` does there).
2. Each token's state after `layer` blocks (bert-score's `num_layers`: 0 = the embeddings; HF's
   `hidden_states[layer]`), scaled to unit length, so dot products are cosines.
3. Greedy matching, weighted (paper eq. 1-4):
       R = sum_{r in ref} w(r) * max_{h in hyp} cos(r, h) / sum_{r in ref} w(r)
       P = sum_{h in hyp} w(h) * max_{r in ref} cos(h, r) / sum_{h in hyp} w(h)
       F = 2 P R / (P + R)
   w = 1, or idf over the M references, idf(t) = log((M + 1) / (df(t) + 1)) (a token seen in no reference:
   log(M + 1)); [CLS] and [SEP] always weigh 0, but stay in the matrix as tokens the other side may match.
4. Several references per candidate: P, R and F are each the max over the references, independently (bert-score's
   `max(dim=0)`), so they may come from different references.
5. Optional rescaling with a baseline b = (b_P, b_R, b_F): s' = (s - b) / (1 - b) (Zhang et al. 2020, sec. 6).

Where bert-score is ill-defined we pick: a side whose weights sum to 0 scores 0 (bert-score gives NaN for P),
and cosine maxima never see the padding of a batch (bert-score's padded entries count as similarity 0, which
matters only when every real similarity is negative).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint.bert import load_bert, model_dir
from lmforge.common import LmforgeError, pick_device, read_text_file
from lmforge.eval.textfiles import add_file_arguments, read_hyp_refs
from lmforge.model.encoder import Bert, key_mask
from lmforge.tokenizer.wordpiece import Truncation, WordPieceTokenizer, load_wordpiece

UNLIMITED = 1_000_000  # transformers writes model_max_length = 1e30 for "no limit"


@dataclass
class Scorer:
    """A Bert (eval mode), its tokenizer cutting texts at `max_length`, and the ids that weigh 0 ([CLS], [SEP])."""

    model: Bert
    tokenizer: WordPieceTokenizer
    max_length: int
    special_ids: frozenset[int]


def load_scorer(run: str | Path, device: str | None = None) -> Scorer:
    """The model and tokenizer of a BERT run (or sentence-transformers directory) as bert-score would use them.

    max_length: tokenizer_config.json's model_max_length (512 for all-MiniLM-L6-v2: bert-score reads the HF
    tokenizer's limit, not sentence-transformers' max_seq_length of 256), capped by the position table.
    """
    model, cfg = load_bert(run, device=pick_device(device))
    mdir = model_dir(run)
    tokenizer = load_wordpiece(mdir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tokenizer.vocab_size} ids but the model embeds only {cfg.vocab_size}")
    limit = cfg.max_seq_len
    tc = mdir / "tokenizer_config.json"
    if tc.is_file():
        try:
            declared = json.loads(read_text_file(tc)).get("model_max_length")
        except (json.JSONDecodeError, AttributeError):
            raise LmforgeError(f"{tc} is not a JSON object") from None
        if isinstance(declared, int) and 0 < declared < UNLIMITED:
            limit = min(limit, declared)
    if limit < tokenizer.num_special_tokens() + 1:
        raise LmforgeError(f"max length {limit} leaves no room for text after the special tokens")
    tokenizer.truncation, tokenizer.padding = Truncation(max_length=limit), None  # as transformers ignores them
    special = frozenset(i for ids in tokenizer.special_ids.values() for i in ids)
    return Scorer(model, tokenizer, limit, special)


# ---- token states ----


def layer_states(model: Bert, idx: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Token states (B, T, C) after the first `layer` blocks (0 = the embedding output): HF's hidden_states[layer].

    Runs Bert.forward's own submodules and stops early, as bert-score drops the layers above `layer`.
    """
    T = idx.shape[1]
    pos = torch.arange(T, device=idx.device)  # (T,)
    x = model.tok_emb(idx) + model.type_emb(torch.zeros_like(idx)) + model.pos_emb(pos)  # (B, T, C)
    x = model.drop(model.emb_norm(x))
    mask = key_mask(attention_mask)
    for block in model.layers[:layer]:
        x = block(x, mask)
    return x


def embed_tokens(scorer: Scorer, encodings: Sequence[list[int]], layer: int, batch_size: int) -> list[torch.Tensor]:
    """Unit-length token states (T_i, C) of each encoding, batched longest first (padding is masked out, so the
    grouping changes nothing)."""
    out: list[torch.Tensor | None] = [None] * len(encodings)
    order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i]))
    device = scorer.model.tok_emb.weight.device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            T = max(len(encodings[i]) for i in rows)
            ids = torch.tensor([encodings[i] + [0] * (T - len(encodings[i])) for i in rows], device=device)
            mask = torch.tensor([[1] * len(encodings[i]) + [0] * (T - len(encodings[i])) for i in rows], device=device)
            states = F.normalize(layer_states(scorer.model, ids, mask, layer).float(), dim=-1)  # (B, T, C)
            for b, i in enumerate(rows):
                out[i] = states[b, :len(encodings[i])]
    return out  # type: ignore[return-value]


# ---- weights and matching ----


def idf_weights(ref_encodings: Sequence[list[int]], special_ids: frozenset[int]) -> tuple[dict[int, float], float]:
    """bert-score's `get_idf_dict`: idf(t) = log((M + 1) / (df(t) + 1)) over the M reference texts (each counted as
    often as it occurs); returns ({id: idf}, the idf of an id no reference has, log(M + 1)). Special ids get 0."""
    M = len(ref_encodings)
    df = Counter(i for enc in ref_encodings for i in set(enc))
    idf = {i: math.log((M + 1) / (c + 1)) for i, c in df.items()}
    idf.update(dict.fromkeys(special_ids, 0.0))
    return idf, math.log(M + 1)


def greedy_match(hyp: list[torch.Tensor], hyp_w: list[torch.Tensor], ref: list[torch.Tensor],
                 ref_w: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """P and R (B,) of B pairs: unit token states (T, C) and token weights (T,) per text (Zhang et al. eq. 3-4)."""
    h, r = _pad(hyp), _pad(ref)  # (B, Th, C), (B, Tr, C)
    hw, rw = _pad(hyp_w), _pad(ref_w)  # (B, Th), (B, Tr); padding weighs 0
    h_real, r_real = _pad([torch.ones(len(x), dtype=torch.bool) for x in hyp]), \
        _pad([torch.ones(len(x), dtype=torch.bool) for x in ref])
    sim = h @ r.transpose(1, 2)  # (B, Th, Tr) cosines
    best_for_hyp = sim.masked_fill(~r_real.to(sim.device)[:, None, :], -math.inf).amax(dim=2)  # (B, Th)
    best_for_ref = sim.masked_fill(~h_real.to(sim.device)[:, :, None], -math.inf).amax(dim=1)  # (B, Tr)
    P = _weighted_mean(best_for_hyp, hw.to(sim.device))
    R = _weighted_mean(best_for_ref, rw.to(sim.device))
    return P, R


def _pad(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum(w x) / sum(w) per row; 0 where the weights sum to 0 (with idf: every token is in every reference)."""
    total = w.sum(dim=1)
    return torch.where(total > 0, (x * w).sum(dim=1) / total.clamp(min=1e-30), torch.zeros_like(total))


def f1(P: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """2PR / (P + R), 0 where P + R = 0 (bert-score turns that NaN into 0 too)."""
    return torch.nan_to_num(2 * P * R / (P + R), nan=0.0)


# ---- the metric ----


def bertscore(cands: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], model_dir_or_model: str | Path |
              Scorer, layer: int | None = None, idf: bool = False, rescale_with_baseline: bool = False,
              baseline: str | Path | Sequence[float] | None = None, batch_size: int = 64,
              device: str | None = None) -> dict:
    """BERTScore of each candidate against its reference(s); see the module docstring for the computation.

    refs: one string per candidate, or one list of strings per candidate (the best score over them counts).
    model_dir_or_model: a BERT run directory or sentence-transformers directory, or a `load_scorer` result (load
    once, score many times). layer: 0..n_layers, default the last. baseline: (b_P, b_R, b_F), "P,R,F", or a
    bert-score baseline .tsv (the row of `layer`); required when rescale_with_baseline, since bert-score ships
    baselines only for some hub models and an lmforge run has none.
    Returns {"precision", "recall", "f1"} (means over candidates), "pairs" (the per-candidate lists), "n",
    "layer", "idf", "baseline" (the b used, or None).
    """
    groups = _reference_groups(cands, refs)
    if batch_size < 1:
        raise LmforgeError(f"batch size must be at least 1, got {batch_size}")
    scorer = model_dir_or_model if isinstance(model_dir_or_model, Scorer) else load_scorer(model_dir_or_model, device)
    n_layers = scorer.model.cfg.n_layers
    layer = n_layers if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise LmforgeError(f"layer {layer!r} is out of range: this model has layers 0 (the embeddings) to {n_layers}")
    b = _baseline(baseline, layer, rescale_with_baseline)

    flat_refs = [r for g in groups for r in g]
    enc = {t: scorer.tokenizer.encode(t.strip()).ids for t in dict.fromkeys([*cands, *flat_refs])}  # as bert-score
    if idf:
        weights, unseen = idf_weights([enc[r] for r in flat_refs], scorer.special_ids)
    else:
        weights, unseen = dict.fromkeys(scorer.special_ids, 0.0), 1.0
    n_special = scorer.tokenizer.num_special_tokens()  # a text with no token of its own scores 0: never scored
    pairs = list(dict.fromkeys((c, r) for c, g in zip(cands, groups) for r in g
                               if len(enc[c]) > n_special and len(enc[r]) > n_special))
    scores = score_pairs(scorer, pairs, enc, lambda i: weights.get(i, unseen), layer, batch_size)
    per_pair = torch.tensor([[max(scores.get((c, r), (0.0, 0.0, 0.0))[k] for r in g) for k in range(3)]
                             for c, g in zip(cands, groups)], dtype=torch.float64)  # (N, 3): each the max over refs
    if b is not None:
        per_pair = (per_pair - torch.tensor(b, dtype=torch.float64)) / (1 - torch.tensor(b, dtype=torch.float64))
    means = per_pair.mean(dim=0).tolist()
    return {"precision": means[0], "recall": means[1], "f1": means[2], "n": len(cands), "layer": layer,
            "idf": idf, "baseline": list(b) if b is not None else None,
            "pairs": {"precision": per_pair[:, 0].tolist(), "recall": per_pair[:, 1].tolist(),
                      "f1": per_pair[:, 2].tolist()}}


def score_pairs(scorer: Scorer, pairs: list[tuple[str, str]], enc: dict[str, list[int]], weight: Callable[[int], float],
                layer: int, batch_size: int) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(P, R, F) of each (candidate, reference) pair. Pairs go in chunks whose texts are embedded together and
    dropped after matching, so memory stays bounded however many pairs there are."""
    scores = {}
    for start in range(0, len(pairs), 8 * batch_size):
        chunk = pairs[start:start + 8 * batch_size]
        texts = list(dict.fromkeys(t for pair in chunk for t in pair))
        states = dict(zip(texts, embed_tokens(scorer, [enc[t] for t in texts], layer, batch_size)))
        w = {t: torch.tensor([weight(i) for i in enc[t]], device=states[t].device) for t in texts}
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            P, R = greedy_match([states[c] for c, _ in batch], [w[c] for c, _ in batch],
                                [states[r] for _, r in batch], [w[r] for _, r in batch])
            scores.update(zip(batch, map(tuple, torch.stack([P, R, f1(P, R)], dim=1).tolist())))
    return scores


def _reference_groups(cands: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """refs as one non-empty list of strings per candidate."""
    if isinstance(cands, str) or isinstance(refs, str):
        raise LmforgeError("bertscore takes lists of texts, not one string")
    if len(cands) != len(refs):
        raise LmforgeError(f"{len(cands)} candidates but {len(refs)} references (one per candidate, or a list each)")
    if not cands:
        raise LmforgeError("bertscore: no candidates to score")
    groups = [[r] if isinstance(r, str) else list(r) for r in refs]
    for i, g in enumerate(groups):
        if not g or not all(isinstance(x, str) for x in g):
            raise LmforgeError(f"references of candidate {i} must be a string or a non-empty list of strings")
    if not all(isinstance(c, str) for c in cands):
        raise LmforgeError("candidates must be strings")
    return groups


# ---- baseline rescaling ----


def _baseline(spec: str | Path | Sequence[float] | None, layer: int, rescale: bool) -> tuple[float, ...] | None:
    if not rescale:
        if spec is not None:
            raise LmforgeError("a baseline was given but rescale_with_baseline is False")
        return None
    if spec is None:
        raise LmforgeError("rescaling needs baseline values: bert-score ships them only for some hub models, none for "
                           "this run; pass baseline=(P, R, F) (--baseline P,R,F) or a bert-score baseline .tsv")
    return read_baseline(spec, layer)


def read_baseline(spec: str | Path | Sequence[float], layer: int) -> tuple[float, float, float]:
    """(b_P, b_R, b_F) from three numbers, a "P,R,F" string, or a bert-score baseline file (CSV with the header
    LAYER,P,R,F and one row per layer; the row of `layer` is used, as bert-score's `iloc[num_layers]`)."""
    if isinstance(spec, (str, Path)) and Path(spec).suffix in (".tsv", ".csv"):
        rows = list(csv.DictReader(read_text_file(spec).splitlines()))
        row = next((r for r in rows if (r.get("LAYER") or "").strip() == str(layer)), None)
        if row is None:
            raise LmforgeError(f"{spec}: no baseline row for layer {layer} (expected the header LAYER,P,R,F)")
        values: Sequence = [row.get(k) for k in ("P", "R", "F")]
    elif isinstance(spec, (str, Path)):
        values = str(spec).split(",")
    else:
        values = list(spec)
    try:
        b = tuple(float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LmforgeError(f"baseline must be three numbers P,R,F or a bert-score .tsv, got {str(spec)!r}") from None
    if len(b) != 3 or not all(math.isfinite(x) and x < 1 for x in b):
        raise LmforgeError(f"baseline must be three finite numbers below 1 (P,R,F), got {str(spec)!r}")
    return b  # type: ignore[return-value]


# ---- CLI: lmforge eval bertscore ----


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bertscore` subcommand's flags (--hyp / --ref as every text metric), --json included."""
    add_file_arguments(p)
    p.add_argument("--model", required=True, metavar="RUN", help="BERT run or sentence-transformers directory")
    p.add_argument("--layer", type=int, metavar="N", help="hidden state to use: 0 = embeddings ... n_layers "
                   "(default: the last)")
    p.add_argument("--idf", action="store_true", help="weight tokens by idf over the references")
    p.add_argument("--baseline", metavar="P,R,F|FILE", help="rescale as (s - b) / (1 - b) with these baselines "
                   "(or a bert-score baseline .tsv); none ship for lmforge runs")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per forward pass (default 64)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> dict:
    """Score the files named by `args` (line i of every --ref is a reference for line i of --hyp); returns the
    `bertscore` dict plus "model"."""
    cands, streams = read_hyp_refs(args.hyp, args.ref)
    result = bertscore(cands, [list(g) for g in zip(*streams)], args.model, layer=args.layer, idf=args.idf,
                       rescale_with_baseline=args.baseline is not None, baseline=args.baseline,
                       batch_size=args.batch_size, device=args.device)
    return {"model": str(args.model), **result}


def format_text(result: dict) -> str:
    """One human-readable line (what the CLI prints without --json)."""
    scaled = " (rescaled)" if result.get("baseline") else ""
    return (f"BERTScore{scaled} P {result['precision']:.4f}  R {result['recall']:.4f}  F1 {result['f1']:.4f}  "
            f"(layer {result['layer']}, {'idf' if result['idf'] else 'no idf'}, {result['n']} candidates)")
