"""SQuAD EM/F1 against the official evaluation scripts, multiple-choice acc/acc_norm, calibration error.

The `evaluate` package's squad metrics are hub modules (not in the wheel, so not usable offline), so the
reference here is the official scripts' logic transcribed verbatim below: SQuAD v1.1's
`evaluate-v1.1.py` (as shipped in huggingface/evaluate metrics/squad/compute_score.py) and SQuAD v2.0's
`evaluate-v2.0.py` (normalize_answer, get_tokens, compute_exact, compute_f1, get_raw_scores, make_eval_dict).
"""

import collections
import random
import re
import string

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.eval import qa

# --- the official SQuAD v1.1 script (verbatim logic) -----------------------------------------------------------


def v11_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def v11_f1_score(prediction, ground_truth):
    prediction_tokens = v11_normalize_answer(prediction).split()
    ground_truth_tokens = v11_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def v11_exact_match_score(prediction, ground_truth):
    return v11_normalize_answer(prediction) == v11_normalize_answer(ground_truth)


def v11_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def v11_compute_score(predictions, references):
    f1 = exact_match = total = 0
    for prediction, ground_truths in zip(predictions, references):
        total += 1
        exact_match += v11_metric_max_over_ground_truths(v11_exact_match_score, prediction, ground_truths)
        f1 += v11_metric_max_over_ground_truths(v11_f1_score, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --- the official SQuAD v2.0 script (verbatim logic) -----------------------------------------------------------


def v20_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def v20_get_tokens(s):
    if not s:
        return []
    return v20_normalize_answer(s).split()


def v20_compute_exact(a_gold, a_pred):
    return int(v20_normalize_answer(a_gold) == v20_normalize_answer(a_pred))


def v20_compute_f1(a_gold, a_pred):
    gold_toks = v20_get_tokens(a_gold)
    pred_toks = v20_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def v20_evaluate(predictions, references):
    exact_scores, f1_scores, has_ans = {}, {}, {}
    for qid, (prediction, answers) in enumerate(zip(predictions, references)):
        has_ans[qid] = bool(answers)
        gold_answers = [a for a in answers if v20_normalize_answer(a)]
        if not gold_answers:
            # For unanswerable questions, only correct answer is empty string
            gold_answers = [""]
        exact_scores[qid] = max(v20_compute_exact(a, prediction) for a in gold_answers)
        f1_scores[qid] = max(v20_compute_f1(a, prediction) for a in gold_answers)

    def make_eval_dict(qid_list):
        total = len(qid_list)
        return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
                "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}

    out = make_eval_dict(list(exact_scores))
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in has_ans.items() if v == keep]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in make_eval_dict(qids).items()})
    return out


# --- generated questions ----------------------------------------------------------------------------------------

WORDS = ["Denver", "Broncos", "the", "The", "a", "an", "An", "and", "1912", "3.5", "U.S.", "Saint", "Bernadette",
         "Soubirous", "théâtre", "naïve", "—", "«quoted»", "it's", "(1)", "", " ", "A.", "the.", "anthem", "then",
         "Ångström", "co-op", "50%", "$10", "\t", "Edison's", "…"]


def phrase(rng: random.Random, empty_rate: float = 0.05) -> str:
    if rng.random() < empty_rate:
        return rng.choice(["", " ", "the", ".", "An!"])
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


def questions(n: int, seed: int, unanswerable_rate: float = 0.0):
    rng = random.Random(seed)
    golds = [[] if rng.random() < unanswerable_rate else [phrase(rng) for _ in range(rng.randint(1, 3))]
             for _ in range(n)]
    # predictions near a gold answer half the time, so EM and F1 hit every branch
    preds = [rng.choice(g) + rng.choice(["", ".", " the", "!"]) if g and rng.random() < 0.5 else phrase(rng, 0.15)
             for g in golds]
    return preds, golds


def test_normalize_answer_equals_official():
    rng = random.Random(0)
    for _ in range(2000):
        s = phrase(rng)
        assert qa.normalize_answer(s) == v11_normalize_answer(s) == v20_normalize_answer(s)
    assert qa.normalize_answer("The  Denver-Broncos, an anthem!") == "denverbroncos anthem"


def test_squad_v11_equals_official_script():
    preds, golds = questions(3000, seed=1)
    ours, theirs = qa.squad(preds, golds), v11_compute_score(preds, golds)
    assert ours["exact_match"] == theirs["exact_match"] and ours["f1"] == theirs["f1"] and ours["total"] == 3000
    for p, g in zip(preds[:500], golds[:500]):
        assert qa.token_f1(p, g) == v11_metric_max_over_ground_truths(v11_f1_score, p, g)
        assert qa.exact_match(p, g) == float(v11_metric_max_over_ground_truths(v11_exact_match_score, p, g))
    assert 0 < theirs["exact_match"] < 100 and 0 < theirs["f1"] < 100


def test_squad_v20_equals_official_script():
    preds, golds = questions(3000, seed=2, unanswerable_rate=0.3)
    ours, theirs = qa.squad(preds, golds, version="2.0"), v20_evaluate(preds, golds)
    assert ours["exact_match"] == theirs["exact"] and ours["f1"] == theirs["f1"] and ours["total"] == theirs["total"]
    # the breakdown: ours counts a question as answered when a gold answer has text after normalization
    answered = [any(qa.normalize_answer(a) for a in g) for g in golds]
    kept = [i for i, g in enumerate(golds) if bool(g) == answered[i]]  # drop "the"-only golds, where we differ
    ours = qa.squad([preds[i] for i in kept], [golds[i] for i in kept], version="2.0")
    theirs = v20_evaluate([preds[i] for i in kept], [golds[i] for i in kept])
    for name, official in (("has_answer", "HasAns"), ("no_answer", "NoAns")):
        assert ours[f"{name}_exact_match"] == theirs[f"{official}_exact"]
        assert ours[f"{name}_f1"] == theirs[f"{official}_f1"] and ours[f"{name}_total"] == theirs[f"{official}_total"]


@pytest.mark.parametrize("pred, golds, version, em, f1", [
    ("Denver Broncos", ["Denver Broncos", "The Broncos"], "1.1", 1.0, 1.0),
    ("the Broncos", ["Denver Broncos"], "1.1", 0.0, 2 * 1.0 * 0.5 / 1.5),
    ("Broncos of Denver", ["Denver Broncos"], "1.1", 0.0, 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),
    ("", ["the"], "1.1", 1.0, 0.0),            # v1.1: both normalize to nothing -> EM 1, F1 0
    ("", [], "2.0", 1.0, 1.0),                  # unanswerable, empty prediction: right
    ("The.", [], "2.0", 1.0, 1.0),              # normalizes to "": also an abstention
    ("1912", [], "2.0", 0.0, 0.0),              # answering an unanswerable question
    ("", ["1912"], "2.0", 0.0, 0.0),            # abstaining on an answerable one
    ("", ["the", ""], "2.0", 1.0, 1.0),         # golds that normalize to nothing are dropped -> unanswerable
])
def test_hand_computed_cases(pred, golds, version, em, f1):
    assert qa.exact_match(pred, golds, version) == em
    assert qa.token_f1(pred, golds, version) == pytest.approx(f1, abs=1e-15)


def test_squad_bad_input():
    for call in [lambda: qa.squad(["a"], [["a"], ["b"]]), lambda: qa.squad([], []),
                 lambda: qa.exact_match("a", []), lambda: qa.token_f1("a", ["a"], version="3")]:
        with pytest.raises(LmforgeError) as e:
            call()
        assert "\n" not in str(e.value)


# --- multiple choice ------------------------------------------------------------------------------------------------


def lm_eval_acc(lls, choices, gold):
    """lm-evaluation-harness ConfigurableTask.process_results for multiple_choice (v0.4), transcribed."""
    completion_len = np.array([float(len(i)) for i in choices])
    pred, pred_norm = np.argmax(lls), np.argmax(np.array(lls) / completion_len)
    if isinstance(gold, list):
        return float(pred in gold), float(pred_norm in gold)
    return float(pred == gold), float(pred_norm == gold)


def test_multiple_choice_equals_lm_eval_formula():
    rng = random.Random(3)
    lls, choices, golds = [], [], []
    for _ in range(2000):
        k = rng.randint(2, 5)
        choices.append([" " + "x" * rng.randint(1, 30) for _ in range(k)])
        lls.append([-rng.choice([1, 2, 3, 4.5, 6.0]) * rng.randint(1, 4) for _ in range(k)])  # many ties
        golds.append(rng.randrange(k) if rng.random() < 0.8 else [rng.randrange(k), rng.randrange(k)])
    ref = [lm_eval_acc(ll, c, g) for ll, c, g in zip(lls, choices, golds)]
    ours = qa.multiple_choice(lls, golds, choices)
    assert ours["acc"] == pytest.approx(np.mean([r[0] for r in ref]), abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(np.mean([r[1] for r in ref]), abs=1e-12)
    assert ours["acc"] != ours["acc_norm"]
    assert qa.multiple_choice(lls, np.array([g if isinstance(g, int) else g[0] for g in golds])).keys() == {"acc"}


def test_multiple_choice_hand_cases():
    # a long right answer loses on raw log-likelihood and wins per character
    assert qa.multiple_choice([[-12.0, -5.0]], [0], [[" the capital of France", " Rome"]]) == {"acc": 0.0,
                                                                                                "acc_norm": 1.0}
    assert qa.multiple_choice([[-1.0, -1.0]], [0]) == {"acc": 1.0}  # ties go to the first choice
    for call in [lambda: qa.multiple_choice([[-1.0]], [0, 1]), lambda: qa.multiple_choice([[-1.0, -2]], [0], [[""]]),
                 lambda: qa.multiple_choice([[-1.0, -2]], [0], [["a", ""]]), lambda: qa.multiple_choice([[]], [0]),
                 lambda: qa.multiple_choice([[float("nan"), 0]], [0])]:
        with pytest.raises(LmforgeError):
            call()


# --- calibration ------------------------------------------------------------------------------------------------


def guo_ece(confidences, correct, n_bins=10):
    """gpleiss/temperature_scaling `_ECELoss` (Guo et al. 2017's code), transcribed from torch to numpy."""
    confidences, accuracies = np.asarray(confidences, dtype=float), np.asarray(correct, dtype=float)
    boundaries = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lower, upper in zip(boundaries[:-1], boundaries[1:]):
        in_bin = (confidences > lower) & (confidences <= upper)
        prop_in_bin = in_bin.mean()
        if prop_in_bin > 0:
            ece += abs(confidences[in_bin].mean() - accuracies[in_bin].mean()) * prop_in_bin
    return ece


def test_ece_hand_computed():
    # bins (0.8, 0.9]: 2 items, acc 0.5, conf 0.9; (0.5, 0.6]: acc 1, conf 0.6; (0.2, 0.3]: acc 0, conf 0.3
    assert qa.expected_calibration_error([0.9, 0.9, 0.6, 0.3], [1, 0, 1, 0]) == pytest.approx(
        2 / 4 * 0.4 + 1 / 4 * 0.4 + 1 / 4 * 0.3, abs=1e-15)
    assert qa.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert qa.expected_calibration_error([0.25, 0.75], [0, 1], n_bins=1) == pytest.approx(0.0, abs=1e-15)
    assert qa.expected_calibration_error([0.0, 1.0], [1, 0], n_bins=1) == pytest.approx(0.0, abs=1e-15)
    assert qa.expected_calibration_error([0.0, 1.0], [1, 0], n_bins=2) == pytest.approx(1.0, abs=1e-15)


def test_bin_edges_belong_to_the_lower_bin():
    bins = qa.calibration_bins([0.0, 0.3, 0.30000000000000004, 0.5, 1.0], [1, 1, 1, 1, 1])
    assert [b["count"] for b in bins] == [1, 0, 1, 1, 1, 0, 0, 0, 0, 1]
    assert bins[2]["lower"] == pytest.approx(0.2) and bins[2]["upper"] == pytest.approx(0.3)
    assert bins[3]["confidence"] == 0.30000000000000004 and bins[1]["accuracy"] == 0.0


def test_ece_equals_guo_reference_off_the_edges():
    rng = np.random.default_rng(4)
    conf = rng.uniform(0.01, 1.0, 5000)
    correct = rng.uniform(size=5000) < conf ** 1.5  # overconfident
    for n_bins in (1, 10, 15):
        assert qa.expected_calibration_error(conf.tolist(), correct.tolist(), n_bins) == pytest.approx(
            guo_ece(conf, correct, n_bins), abs=1e-12)
    as_lists = qa.expected_calibration_error(conf.tolist(), correct.tolist())
    assert qa.expected_calibration_error(conf, correct) == as_lists  # numpy arrays work too


def test_ece_bad_input():
    ece = qa.expected_calibration_error
    for call in [lambda: ece([0.5], [1, 0]), lambda: ece([], []), lambda: ece([1.5], [1]), lambda: ece([0.5], [1], 0),
                 lambda: ece([float("nan")], [1])]:
        with pytest.raises(LmforgeError) as e:
            call()
        assert "\n" not in str(e.value)
