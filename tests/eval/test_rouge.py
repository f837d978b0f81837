"""ROUGE equals Google's `rouge-score` (RougeScorer.score / score_multi) to 1e-12, in the same process.

Corpora are generated: prose sentences from the stdlib's pydoc topics, perturbed into hypotheses, and
word salads with unicode, punctuation, digits, newlines (rougeLsum sentences), empty lines, single words.
"""

import argparse
import random

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.eval import rouge as R

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize = pytest.importorskip("rouge_score.tokenize")

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
TOL = 1e-12
ODD_TOKENS = ["The", "cat", "cats", "running", "ran", "generously", "happiness", "flies", "dies", "sky", "skies",
              "it's", "U.S.", "3.14", "2024", "x", "a", "naïve", "café", "über", "日本語", "Ωmega", "İstanbul",
              "\u212a", "ﬁne", "—", "...", ",", "!", "\t", "\n", "\n\n", " \n", "e-mail", "co-operate", "end.",
              "organizations", "ROUGE-L", "n't", "🙂", "x2", "2x", "\r\n"]


def prose_sentences(n: int, seed: int = 0) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    sents = [s.strip() for s in text.replace("\n", " ").split(". ") if 3 <= len(s.split()) <= 40]
    return random.Random(seed).sample(sents, n)


def perturb(sentence: str, rng: random.Random) -> str:
    """A hypothesis near `sentence`: words dropped, swapped, replaced, sentences broken at random."""
    words = sentence.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.25:
            w = rng.choice(ODD_TOKENS)
        out.append(w)
        if rng.random() < 0.08:
            out.append("\n")
    if len(out) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def salad(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.1:
        return rng.choice(ODD_TOKENS)
    if kind < 0.13:
        return "\n\n"
    return " ".join(rng.choice(ODD_TOKENS) for _ in range(rng.randint(1, 25)))


def corpus(n: int = 400, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """n hypotheses, each with 1 to 3 references; half prose, half word salad."""
    rng = random.Random(seed)
    refs = [[perturb(s, rng) if k else s for k in range(rng.randint(1, 3))] for s in prose_sentences(n // 2, seed)]
    hyps = [perturb(r[0], rng) for r in refs]
    for _ in range(n - n // 2):
        hyps.append(salad(rng))
        refs.append([salad(rng) for _ in range(rng.randint(1, 3))])
    return hyps, refs


def max_diff(ours: dict, theirs: dict) -> float:
    return max(abs(a - b) for t in TYPES for a, b in zip(ours[t], theirs[t]))


@pytest.mark.parametrize("stem", [False, True])
def test_single_reference_equals_rouge_score(stem):
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)
    hyps, refs = corpus(seed=1)
    worst = max(max_diff(R.score(h, r[0], TYPES, stem=stem), scorer.score(r[0], h)) for h, r in zip(hyps, refs))
    assert worst <= TOL


@pytest.mark.parametrize("stem", [False, True])
def test_multi_reference_equals_score_multi_and_mean_equals_numpy_mean(stem):
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)
    hyps, refs = corpus(seed=2)
    theirs = [scorer.score_multi(r, h) for h, r in zip(hyps, refs)]
    ours = [R.score(h, r, TYPES, stem=stem) for h, r in zip(hyps, refs)]
    assert max(max_diff(o, t) for o, t in zip(ours, theirs)) <= TOL
    mean = R.rouge(hyps, refs, TYPES, stem=stem)
    for t in TYPES:
        for field in ("precision", "recall", "fmeasure"):
            assert abs(mean[t][field] - np.mean([getattr(s[t], field) for s in theirs])) <= TOL


def test_all_empty_hypotheses_score_zero_like_rouge_score():
    scorer = rouge_scorer.RougeScorer(TYPES)
    _, refs = corpus(40, seed=3)
    for hyp in ["", " ", "\n", "...", "日本語 —"]:
        for r in refs:
            assert max_diff(R.score(hyp, r, TYPES), scorer.score_multi(r, hyp)) == 0.0
    assert all(v == 0.0 for s in R.rouge([""] * len(refs), refs).values() for v in s.values())


def test_higher_orders_and_repeated_ngrams():
    scorer = rouge_scorer.RougeScorer(["rouge3", "rouge4", "rouge9"])
    rng = random.Random(4)
    for _ in range(200):
        h = " ".join(rng.choice("ab") for _ in range(rng.randint(0, 15)))
        r = " ".join(rng.choice("abc") for _ in range(rng.randint(0, 15)))
        ours, theirs = R.score(h, r, ["rouge3", "rouge4", "rouge9"]), scorer.score(r, h)
        assert all(np.allclose(ours[t], theirs[t], rtol=0, atol=TOL) for t in theirs)


@pytest.mark.parametrize("stem", [False, True])
def test_tokenizer_equals_rouge_score(stem):
    stemmer = rouge_scorer.tokenizers.DefaultTokenizer(use_stemmer=stem)
    rng = random.Random(5)
    for _ in range(300):
        text = salad(rng)
        assert R.tokenize(text, stem) == stemmer.tokenize(text), repr(text)
    assert R.tokenize("Hello, WORLD! naïve 3.14 \u212aelvin") == ["hello", "world", "na", "ve", "3", "14", "kelvin"]


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(6)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 30))]
        table = rouge_scorer._lcs_table(a, b)
        assert R.lcs_length(a, b) == table[-1][-1]
        assert R.lcs_ref_indices(a, b) == rouge_scorer._backtrack_norec(table, a, b)


def test_rougelsum_uses_newline_sentences():
    hyp, ref = "the cat sat\non the mat", "on the mat\nthe cat sat"
    assert R.score(hyp, ref, ["rougeLsum"])["rougeLsum"].fmeasure == 1.0
    assert R.score(hyp, ref, ["rougeL"])["rougeL"].fmeasure == 0.5


# --- command line ---------------------------------------------------------------------------------------------


def cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_averages_lines_with_several_reference_files(tmp_path):
    hyps, refs = corpus(30, seed=7)
    hyps = [h.replace("\n", " <n> ").replace("\r", " ") for h in hyps]
    refs = [[(r[k % len(r)]).replace("\n", " <n> ").replace("\r", " ") for k in range(2)] for r in refs]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    for k in range(2):
        (tmp_path / f"ref{k}.txt").write_text("\n".join(r[k] for r in refs) + "\n", encoding="utf-8")
    argv = ["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref0.txt"),
            "--ref", str(tmp_path / "ref1.txt"), "--stem", "--sentence-sep", "<n>"]
    result = R.run(cli_args(argv))
    split = lambda s: s.replace("<n>", "\n").rstrip()  # noqa: E731 - read_lines right-strips each line
    expected = R.rouge([split(h) for h in hyps], [[split(x) for x in r] for r in refs], stem=True)
    assert result == expected
    assert set(result) == set(R.DEFAULT_TYPES) and set(result["rouge1"]) == {"precision", "recall", "fmeasure"}
    assert R.format_text(result).splitlines()[0].startswith("rouge1 ")
    only = R.run(cli_args([*argv[:6], "--types", "rouge1,rougeL"]))
    assert list(only) == ["rouge1", "rougeL"]


def test_different_line_counts_name_both_counts(tmp_path):
    (tmp_path / "hyp.txt").write_text("a\nb\nc\n")
    (tmp_path / "ref.txt").write_text("a\nb\n")
    with pytest.raises(LmforgeError, match="3 lines.*2") as e:
        R.run(cli_args(["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt")]))
    assert "\n" not in str(e.value)


def test_bad_input_is_one_line_lmforge_error():
    for call in [lambda: R.rouge(["a", "b"], ["a"]), lambda: R.rouge([], []), lambda: R.score("a", []),
                 lambda: R.score("a", "a", ["rougeX"]), lambda: R.score("a", "a", ["rouge0"])]:
        with pytest.raises(LmforgeError) as e:
            call()
        assert "\n" not in str(e.value)
