"""chrF (Popović 2015) and chrF++ (Popović 2017), computed exactly as sacreBLEU 2.x's CHRF computes them.

    from lmforge.eval.chrf import corpus_chrf, sentence_chrf
    corpus_chrf(hyps, [refs_a, refs_b]).score                 # chrF2: character 1..6-grams, beta = 2
    corpus_chrf(hyps, [refs], word_order=2).score             # chrF2++: plus word unigrams and bigrams

For every n-gram order (character orders 1..char_order, then word orders 1..word_order) the statistics are
(hypothesis n-grams, reference n-grams, matches), matches clipped by the reference counts. Then

    chrP = mean over orders of matches/hyp,   chrR = mean over orders of matches/ref,
    chrF_beta = 100 * (1 + beta^2) * chrP * chrR / (beta^2 * chrP + chrR)      (recall beta times as important)

By default (sacreBLEU >= 2.0) the means run over the "effective" orders only, those where both sides have
n-grams. With `eps_smoothing` (chrF++.py, Moses, NLTK) it is instead the mean over all orders of each
order's own F-score, where an empty side counts as precision or recall 1e-16.

Details that change scores, all as in sacreBLEU: character n-grams are taken after removing all whitespace
(unless `whitespace=True`); words for chrF++ are whitespace-split, with one ASCII punctuation mark split off
the end of a word, or else off its start ("(hi)" -> "(hi", ")"); an order where the reference has no
n-grams records 0 hypothesis n-grams too. With several references a segment keeps the statistics of its
best-scoring reference (the first one on ties), and corpus chrF sums the segments' statistics: it is not a
mean of sentence scores. Text is not stripped or tokenized otherwise; `lowercase` folds case first.
"""

from __future__ import annotations

import argparse
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.common import LmforgeError
from lmforge.eval.bleu import check_streams, format_signature, nrefs_field
from lmforge.eval.textfiles import add_file_arguments, read_hyp_refs

CHAR_ORDER, WORD_ORDER, BETA = 6, 0, 2
EPS = 1e-16
_PUNCTUATION = set(string.punctuation)


@dataclass(frozen=True)
class ChrfResult:
    """A chrF score, its per-order statistics (character orders first) and sacreBLEU's signature fields."""

    score: float  # 0..100
    name: str  # sacreBLEU's: "chrF2", "chrF2++"
    statistics: list[tuple[int, int, int]]  # per order: (hyp n-grams, ref n-grams, matches), summed over segments
    signature: dict[str, str | int]

    def to_dict(self) -> dict:
        """JSON-ready: {"chrf", "name", "statistics", "signature", "signature_str"}."""
        return {"chrf": self.score, "name": self.name, "statistics": [list(s) for s in self.statistics],
                "signature": dict(self.signature), "signature_str": format_signature(self.signature)}


def chrpp_words(text: str) -> list[str]:
    """chrF++'s words: split on whitespace, then one punctuation mark off the end, else off the start."""
    words = []
    for w in text.split():
        if len(w) > 1 and w[-1] in _PUNCTUATION:
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in _PUNCTUATION:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def _segment_ngrams(text: str, char_order: int, word_order: int, whitespace: bool) -> list[Counter]:
    """One Counter per order: character n-grams 1..char_order, then word n-grams 1..word_order."""
    chars = text if whitespace else "".join(text.split())
    out = [Counter(chars[i:i + n] for i in range(len(chars) - n + 1)) for n in range(1, char_order + 1)]
    if word_order:
        words = chrpp_words(text)
        out += [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, word_order + 1)]
    return out


def _match_stats(hyp: list[Counter], ref: list[Counter]) -> list[tuple[int, int, int]]:
    """Per order (hyp n-grams, ref n-grams, clipped matches); no reference n-grams -> the hyp side counts 0."""
    stats = []
    for h, r in zip(hyp, ref):
        matches = sum(min(count, r[g]) for g, count in h.items() if g in r)
        stats.append((sum(h.values()) if r else 0, sum(r.values()), matches))
    return stats


def chrf_from_stats(stats: Sequence[tuple[int, int, int]], beta: float = BETA, eps_smoothing: bool = False) -> float:
    """The F-beta score (0..100) of summed per-order statistics; see the module docstring."""
    factor = beta**2
    f_sum, p_sum, r_sum, effective = 0.0, 0.0, 0.0, 0
    for n_hyp, n_ref, n_match in stats:
        prec = n_match / n_hyp if n_hyp > 0 else EPS
        rec = n_match / n_ref if n_ref > 0 else EPS
        denom = factor * prec + rec
        f_sum += (1 + factor) * prec * rec / denom if denom > 0 else EPS
        if n_hyp > 0 and n_ref > 0:
            p_sum, r_sum, effective = p_sum + prec, r_sum + rec, effective + 1
    if eps_smoothing:
        return 100 * f_sum / len(stats)
    if effective == 0:
        return 0.0
    chr_p, chr_r = p_sum / effective, r_sum / effective
    if chr_p + chr_r == 0:
        return 0.0
    return 100 * ((1 + factor) * chr_p * chr_r / (factor * chr_p + chr_r))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], *,
                char_order: int = CHAR_ORDER, word_order: int = WORD_ORDER, beta: float = BETA,
                lowercase: bool = False, whitespace: bool = False, eps_smoothing: bool = False) -> ChrfResult:
    """Corpus chrF: references[k][i] is the k-th reference of hypotheses[i] (None: segment i has no k-th)."""
    segments = check_streams(hypotheses, references)
    order = char_order + word_order
    if char_order < 0 or word_order < 0 or order == 0:
        raise LmforgeError(f"chrF needs at least one n-gram order (char_order={char_order}, word_order={word_order})")

    def ngrams(text: str) -> list[Counter]:
        return _segment_ngrams(text.lower() if lowercase else text, char_order, word_order, whitespace)

    totals = [(0, 0, 0)] * order
    for hyp, refs in zip(hypotheses, segments):
        hyp_ngrams = ngrams(hyp)
        best, best_f = None, -1.0
        for ref in refs:  # the reference this hypothesis scores best against (first on ties)
            stats = _match_stats(hyp_ngrams, ngrams(ref))
            f = chrf_from_stats(stats, beta, eps_smoothing)
            if f > best_f:
                best, best_f = stats, f
        totals = [tuple(a + b for a, b in zip(t, s)) for t, s in zip(totals, best)]
    signature: dict[str, str | int] = {"nrefs": nrefs_field(segments), "case": "lc" if lowercase else "mixed",
                                       "eff": "no" if eps_smoothing else "yes", "nc": char_order, "nw": word_order,
                                       "space": "yes" if whitespace else "no"}
    return ChrfResult(chrf_from_stats(totals, beta, eps_smoothing), f"chrF{beta}" + "+" * word_order, totals,
                      signature)


def sentence_chrf(hypothesis: str, references: Sequence[str | None], **options) -> ChrfResult:
    """chrF of one segment against its references (the best one counts); options as in `corpus_chrf`."""
    if isinstance(references, str) or not references:
        raise LmforgeError("references must be a non-empty list of strings (the references of this one segment)")
    return corpus_chrf([hypothesis], [[r] for r in references], **options)


# --- command line: `lmforge eval chrf --hyp FILE --ref FILE [--ref FILE ...]` -----------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `chrf` subcommand's flags (sacreBLEU's defaults), --json included."""
    add_file_arguments(parser)
    parser.add_argument("--char-order", type=int, default=CHAR_ORDER, help="character n-gram order (default 6)")
    parser.add_argument("--word-order", type=int, default=WORD_ORDER, help="word n-gram order; 2 = chrF++ "
                        "(default 0)")
    parser.add_argument("--beta", type=int, default=BETA, help="recall is beta times as important (default 2)")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive chrF")
    parser.add_argument("--whitespace", action="store_true", help="keep whitespace inside character n-grams")
    parser.add_argument("--eps-smoothing", action="store_true",
                        help="chrF++.py/Moses/NLTK averaging (mean of per-order F with 1e-16 for empty sides)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> dict:
    """Read the files named by `args` and return `ChrfResult.to_dict()`."""
    hyps, refs = read_hyp_refs(args.hyp, args.ref)
    return corpus_chrf(hyps, refs, char_order=args.char_order, word_order=args.word_order, beta=args.beta,
                       lowercase=args.lowercase, whitespace=args.whitespace,
                       eps_smoothing=args.eps_smoothing).to_dict()


def format_text(result: dict) -> str:
    """One line in sacreBLEU's text format: 'chrF2|<signature> = 55.61'."""
    return f"{result['name']}|{result['signature_str']} = {result['chrf']:.2f}"
