"""BLEU: parity with sacreBLEU (scores to 1e-9, every statistic equal, signature fields equal) on generated
corpora and hand-written cases; the tokenizers against sacreBLEU's on Hypothesis text; line reading as
sacreBLEU's command line reads files; bad input; the CLI helper."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_char import TokenizerChar
from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
from sacrebleu.utils import smart_open

from lmforge.common import LmforgeError
from lmforge.eval import bleu
from lmforge.eval.bleu import TOKENIZERS, corpus_bleu, format_signature, sentence_bleu
from lmforge.eval.textfiles import read_hyp_refs, read_lines

logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # "enable effective_order for sentence BLEU" noise

# Words chosen to hit every tokenizer rule: ASCII punctuation next to digits and letters, HTML escapes,
# <skipped>, Unicode punctuation and symbols, CJK (and the zh tokenizer's odd U+2001..U+2A6D range),
# case folding that changes length (İ), fullwidth forms, emoji, non-breaking and ideographic spaces.
WORDS = (
    "the The THE cat cats sat on a mat dog runs quickly Straße STRASSE İstanbul ÉCOLE naïve Ωμέγα σοφία "
    "東京 你好 世界 中文 汉字 ｆｕｌｌ 😀 👍🏽 3.14 1,000 2-3 10- x-ray U.S. don't (hi) \"quoted\" &amp; &quot;x&quot; "
    "&lt;tag&gt; <skipped> e.g., end. ... -- – — a/b $5 100% #1 @you ? ! , . ; : ' ` ~ ^ | \\ { } [ ] "
    "« » ¿ ¡ § © ° ± × ÷ € ∑ → ≠ … ‘ ’ “ ” 、 。 ・ ا مرحبا नमस्ते 0 42 1984. 3,5 x.y a,b a.5 5.a"
).split()
SPACES = [" "] * 8 + ["  ", "\t", "\u00a0", "\u3000", "\u2009", "\u200b"]


def random_text(rng: random.Random, words: list[str]) -> str:
    text = "".join(w + rng.choice(SPACES) for w in words)
    return (" " if rng.random() < 0.1 else "") + (text if rng.random() < 0.2 else text.rstrip())


def mutate(rng: random.Random, words: list[str]) -> list[str]:
    """A variant sharing many n-grams with `words`: some dropped, replaced, inserted or swapped."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1:
            continue
        out.append(rng.choice(WORDS) if r < 0.25 else w.upper() if r < 0.3 else w)
        if rng.random() < 0.08:
            out.append(rng.choice(WORDS))
    if len(out) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def random_corpus(seed: int, n_refs: int, n_segments: int = 25) -> tuple[list[str], list[list[str]]]:
    """Hypotheses and `n_refs` reference streams: related sentences, empty lines, one-word lines."""
    rng = random.Random(seed)
    hyps, refs = [], [[] for _ in range(n_refs)]
    for _ in range(n_segments):
        base = [rng.choice(WORDS) for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 12, 20]))]
        hyps.append("" if rng.random() < 0.08 else random_text(rng, mutate(rng, base)))
        for stream in refs:
            stream.append("" if rng.random() < 0.05 else random_text(rng, mutate(rng, base)))
    return hyps, refs


def sacre_signature(metric) -> dict:
    return {k: v for k, v in metric.get_signature().info.items() if k not in ("version", "bs", "ar", "seed")
            and v is not None}


def assert_same(ours, theirs, metric, smooth_method="exp", smooth_value=None, signature=None):
    """Score to 1e-9, every statistic equal, signature fields equal (to sacreBLEU's unless given)."""
    assert abs(ours.score - theirs.score) <= 1e-9
    assert ours.precisions == pytest.approx(theirs.precisions, abs=1e-9, rel=0)
    assert (ours.bp, ours.sys_len, ours.ref_len) == (theirs.bp, theirs.sys_len, theirs.ref_len)
    assert ours.ratio == theirs.ratio
    k = (bleu.SMOOTH_DEFAULTS["add-k"] if smooth_value is None else smooth_value) if smooth_method == "add-k" else 0
    added = [0] + [k] * (len(ours.counts) - 1) if any(ours.counts) else [0] * len(ours.counts)
    # sacreBLEU reports add-k's counts with k already added (until the first order without n-grams)
    assert [c + a for c, a in zip(ours.counts, added)] == theirs.counts
    assert [t + a for t, a in zip(ours.totals, added)] == theirs.totals
    assert ours.signature == (sacre_signature(metric) if signature is None else signature)


SETTINGS = [dict(tokenize=t, lowercase=lc, smooth_method=s, effective_order=e)
            for t, lc, s, e in itertools.product(TOKENIZERS, [False, True], bleu.SMOOTH_DEFAULTS, [False, True])]


@pytest.mark.parametrize("n_refs", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_corpus_bleu_matches_sacrebleu(seed, n_refs):
    hyps, refs = random_corpus(seed * 10 + n_refs, n_refs)
    for kw in SETTINGS:
        metric = BLEU(**kw)
        assert_same(corpus_bleu(hyps, refs, **kw), metric.corpus_score(hyps, refs), metric, kw["smooth_method"])


@pytest.mark.parametrize("n_refs", [1, 3])
def test_sentence_bleu_matches_sacrebleu(n_refs):
    hyps, refs = random_corpus(100 + n_refs, n_refs, n_segments=12)
    for kw in SETTINGS[::3]:
        for hyp, *seg_refs in zip(hyps, *refs):
            metric = BLEU(**kw)
            assert_same(sentence_bleu(hyp, seg_refs, **kw), metric.sentence_score(hyp, seg_refs), metric,
                        kw["smooth_method"])


def test_sentence_bleu_defaults_are_sacrebleus():
    """sacrebleu.sentence_bleu: exp smoothing, effective order on; corpus: effective order off."""
    import sacrebleu

    hyp, refs = "a cat sat on the mat", ["the cat sat on a mat", "a cat is on the mat"]
    assert sentence_bleu(hyp, refs).score == sacrebleu.sentence_bleu(hyp, refs).score
    assert sentence_bleu(hyp, refs).signature["eff"] == "yes"
    assert corpus_bleu([hyp], [[r] for r in refs]).score == sacrebleu.corpus_bleu([hyp], [[r] for r in refs]).score


@pytest.mark.parametrize("smooth_method,smooth_value,max_order", [("floor", 0.3, 4), ("add-k", 2, 4),
                                                                   ("add-k", 0.5, 3), ("exp", None, 2),
                                                                   ("none", None, 6)])
def test_smoothing_values_and_orders(smooth_method, smooth_value, max_order):
    hyps, refs = random_corpus(7, 2)
    kw = dict(smooth_method=smooth_method, smooth_value=smooth_value, max_ngram_order=max_order)
    for eff in (False, True):
        metric = BLEU(effective_order=eff, **kw)
        theirs = metric.corpus_score(hyps, refs)
        signature = sacre_signature(metric)
        if max_order != 4:
            signature["order"] = max_order  # ours records a non-default N; sacreBLEU's signature does not
        assert_same(corpus_bleu(hyps, refs, effective_order=eff, **kw), theirs, metric, smooth_method, smooth_value,
                    signature)
        for hyp, ref in zip(hyps, refs[0]):
            metric = BLEU(effective_order=eff, **kw)
            assert_same(sentence_bleu(hyp, [ref], effective_order=eff, **kw), metric.sentence_score(hyp, [ref]),
                        metric, smooth_method, smooth_value, {**signature, "nrefs": 1})


def test_hand_computed_example():
    """Papineni et al.'s definition by hand: p = 5/6, 3/5, 1/4, 0/3 (exp-smoothed to 1/(2*3)), c = 6, r = 6."""
    r = sentence_bleu("the cat sat on the mat", ["the cat is on the mat"], effective_order=False)
    assert (r.counts, r.totals, r.sys_len, r.ref_len, r.bp) == ([5, 3, 1, 0], [6, 5, 4, 3], 6, 6, 1.0)
    logs = [math.log(100 * p) for p in (5 / 6, 3 / 5, 1 / 4, 1 / 6)]
    assert r.score == pytest.approx(math.exp(sum(logs) / 4), abs=1e-12)
    short = corpus_bleu(["the cat"], [["the cat is on the mat"]])
    assert short.bp == pytest.approx(math.exp(1 - 6 / 2)) and short.score == 0.0  # no 3-grams, no eff. order
    assert sentence_bleu("the cat", ["the cat is on the mat"]).score == pytest.approx(100 * math.exp(1 - 3))


def test_edge_cases_match_sacrebleu():
    cases = [
        ([""], [[""]]),  # everything empty
        (["", ""], [["a b c", "d"]]),  # all-empty hypotheses
        (["a b c", "d e"], [["", ""]]),  # empty references
        (["a b c"], [["a b c"]]),  # one perfect sentence
        (["x y z"], [["a b c"]]),  # no unigram match at all
        (["a b c d e f"], [["a b c d e f g h"], ["a b c d"]]),  # closest length: tie 8 vs 4 -> shorter
        (["a b c d e"], [["a b c d e f g"], ["a b c"]]),  # tie across streams
        (["a a a a the"], [["a the cat"], ["a a the"]]),  # clipping by the max count in one reference
        (["one"], [["one"], [""]]),  # an empty reference is a real reference of length 0
    ]
    for hyps, refs in cases:
        for kw in SETTINGS[:16]:
            metric = BLEU(**kw)
            assert_same(corpus_bleu(hyps, refs, **kw), metric.corpus_score(hyps, refs), metric, kw["smooth_method"])
    assert corpus_bleu(["a b c d"], [["a b c d"]]).score == pytest.approx(100.0)
    assert corpus_bleu(["a b c"], [["a b c"]]).score == 0.0  # no 4-grams: corpus BLEU needs effective order
    assert sentence_bleu("a b c", ["a b c"]).score == pytest.approx(100.0)
    all_empty = corpus_bleu(["", ""], [["a b", "c"]])
    assert (all_empty.score, all_empty.bp, all_empty.sys_len, all_empty.ref_len) == (0.0, 0.0, 0, 3)


def test_none_reference_means_variable_count():
    hyps = ["a b c d", "e f g"]
    refs = [["a b c d", "e f"], [None, "e f g"]]
    metric = BLEU()
    ours = corpus_bleu(hyps, refs)
    assert_same(ours, metric.corpus_score(hyps, refs), metric)
    assert ours.signature["nrefs"] == "var"
    assert sentence_bleu("a b", ["a b", None]).signature["nrefs"] == 1


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_tokenizers_match_sacrebleu_on_any_text(text):
    theirs = {"13a": Tokenizer13a(), "intl": TokenizerV14International(), "zh": TokenizerZh(),
              "char": TokenizerChar()}
    for name, tok in theirs.items():
        assert TOKENIZERS[name](text).split() == tok(text).split(), name


def test_tokenizers_on_rule_triggers():
    samples = ["Hello, world. 3.14 1,000.5 2-3 a-b x- -y.", "&amp;lt; &quot;hi&quot; <skipped>ok-\nnext\nline",
               "...,,.. .5 5. ,5 5, (a) [b] {c} $1 100% a/b @x #y ~z ^w |v \\u `t",
               "中文，测试。ＡＢＣ１２３ – — … ‘x’",
               "1984. «Ça» ¿qué? ¡sí! €5 ±3 ∑x → y", " .leading", "trailing. "]
    toks = {"13a": Tokenizer13a(), "intl": TokenizerV14International(), "zh": TokenizerZh(), "char": TokenizerChar()}
    for text in samples:
        for name, tok in toks.items():
            assert TOKENIZERS[name](text).split() == tok(text).split(), (name, text)
    assert TOKENIZERS["13a"]("Hello, world.") == "Hello , world ."


def test_zh_character_table_matches_sacrebleu():
    """Including its quirk: U+2001..U+2A6D are split as Chinese, CJK Extension B (U+20000...) is not."""
    is_chinese = TokenizerZh._is_chinese_char.__wrapped__
    for cp in [*range(0x30000), 0x2A6D6, 0x2FA1D, 0x10FFFF]:
        ch = chr(cp)
        assert bool(bleu._ZH_CHAR.match(ch)) == bool(is_chinese(ch)), hex(cp)


def test_bad_input_is_one_line_error():
    with pytest.raises(LmforgeError, match=r"reference stream 1 has 3 segments but there are 2 hypotheses"):
        corpus_bleu(["a", "b"], [["a", "b", "c"]])
    with pytest.raises(LmforgeError, match=r"reference stream 2 has 1 segments but there are 2"):
        corpus_bleu(["a", "b"], [["a", "b"], ["a"]])
    with pytest.raises(LmforgeError, match="list of reference streams"):
        corpus_bleu(["a", "b"], ["a", "b"])  # a bare stream: sacreBLEU would read each string as a stream
    with pytest.raises(LmforgeError, match="list of strings"):
        sentence_bleu("a", "a")
    with pytest.raises(LmforgeError, match="non-empty"):
        corpus_bleu([], [[]])
    with pytest.raises(LmforgeError, match="segment 1 has no reference"):
        corpus_bleu(["a", "b"], [["a", None]])
    with pytest.raises(LmforgeError, match="unknown BLEU tokenizer 'ja-mecab'"):
        corpus_bleu(["a"], [["a"]], tokenize="ja-mecab")
    with pytest.raises(LmforgeError, match="unknown BLEU smoothing"):
        corpus_bleu(["a"], [["a"]], smooth_method="add-one")
    with pytest.raises(LmforgeError, match="non-empty list of strings") as e:
        sentence_bleu("a", [])
    assert "\n" not in str(e.value)


# --- files and the command line ------------------------------------------------------------------------------


def sacre_read(path) -> list[str]:
    """What sacreBLEU's command line reads from a file (sacrebleu.py: smart_open, then line.rstrip())."""
    with smart_open(str(path)) as f:
        return [line.rstrip() for line in f]


@pytest.mark.parametrize("data", [b"a b\nc d\n", b"a b\nc d", b"a\r\nb\r\n", b"a\rb\nc\n", b"x\xe2\x80\xa8y\n\x0cz\n",
                                  b"", b"\n", b"\n\n", b"a  \t\n  b\n\n", "é 中\n".encode(), b"last   "])
def test_read_lines_like_sacrebleu(tmp_path, data):
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    assert read_lines(path) == sacre_read(path)
    gz = tmp_path / "f.txt.gz"
    gz.write_bytes(gzip.compress(data))
    assert read_lines(gz) == sacre_read(gz)


def test_read_lines_drops_bom_and_refuses_bad_utf8(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello world\nagain\n".encode())
    assert read_lines(path) == ["Hello world", "again"]  # sacreBLEU would keep "\ufeffHello"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(LmforgeError, match=r"bom.txt is not valid UTF-8 \(byte 3"):
        read_lines(path)
    with pytest.raises(LmforgeError, match="file not found"):
        read_lines(tmp_path / "missing.txt")


def test_read_hyp_refs_names_both_files_and_counts(tmp_path):
    (tmp_path / "hyp.txt").write_text("a\nb\nc\n")
    (tmp_path / "ref1.txt").write_text("a\nb\nc\n")
    (tmp_path / "ref2.txt").write_text("a\nb\n")
    with pytest.raises(LmforgeError) as e:
        read_hyp_refs(tmp_path / "hyp.txt", [tmp_path / "ref1.txt", tmp_path / "ref2.txt"])
    msg = str(e.value)
    assert "hyp.txt has 3 lines" in msg and "ref2.txt has 2" in msg and "\n" not in msg
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match="empty"):
        read_hyp_refs(tmp_path / "empty.txt", [tmp_path / "empty.txt"])


def test_cli_helpers(tmp_path):
    hyps, refs = random_corpus(3, 2)
    (tmp_path / "hyp.txt").write_text("\n".join(h.rstrip() for h in hyps) + "\n", encoding="utf-8")
    for k, stream in enumerate(refs):
        (tmp_path / f"ref{k}.txt").write_text("\n".join(r.rstrip() for r in stream) + "\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    bleu.add_arguments(parser)
    args = parser.parse_args(["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref0.txt"),
                              "--ref", str(tmp_path / "ref1.txt"), "--tokenize", "intl", "--smooth-method", "floor",
                              "--json"])
    result = bleu.run(args)
    assert args.json
    expected = corpus_bleu([h.rstrip() for h in hyps], [[r.rstrip() for r in s] for s in refs], tokenize="intl",
                           smooth_method="floor")
    assert result == json.loads(json.dumps(result)) == expected.to_dict()
    assert set(result) == {"bleu", "counts", "totals", "precisions", "bp", "ratio", "sys_len", "ref_len",
                           "signature", "signature_str"}
    assert result["signature_str"] == "nrefs:2|case:mixed|eff:no|tok:intl|smooth:floor[0.10]"
    theirs = BLEU(tokenize="intl", smooth_method="floor").corpus_score(sacre_read(tmp_path / "hyp.txt"),
                                                                       [sacre_read(tmp_path / f"ref{k}.txt")
                                                                        for k in range(2)])
    assert abs(result["bleu"] - theirs.score) <= 1e-9
    assert bleu.format_text(result) == theirs.format(width=2, signature=result["signature_str"])
    assert format_signature({"a": 1, "b": "x"}) == "a:1|b:x"
