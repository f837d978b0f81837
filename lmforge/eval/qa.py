"""Question answering and multiple choice: SQuAD exact match and token F1, acc / acc_norm, calibration error.

    from lmforge.eval.qa import squad, exact_match, token_f1, multiple_choice, expected_calibration_error
    squad(["Denver Broncos"], [["Denver Broncos", "The Broncos"]])       # {"exact_match": 100.0, "f1": 100.0, ...}
    squad(["", "1912"], [[], ["1912"]], version="2.0")                   # [] = unanswerable
    multiple_choice([[-4.1, -2.3]], [1], choices=[[" yes", " no"]])      # {"acc": 1.0, "acc_norm": 1.0}
    expected_calibration_error([0.9, 0.6], [True, False])                # 0.35

SQuAD (Rajpurkar et al. 2016, 2018), as the official evaluation scripts compute it (v1.1's
`evaluate-v1.1.py`, v2.0's `evaluate-v2.0.py`; tests/eval/test_qa.py carries both as references):
- normalize: lowercase, drop every ASCII punctuation character (`string.punctuation`), replace the words
  a / an / the with a space, collapse whitespace;
- exact match: normalized strings equal; token F1: bag-of-tokens overlap of the normalized strings;
  each is the max over the gold answers; the corpus score is the mean, in percent (as the scripts print);
- v1.1: F1 is 0 whenever nothing overlaps, even when both sides normalize to nothing;
- v2.0: gold answers that normalize to nothing are dropped, and a question left with none is
  unanswerable, its only gold answer "": then only a prediction that normalizes to "" scores (1 for EM and
  F1); F1 is 1 when both sides are empty, 0 when exactly one is.
"""

from __future__ import annotations

import bisect
import math
import numbers
import re
import string
from collections import Counter
from collections.abc import Sequence

from lmforge.common import LmforgeError

PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")
VERSIONS = ("1.1", "2.0")


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lower, remove punctuation, remove articles, fix whitespace (that order)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def _gold_answers(answers: str | Sequence[str], version: str) -> list[str]:
    """The gold answers a prediction is compared with (v2.0: empty ones dropped, none left -> [""])."""
    if version not in VERSIONS:
        raise LmforgeError(f"unknown SQuAD version {version!r}; choose 1.1 or 2.0")
    answers = [answers] if isinstance(answers, str) else list(answers)
    if version == "2.0":
        return [a for a in answers if normalize_answer(a)] or [""]
    if not answers:
        raise LmforgeError("a question has no gold answer (SQuAD v1.1 needs one; use version='2.0' for "
                           "unanswerable questions)")
    return answers


def _f1(prediction: str, gold: str, version: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)  # no-answer: right only when both are empty
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match(prediction: str, answers: str | Sequence[str], version: str = "1.1") -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _gold_answers(answers, version)))


def token_f1(prediction: str, answers: str | Sequence[str], version: str = "1.1") -> float:
    """The best token F1 of the prediction against any gold answer, in [0, 1]."""
    return max(_f1(prediction, a, version) for a in _gold_answers(answers, version))


def squad(predictions: Sequence[str], references: Sequence[str | Sequence[str]], version: str = "1.1") -> dict:
    """Corpus exact match and F1 in percent: {"exact_match", "f1", "total"}.

    references[i] is the list of gold answers of question i (v2.0: an empty list for unanswerable). v2.0
    adds the official script's breakdown under our names: has_answer_{exact_match,f1,total} and
    no_answer_{...} (only for groups that have questions). A question has an answer when some gold answer
    normalizes to text; the official script asks only whether the list is non-empty, which differs only for
    gold answers such as "the" or "." that SQuAD does not contain.
    """
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    if len(predictions) == 0:
        raise LmforgeError("no predictions to score")
    em = [exact_match(p, r, version) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r, version) for p, r in zip(predictions, references)]
    out = {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1), "total": len(em)}
    if version == "2.0":
        has = [_gold_answers(r, version) != [""] for r in references]
        for name, want in (("has_answer", True), ("no_answer", False)):
            idx = [i for i, h in enumerate(has) if h == want]
            if idx:
                out[f"{name}_exact_match"] = 100.0 * sum(em[i] for i in idx) / len(idx)
                out[f"{name}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
                out[f"{name}_total"] = len(idx)
    return out


# --- multiple choice ------------------------------------------------------------------------------------------


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (as numpy.argmax)."""
    if not values:
        raise LmforgeError("a question has no choices")
    if any(math.isnan(v) for v in values):
        raise LmforgeError("a log-likelihood is NaN")
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice(loglikelihoods: Sequence[Sequence[float]], golds: Sequence[int | Sequence[int]],
                    choices: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """Accuracy of picking the most likely choice, as lm-evaluation-harness scores `multiple_choice` tasks.

    loglikelihoods[i][k] is log p(choice k | question i), summed over the choice's tokens; golds[i] is the
    right choice's index (or a list of right indices). "acc": argmax of the log-likelihoods. "acc_norm"
    (when `choices`, the choice strings, are given): argmax of log-likelihood / len(choice string), the
    length in characters (lm-eval's `completion_len`; byte length would be its `acc_bytes`), which removes
    the bias towards short answers. Ties go to the lowest index, as numpy.argmax. Fractions in [0, 1].
    """
    if len(loglikelihoods) != len(golds) or (choices is not None and len(choices) != len(golds)):
        raise LmforgeError(f"{len(loglikelihoods)} log-likelihood lists, {len(golds)} golds"
                           f"{'' if choices is None else f', {len(choices)} choice lists'}: they must pair up")
    if len(golds) == 0:
        raise LmforgeError("no questions to score")
    acc = acc_norm = 0.0
    for i, (lls, gold) in enumerate(zip(loglikelihoods, golds)):
        right = {int(gold)} if isinstance(gold, numbers.Integral) else {int(g) for g in gold}
        acc += _argmax(lls) in right
        if choices is not None:
            if len(choices[i]) != len(lls):
                raise LmforgeError(f"question {i}: {len(lls)} log-likelihoods but {len(choices[i])} choices")
            if any(len(c) == 0 for c in choices[i]):
                raise LmforgeError(f"question {i}: an empty choice string cannot be length-normalized")
            acc_norm += _argmax([ll / len(c) for ll, c in zip(lls, choices[i])]) in right
    out = {"acc": acc / len(golds)}
    if choices is not None:
        out["acc_norm"] = acc_norm / len(golds)
    return out


# --- calibration ----------------------------------------------------------------------------------------------


def calibration_bins(confidences: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: {"lower", "upper", "count", "accuracy", "confidence"} each.

    Bin k holds confidences in (k/B, (k+1)/B], right edge included, as in Guo et al.'s reference code
    (gpleiss/temperature_scaling: `conf > lower and conf <= upper`), except that a confidence of exactly 0
    joins the first bin instead of being dropped. (torchmetrics puts edges in the upper bin: [lower, upper).)
    Empty bins have count 0 and accuracy/confidence 0.0. The reliability diagram plots these.
    """
    if len(confidences) != len(correct):
        raise LmforgeError(f"{len(confidences)} confidences but {len(correct)} correctness flags: they must pair up")
    if len(confidences) == 0:
        raise LmforgeError("no predictions to calibrate")
    if n_bins < 1:
        raise LmforgeError(f"n_bins must be at least 1, got {n_bins}")
    edges = [k / n_bins for k in range(n_bins + 1)]
    count, hits, conf_sum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:  # also rejects NaN
            raise LmforgeError(f"confidence {c} is outside [0, 1]")
        k = max(bisect.bisect_left(edges, c) - 1, 0)  # first edge >= c closes c's bin
        count[k] += 1
        hits[k] += bool(ok)
        conf_sum[k] += c
    return [{"lower": edges[k], "upper": edges[k + 1], "count": count[k],
             "accuracy": hits[k] / count[k] if count[k] else 0.0,
             "confidence": conf_sum[k] / count[k] if count[k] else 0.0} for k in range(n_bins)]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10) -> float:
    """ECE = sum over bins of (|bin| / N) * |accuracy(bin) - mean confidence(bin)| (Guo et al. 2017, eq. 3).

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017. `confidences` are
    the probabilities the model gave its own answers (e.g. the max softmax), `correct` whether each answer
    was right; bins as in `calibration_bins`. 0 is perfectly calibrated; the result is a fraction, not percent.
    """
    bins = calibration_bins(confidences, correct, n_bins)
    n = len(confidences)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins)
