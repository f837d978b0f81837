"""chrF / chrF++: parity with sacreBLEU's CHRF (scores to 1e-9, summed per-order statistics equal, signature
fields equal) on generated corpora with 1-4 references and hand-written cases; bad input; the CLI helper."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
from sacrebleu.metrics import CHRF

from lmforge.common import LmforgeError
from lmforge.eval import chrf
from lmforge.eval.chrf import chrpp_words, corpus_chrf, sentence_chrf
from tests.eval.test_bleu import random_corpus, sacre_read, sacre_signature

SETTINGS = [dict(word_order=w, lowercase=lc, whitespace=ws, eps_smoothing=eps)
            for w, lc, ws, eps in itertools.product([0, 1, 2], [False, True], [False, True], [False, True])]


def sacre_stats(metric: CHRF, hyps, refs) -> list[tuple[int, int, int]]:
    """sacreBLEU's corpus statistics (per segment [hyp, ref, match] * orders, summed), as our tuples."""
    summed = [sum(column) for column in zip(*metric._extract_corpus_statistics(hyps, refs))]
    return [tuple(summed[i:i + 3]) for i in range(0, len(summed), 3)]


def assert_same(ours, theirs, metric, hyps, refs):
    assert abs(ours.score - theirs.score) <= 1e-9
    assert ours.name == theirs.name
    assert ours.statistics == sacre_stats(metric, hyps, refs)
    assert ours.signature == sacre_signature(metric)


@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_corpus_chrf_matches_sacrebleu(seed, n_refs):
    hyps, refs = random_corpus(seed * 10 + n_refs + 50, n_refs)
    for kw in SETTINGS[seed::2]:
        metric = CHRF(**kw)
        assert_same(corpus_chrf(hyps, refs, **kw), metric.corpus_score(hyps, refs), metric, hyps, refs)


@pytest.mark.parametrize("n_refs", [1, 3])
def test_sentence_chrf_matches_sacrebleu(n_refs):
    """Sentence level keeps the best reference; ties go to the first (sacreBLEU's order)."""
    hyps, refs = random_corpus(200 + n_refs, n_refs, n_segments=12)
    for kw in SETTINGS[::3]:
        for hyp, *seg_refs in zip(hyps, *refs):
            metric = CHRF(**kw)
            assert_same(sentence_chrf(hyp, seg_refs, **kw), metric.sentence_score(hyp, seg_refs), metric, [hyp],
                        [[r] for r in seg_refs])


@pytest.mark.parametrize("char_order,word_order,beta", [(4, 0, 1), (6, 2, 3), (1, 3, 2), (0, 2, 2), (8, 1, 0)])
def test_orders_and_beta(char_order, word_order, beta):
    hyps, refs = random_corpus(9, 2)
    kw = dict(char_order=char_order, word_order=word_order, beta=beta)
    for eps in (False, True):
        metric = CHRF(eps_smoothing=eps, **kw)
        assert_same(corpus_chrf(hyps, refs, eps_smoothing=eps, **kw), metric.corpus_score(hyps, refs), metric, hyps,
                    refs)


def test_edge_cases_match_sacrebleu():
    cases = [
        ([""], [[""]]),  # everything empty: no effective order -> 0 (eps smoothing: 1e-14)
        (["", ""], [["a b c", "d"]]),  # all-empty hypotheses
        (["abc def", "g"], [["", ""]]),  # empty references
        (["The cat sat."], [["The cat sat."]]),  # identical -> 100
        (["xyz"], [["abc"]]),  # nothing in common -> 0
        (["a"], [["a"]]),  # shorter than every order but 1
        (["(hi) there,"], [["( hi ) there ,"]]),  # chrF++'s punctuation split
        (["a b c"], [["a b c"], ["a b c"]]),  # tie between references
        (["the cat"], [["the dog"], ["the cat"], [""]]),  # best reference is not the first
        (["one two", "three"], [["one two", "three"], [None, "three four"]]),  # None: variable reference count
    ]
    for hyps, refs in cases:
        for kw in SETTINGS:
            metric = CHRF(**kw)
            assert_same(corpus_chrf(hyps, refs, **kw), metric.corpus_score(hyps, refs), metric, hyps, refs)
    assert corpus_chrf(["The cat sat."], [["The cat sat."]]).score == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], [["abc"]], word_order=2).score == 0.0
    assert corpus_chrf(["one two", "three"], [["one two", "three"], [None, "three four"]]).signature["nrefs"] == "var"


def test_chrf_plus_plus_words():
    """sacreBLEU issue #124 behaviour kept: one mark off the end, else off the start; one-char words stay."""
    assert chrpp_words("(hi) there, ...") == ["(hi", ")", "there", ",", "..", "."]
    assert chrpp_words("'quoted' ? a.b") == ["'quoted", "'", "?", "a.b"]
    assert chrpp_words("«x» ¿y") == ["«x»", "¿y"]  # ASCII punctuation only


def test_name_and_signature():
    r = corpus_chrf(["a b"], [["a b"], ["a c"]], word_order=2, lowercase=True)
    assert r.name == "chrF2++"
    assert r.signature == {"nrefs": 2, "case": "lc", "eff": "yes", "nc": 6, "nw": 2, "space": "no"}
    assert r.to_dict()["signature_str"] == "nrefs:2|case:lc|eff:yes|nc:6|nw:2|space:no"


def test_bad_input_is_one_line_error():
    with pytest.raises(LmforgeError, match=r"reference stream 1 has 1 segments but there are 2 hypotheses"):
        corpus_chrf(["a", "b"], [["a"]])
    with pytest.raises(LmforgeError, match="list of reference streams"):
        corpus_chrf(["a"], ["a"])
    with pytest.raises(LmforgeError, match="list of strings"):
        sentence_chrf("a", "a")
    with pytest.raises(LmforgeError, match="at least one n-gram order"):
        corpus_chrf(["a"], [["a"]], char_order=0, word_order=0)


def test_cli_helpers(tmp_path):
    hyps, refs = random_corpus(5, 3)
    (tmp_path / "hyp.txt").write_text("\n".join(h.rstrip() for h in hyps) + "\n", encoding="utf-8")
    names = []
    for k, stream in enumerate(refs):
        names.append(tmp_path / f"ref{k}.txt")
        names[-1].write_text("\n".join(r.rstrip() for r in stream) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    chrf.add_arguments(parser)
    argv = ["--hyp", str(tmp_path / "hyp.txt"), "--word-order", "2"] + [a for n in names for a in ("--ref", str(n))]
    result = chrf.run(parser.parse_args(argv))
    assert result == json.loads(json.dumps(result))
    assert set(result) == {"chrf", "name", "statistics", "signature", "signature_str"}
    theirs = CHRF(word_order=2).corpus_score(sacre_read(tmp_path / "hyp.txt"), [sacre_read(n) for n in names])
    assert abs(result["chrf"] - theirs.score) <= 1e-9 and result["name"] == "chrF2++"
    assert chrf.format_text(result) == theirs.format(width=2, signature=result["signature_str"])
    (tmp_path / "short.txt").write_text("a\n")
    with pytest.raises(LmforgeError, match=r"hyp.txt has 25 lines, .*short.txt has 1"):
        chrf.run(parser.parse_args(["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "short.txt")]))
