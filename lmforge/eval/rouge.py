"""ROUGE-N, ROUGE-L and ROUGE-Lsum (Lin 2004), exactly as Google's `rouge-score` package computes them.

    from lmforge.eval.rouge import rouge, score
    score("the cat sat on the mat", "a cat was sitting on the mat", stem=True)["rougeL"].fmeasure
    rouge(hypotheses, references)      # {"rouge1": {"precision", "recall", "fmeasure"}, ...}, mean over pairs

Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop on Text Summarization 2004.
The reference implementation matched to 1e-12 (tests/eval/test_rouge.py) is `rouge_score.rouge_scorer`:
- tokens: lowercase (Python's `str.lower`), every run of characters outside [a-z0-9] becomes a space,
  split; so non-ASCII letters separate words and never match. With `stem=True`, tokens longer than 3
  characters go through the Porter stemmer (ours, equal to NLTK's; lmforge/eval/porter.py).
- ROUGE-N: clipped n-gram overlap; precision = overlap / hyp n-grams, recall = overlap / ref n-grams
  (each denominator at least 1), F = 2PR / (P + R), or 0 when P + R = 0.
- ROUGE-L: LCS of the two token sequences; P = LCS / |hyp|, R = LCS / |ref|; 0 if either is empty.
- ROUGE-Lsum: summary-level LCS (Lin 2004, section 3.2) over sentences split at "\\n": for each reference
  sentence, the union of its LCS with every hypothesis sentence, each token counted at most as often as it
  occurs in both summaries (as ROUGE-1.5.5 does). Which LCS is taken matters, so the backtrack breaks ties
  exactly as rouge-score's `_backtrack_norec`.
- Several references: each type takes the reference with the highest F (the first on ties), as
  `RougeScorer.score_multi`; that reference's precision and recall come with it.
- A corpus score is the plain mean of each pair's precision, recall and F (rouge-score's
  BootstrapAggregator resamples instead; its "mid" is close to, not equal to, this mean). The mean F is
  not the F of the mean P and R.

Note the argument order: ours is (hypothesis, references); rouge-score's `score` is (target, prediction).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from lmforge.common import LmforgeError
from lmforge.eval.porter import stem as porter_stem
from lmforge.eval.textfiles import add_file_arguments, read_hyp_refs

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
ROUGE_N = re.compile(r"rouge([1-9][0-9]*)")


class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


ZERO = Score(0.0, 0.0, 0.0)


def fmeasure(precision: float, recall: float) -> float:
    """Harmonic mean, written as rouge-score's `scoring.fmeasure` so the floats agree bit for bit."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def tokenize(text: str, stem: bool = False) -> list[str]:
    """rouge-score's default tokenizer: lowercase, non-[a-z0-9] -> space, split, Porter-stem tokens of > 3 chars."""
    tokens = NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    return [porter_stem(t) if len(t) > 3 else t for t in tokens] if stem else tokens


def sentences(text: str, stem: bool = False) -> list[list[str]]:
    """Tokens of each non-empty "\\n"-separated line (ROUGE-Lsum's sentences)."""
    return [tokenize(s, stem) for s in text.split("\n") if s]


# --- the three measures, on tokens --------------------------------------------------------------------------


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> Score:
    """ROUGE-N: n-gram counts, each clipped to its count in the other side."""
    hyp_grams = Counter(zip(*(hyp[i:] for i in range(n))))
    ref_grams = Counter(zip(*(ref[i:] for i in range(n))))
    overlap = sum((hyp_grams & ref_grams).values())
    precision = overlap / max(sum(hyp_grams.values()), 1)
    recall = overlap / max(sum(ref_grams.values()), 1)
    return Score(precision, recall, fmeasure(precision, recall))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel: one big-integer step per token of `b`.

    Crochemore, Iliopoulos, Pinzon & Reid (2001), "A fast and practical bit-vector algorithm for the LCS
    problem": bit i of `v` stands for a[i]; after all of b, the zero bits of v count the LCS. Same result
    as the O(|a||b|) table, in O(|b|) Python operations instead.
    """
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> Score:
    """ROUGE-L: precision and recall of the longest common subsequence."""
    if not hyp or not ref:
        return ZERO
    lcs = lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return Score(precision, recall, fmeasure(precision, recall))


def lcs_ref_indices(ref: Sequence[str], hyp: Sequence[str]) -> list[int]:
    """Positions in `ref` of one LCS with `hyp`: the one rouge-score's `_backtrack_norec` reads out."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        row, prev = table[i], table[i - 1]
        for j, h in enumerate(hyp, 1):
            row[j] = prev[j - 1] + 1 if r == h else max(prev[j], row[j - 1])
    i, j, out = len(ref), len(hyp), []
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:  # ties step up in ref, as the reference does
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(hyp_sents: Sequence[Sequence[str]], ref_sents: Sequence[Sequence[str]]) -> Score:
    """ROUGE-Lsum: union LCS of each reference sentence with all hypothesis sentences, hits counted once."""
    m, n = sum(map(len, ref_sents)), sum(map(len, hyp_sents))
    if not m or not n:
        return ZERO
    ref_left = Counter(t for s in ref_sents for t in s)  # tokens not yet counted as hits
    hyp_left = Counter(t for s in hyp_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union = sorted(set().union(*(lcs_ref_indices(ref, hyp) for hyp in hyp_sents)))
        for token in (ref[i] for i in union):
            if hyp_left[token] > 0 and ref_left[token] > 0:
                hits += 1
                hyp_left[token] -= 1
                ref_left[token] -= 1
    precision, recall = hits / n, hits / m
    return Score(precision, recall, fmeasure(precision, recall))


# --- texts ----------------------------------------------------------------------------------------------------


def check_types(types: Sequence[str]) -> None:
    for t in types:
        if t not in ("rougeL", "rougeLsum") and not ROUGE_N.fullmatch(t):
            raise LmforgeError(f"unknown ROUGE type {t!r}: use rouge1, rouge2, ... (rougeN), rougeL or rougeLsum")


def _score_one(hyp: str, ref: str, types: Sequence[str], stem: bool) -> dict[str, Score]:
    hyp_tokens, ref_tokens = tokenize(hyp, stem), tokenize(ref, stem)
    out = {}
    for t in types:
        if t == "rougeL":
            out[t] = rouge_l(hyp_tokens, ref_tokens)
        elif t == "rougeLsum":
            out[t] = rouge_lsum(sentences(hyp, stem), sentences(ref, stem))
        else:
            out[t] = rouge_n(hyp_tokens, ref_tokens, int(t[5:]))
    return out


def score(hypothesis: str, references: str | Sequence[str], types: Sequence[str] = DEFAULT_TYPES,
          stem: bool = False) -> dict[str, Score]:
    """ROUGE of one hypothesis against one reference, or several (per type, the one with the best F)."""
    check_types(types)
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise LmforgeError("no reference given for a hypothesis")
    per_ref = [_score_one(hypothesis, ref, types, stem) for ref in refs]
    best = {}
    for t in types:
        best[t] = max((s[t] for s in per_ref), key=lambda s: s.fmeasure)  # max keeps the first of equals
    return best


def rouge(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
          types: Sequence[str] = DEFAULT_TYPES, stem: bool = False) -> dict[str, dict[str, float]]:
    """Mean ROUGE over (hypothesis, references) pairs: {type: {"precision", "recall", "fmeasure"}}."""
    if len(hypotheses) != len(references):
        raise LmforgeError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must pair up")
    if len(hypotheses) == 0:
        raise LmforgeError("no hypotheses to score")
    check_types(types)
    scores = [score(h, r, types, stem) for h, r in zip(hypotheses, references)]
    return {t: {field: math.fsum(getattr(s[t], field) for s in scores) / len(scores) for field in Score._fields}
            for t in types}


# --- command line: `lmforge eval rouge --hyp FILE --ref FILE [--ref FILE ...] [--stem]` ------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rouge` subcommand's flags (rouge-score's defaults), --json included."""
    add_file_arguments(parser)
    parser.add_argument("--stem", action="store_true", help="Porter-stem tokens longer than 3 characters "
                        "(rouge-score's use_stemmer=True, ROUGE-1.5.5's -m)")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES),
                        help="comma-separated: rouge1, rouge2, ... rougeN, rougeL, rougeLsum (default: %(default)s)")
    parser.add_argument("--sentence-sep", metavar="STR", help="marker that separates sentences within a line, "
                        "for rougeLsum (e.g. '<n>'); without it each line is one sentence")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> dict:
    """Read the files named by `args` and return the mean scores, {type: {"precision", "recall", "fmeasure"}}."""
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    check_types(types)
    hyps, streams = read_hyp_refs(args.hyp, args.ref)
    if args.sentence_sep:
        hyps = [h.replace(args.sentence_sep, "\n") for h in hyps]
        streams = [[r.replace(args.sentence_sep, "\n") for r in refs] for refs in streams]
    return rouge(hyps, [list(refs) for refs in zip(*streams)], types, stem=args.stem)


def format_text(result: dict) -> str:
    """One line per type: 'rouge1     P 0.4512  R 0.4000  F 0.4123'."""
    return "\n".join(f"{t:<10} P {s['precision']:.4f}  R {s['recall']:.4f}  F {s['fmeasure']:.4f}"
                     for t, s in result.items())
