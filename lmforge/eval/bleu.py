"""BLEU (Papineni et al., 2002), computed exactly as sacreBLEU 2.x computes it (Post, 2018).

    from lmforge.eval.bleu import corpus_bleu, sentence_bleu
    corpus_bleu(hyps, [refs_a, refs_b]).score      # references: one stream per reference set, aligned with hyps
    sentence_bleu(hyp, [ref_a, ref_b]).score       # one segment; effective order on by default

    BLEU = BP * exp( (1/N) * sum_n log p_n ),   p_n = clipped n-gram matches / hypothesis n-grams (n = 1..N, N = 4)
    BP   = 1 if c >= r else exp(1 - r/c)          (c: hypothesis tokens; r: per segment, the reference length
                                                    closest to the hypothesis length, ties to the shorter; summed)

Clipping takes, for each n-gram, the largest count in any one reference of the segment. Matches and totals
are summed over the corpus before p_n is formed (corpus BLEU is not an average of sentence BLEUs).
Text is lowercased (optionally), right-stripped and tokenized first; see TOKENIZERS.

Smoothing (Chen & Cherry 2014, "A Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU"),
applied to an order n with no matches:
- `exp` (default, NIST mteval-v13a): the k-th such order gets p_n = 1 / (2^k * total_n);
- `floor`: p_n = smooth_value / total_n (default 0.1);
- `add-k`: matches and totals of every order n > 1 get + smooth_value (default 1), matched or not;
- `none`: p_n = 0, so the score is 0.
A corpus with no unigram match scores 0 whatever the smoothing. Orders with no hypothesis n-grams end the
product; with `effective_order` (sacreBLEU's sentence default) N shrinks to the last order that has
n-grams, so a 3-word sentence is not zero just for having no 4-grams.

sacreBLEU behaviours kept on purpose: an empty-string reference is a real reference of length 0 (only None
means "no reference here", which makes the signature's nrefs "var"); totals and sys_len count tokens of the
whole corpus, empty lines included. One difference: with add-k, `counts`/`totals` here are the raw
statistics, while sacreBLEU reports them with k already added (its precisions, and so the score, agree).
"""

from __future__ import annotations

import argparse
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

from lmforge.common import LmforgeError
from lmforge.eval.textfiles import add_file_arguments, read_hyp_refs

MAX_NGRAM_ORDER = 4
SMOOTH_DEFAULTS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}

# --- tokenizers: each maps a line to a string whose whitespace-separated pieces are the tokens -------------

# mteval-v13a.pl's "language-dependent part" (also sacreBLEU's post-tokenizer for zh), applied in order.
_MTEVAL_RULES = [
    # every ASCII punctuation mark except ' , - . becomes its own token (mteval: [\{-\~\[-\` -\&\(-\+\:-\@\/])
    (re.compile("([" + re.escape("".join(c for c in string.punctuation if c not in "',-.")) + "])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma, unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def _mteval_rules(line: str) -> str:
    for pattern, repl in _MTEVAL_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def tokenize_13a(line: str) -> str:
    """mteval-v13a.pl (WMT's standard): drop <skipped>, undo four HTML escapes, split off punctuation."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):  # in this order
        line = line.replace(escaped, char)
    return _mteval_rules(f" {line} ")  # the padding lets a period at either end split off


# mteval-v14.pl's international tokenization: Unicode punctuation (unless between digits) and symbols.
_INTL_RULES = [
    (regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "),  # punctuation preceded by a non-digit
    (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),  # punctuation followed by a non-digit
    (regex.compile(r"(\p{S})"), r" \1 "),  # every symbol
]


def tokenize_intl(line: str) -> str:
    """mteval-v14.pl --international-tokenization (a year at the very end keeps its period, as in mteval)."""
    for pattern, repl in _INTL_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


# Characters sacreBLEU's zh tokenizer splits one by one (CJK ideographs and punctuation, fullwidth forms...).
# Two of its ranges are written as 5-hex-digit "\u" escapes, which Python reads as a 4-digit escape plus a
# digit, and it compares 2-character strings: what it really splits is U+2001..U+2A6D (general punctuation,
# arrows, math symbols ...) and U+2F81..U+2FA1, not the CJK Extension B and Compatibility Supplement blocks.
# We reproduce what it does, since its scores are the ones people compare against.
_ZH_RANGES = [
    (0x3400, 0x4DB5), (0x4E00, 0x9FA5), (0x9FA6, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A), (0xFA70, 0xFAD9),
    (0x2001, 0x2A6D), (0x2F81, 0x2FA1),  # meant as U+20000..U+2A6D6 and U+2F800..U+2FA1D (see above)
    (0xFF00, 0xFFEF), (0x2E80, 0x2EFF), (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF),
    (0x3100, 0x312F), (0x31A0, 0x31BF), (0xFE10, 0xFE1F), (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF),
    (0x3200, 0x32FF), (0x3300, 0x33FF),
]
_ZH_CHAR = re.compile("([" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _ZH_RANGES) + "])")


def tokenize_zh(line: str) -> str:
    """Each Chinese character is a token; the rest is split by mteval's rules (without 13a's padding)."""
    return _mteval_rules(_ZH_CHAR.sub(r" \1 ", line.strip()))


def tokenize_char(line: str) -> str:
    """Every non-whitespace character is a token (language-agnostic, e.g. for Thai)."""
    return " ".join(line)


def tokenize_none(line: str) -> str:
    """The text is already tokenized: split on whitespace only."""
    return line


TOKENIZERS: dict[str, Callable[[str], str]] = {
    "13a": tokenize_13a, "intl": tokenize_intl, "zh": tokenize_zh, "char": tokenize_char, "none": tokenize_none,
}

# --- statistics --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BleuResult:
    """A BLEU score with its sufficient statistics; `signature` holds sacreBLEU's signature fields."""

    score: float  # 0..100
    counts: list[int]  # clipped matches per order 1..N
    totals: list[int]  # hypothesis n-grams per order 1..N
    precisions: list[float]  # p_n in percent, after smoothing
    bp: float
    sys_len: int
    ref_len: int
    signature: dict[str, str | int]

    @property
    def ratio(self) -> float:
        return self.sys_len / self.ref_len if self.ref_len else 0.0

    def to_dict(self) -> dict:
        """JSON-ready: {"bleu", "counts", "totals", "precisions", "bp", "ratio", "sys_len", "ref_len", "signature"}."""
        return {"bleu": self.score, "counts": list(self.counts), "totals": list(self.totals),
                "precisions": list(self.precisions), "bp": self.bp, "ratio": self.ratio, "sys_len": self.sys_len,
                "ref_len": self.ref_len, "signature": dict(self.signature),
                "signature_str": format_signature(self.signature)}


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    """Counts of every n-gram of `tokens` (as tuples), n = 1..max_order."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _segment_stats(hyp: list[str], refs: list[list[str]], max_order: int) -> list[int]:
    """[hyp_len, ref_len, matches_1..N, totals_1..N] of one segment (Papineni et al. 2002, section 2.1)."""
    clip: Counter = Counter()  # per n-gram, its largest count in a single reference
    for ref in refs:
        for ngram, count in _ngrams(ref, max_order).items():
            clip[ngram] = max(clip[ngram], count)
    ref_len = min((len(r) for r in refs), key=lambda n: (abs(len(hyp) - n), n))  # closest; ties: shorter
    matches, totals = [0] * max_order, [0] * max_order
    for ngram, count in _ngrams(hyp, max_order).items():
        totals[len(ngram) - 1] += count
        matches[len(ngram) - 1] += min(count, clip[ngram])
    return [len(hyp), ref_len, *matches, *totals]


def bleu_from_stats(counts: Sequence[int], totals: Sequence[int], sys_len: int, ref_len: int, *,
                    smooth_method: str = "exp", smooth_value: float | None = None, effective_order: bool = False
                    ) -> tuple[float, list[float], float]:
    """(score, precisions, bp) from summed statistics; see the module docstring for the formula and smoothing."""
    k = SMOOTH_DEFAULTS[smooth_method] if smooth_value is None else smooth_value
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    max_order = len(counts)
    precisions = [0.0] * max_order
    if not any(counts):
        return 0.0, precisions, bp
    order, halvings = max_order, 1.0  # order: the N that the mean of log-precisions divides by
    for n in range(1, max_order + 1):
        matched, total = counts[n - 1], totals[n - 1]
        if smooth_method == "add-k" and n > 1:
            matched, total = matched + k, total + k
        if total == 0:
            break
        if effective_order:
            order = n
        if matched:
            precisions[n - 1] = 100.0 * matched / total
        elif smooth_method == "exp":
            halvings *= 2
            precisions[n - 1] = 100.0 / (halvings * total)
        elif smooth_method == "floor":
            precisions[n - 1] = 100.0 * k / total
    used = precisions[:order]
    if 0.0 in used:  # log 0 = -inf: the geometric mean is 0 (sacreBLEU floors the log at -1e10, same result)
        return 0.0, precisions, bp
    return bp * math.exp(sum(math.log(p) for p in used) / order), precisions, bp


# --- public API --------------------------------------------------------------------------------------------


def _check_settings(tokenize: str, smooth_method: str, max_ngram_order: int) -> None:
    if tokenize not in TOKENIZERS:
        raise LmforgeError(f"unknown BLEU tokenizer {tokenize!r}; choose one of {', '.join(TOKENIZERS)}")
    if smooth_method not in SMOOTH_DEFAULTS:
        raise LmforgeError(f"unknown BLEU smoothing {smooth_method!r}; choose one of {', '.join(SMOOTH_DEFAULTS)}")
    if max_ngram_order < 1:
        raise LmforgeError(f"max_ngram_order must be at least 1, got {max_ngram_order}")


def check_streams(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]]) -> list[list[str]]:
    """Per segment, its references (None entries dropped); refuses unaligned or missing references."""
    if isinstance(hypotheses, str) or not hypotheses:
        raise LmforgeError("hypotheses must be a non-empty list of strings (one per segment)")
    if isinstance(references, str) or not references or any(isinstance(s, str) for s in references):
        raise LmforgeError("references must be a list of reference streams (each a list of strings aligned "
                           "with the hypotheses); for one reference per segment pass [refs]")
    for k, stream in enumerate(references, 1):
        if len(stream) != len(hypotheses):
            raise LmforgeError(f"reference stream {k} has {len(stream)} segments but there are "
                               f"{len(hypotheses)} hypotheses")
    segments = []
    for i, (hyp, *refs) in enumerate(zip(hypotheses, *references)):
        if hyp is None:
            raise LmforgeError(f"hypothesis {i} is None")
        present = [r for r in refs if r is not None]
        if not present:
            raise LmforgeError(f"segment {i} has no reference (every stream is None there)")
        segments.append(present)
    return segments


def nrefs_field(segments: list[list[str]]) -> int | str:
    """sacreBLEU's `nrefs`: references per segment, or "var" when segments differ."""
    counts = {len(refs) for refs in segments}
    return counts.pop() if len(counts) == 1 else "var"


def format_signature(signature: dict) -> str:
    """'nrefs:1|case:mixed|...' in sacreBLEU's order and spelling (without its version field)."""
    return "|".join(f"{key}:{value}" for key, value in signature.items())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], *, tokenize: str = "13a",
                lowercase: bool = False, smooth_method: str = "exp", smooth_value: float | None = None,
                effective_order: bool = False, max_ngram_order: int = MAX_NGRAM_ORDER) -> BleuResult:
    """Corpus BLEU: references[k][i] is the k-th reference of hypotheses[i] (None: segment i has no k-th)."""
    _check_settings(tokenize, smooth_method, max_ngram_order)
    segments = check_streams(hypotheses, references)
    tok = TOKENIZERS[tokenize]

    def tokens(text: str) -> list[str]:
        return tok((text.lower() if lowercase else text).rstrip()).split()

    max_order = max_ngram_order
    stats = [0] * (2 + 2 * max_order)
    for hyp, refs in zip(hypotheses, segments):
        seg = _segment_stats(tokens(hyp), [tokens(r) for r in refs], max_order)
        stats = [a + b for a, b in zip(stats, seg)]
    sys_len, ref_len, counts, totals = stats[0], stats[1], stats[2:2 + max_order], stats[2 + max_order:]
    score, precisions, bp = bleu_from_stats(counts, totals, sys_len, ref_len, smooth_method=smooth_method,
                                            smooth_value=smooth_value, effective_order=effective_order)
    smooth = smooth_method
    if SMOOTH_DEFAULTS[smooth_method] is not None:
        smooth += f"[{SMOOTH_DEFAULTS[smooth_method] if smooth_value is None else smooth_value:.2f}]"
    signature: dict[str, str | int] = {"nrefs": nrefs_field(segments), "case": "lc" if lowercase else "mixed",
                                       "eff": "yes" if effective_order else "no", "tok": tokenize, "smooth": smooth}
    if max_order != MAX_NGRAM_ORDER:  # not in sacreBLEU's signature, which assumes 4
        signature["order"] = max_order
    return BleuResult(score, counts, totals, precisions, bp, sys_len, ref_len, signature)


def sentence_bleu(hypothesis: str, references: Sequence[str | None], *, tokenize: str = "13a",
                  lowercase: bool = False, smooth_method: str = "exp", smooth_value: float | None = None,
                  effective_order: bool = True, max_ngram_order: int = MAX_NGRAM_ORDER) -> BleuResult:
    """BLEU of one segment against its references (sacreBLEU's `sentence_bleu`: effective order on)."""
    if isinstance(references, str) or not references:
        raise LmforgeError("references must be a non-empty list of strings (the references of this one segment)")
    return corpus_bleu([hypothesis], [[r] for r in references], tokenize=tokenize, lowercase=lowercase,
                       smooth_method=smooth_method, smooth_value=smooth_value, effective_order=effective_order,
                       max_ngram_order=max_ngram_order)


# --- command line: `lmforge eval bleu --hyp FILE --ref FILE [--ref FILE ...]` -----------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bleu` subcommand's flags (sacreBLEU's defaults), --json included."""
    add_file_arguments(parser)
    parser.add_argument("--tokenize", default="13a", choices=list(TOKENIZERS),
                        help="13a (mteval, WMT default), intl (Unicode punctuation/symbols), zh, char, none")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    parser.add_argument("--smooth-method", default="exp", choices=list(SMOOTH_DEFAULTS),
                        help="smoothing of orders with no match (default exp, as mteval)")
    parser.add_argument("--smooth-value", type=float, help="floor value (default 0.1) or k of add-k (default 1)")
    parser.add_argument("--effective-order", action="store_true",
                        help="average only the orders the hypotheses have n-grams of (for very short outputs)")
    parser.add_argument("--max-ngram-order", type=int, default=MAX_NGRAM_ORDER, help="N (default 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> dict:
    """Read the files named by `args` and return `BleuResult.to_dict()`."""
    hyps, refs = read_hyp_refs(args.hyp, args.ref)
    return corpus_bleu(hyps, refs, tokenize=args.tokenize, lowercase=args.lowercase,
                       smooth_method=args.smooth_method, smooth_value=args.smooth_value,
                       effective_order=args.effective_order, max_ngram_order=args.max_ngram_order).to_dict()


def format_text(result: dict) -> str:
    """One line in sacreBLEU's text format: 'BLEU|<signature> = 27.30 60.0/33.3/20.0/10.0 (BP = ...)'."""
    precisions = "/".join(f"{p:.1f}" for p in result["precisions"])
    return (f"BLEU|{result['signature_str']} = {result['bleu']:.2f} {precisions} (BP = {result['bp']:.3f} "
            f"ratio = {result['ratio']:.3f} hyp_len = {result['sys_len']} ref_len = {result['ref_len']})")
