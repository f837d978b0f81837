"""`lmforge tokenizer train|encode|decode|stats`: outputs, exit codes and one-line errors.

Most calls go through `lmforge.cli.main` in-process (fast, captured with capsys); a few real subprocesses
prove the exit codes and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.tokenizer import load_tokenizer

EOT = "<|endoftext|>"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Training a tokenizer needs a corpus of text.",
    "It's what they've said: we'll see, I'd guess.", "def square(x):\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { total += values[i]; }", "Numbers like 12345 and 3.14159 appear too.",
    "naïve café résumé", "Привет, мир!", "中文字符和标点符号。", "emoji 🤖 and 👍🏽 here",
]
TEXTS = ["hello world", "The lazy dog's tokenizer, trained on 12345 bytes!", "  indented\n\tcode = 1\r\n",
         "naïve café — Привет 中文 🤖", ""]


def _corpus_text(seed: int) -> str:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 6))) for _ in range(60)]
    return f"\n{EOT}\n".join(docs) + "\n"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main(["tokenizer", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def lm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True, timeout=120)


def assert_clean_error(rc: int, err: str, expect: str) -> None:
    """Exit code 2, exactly one error line (the last one on stderr), naming the problem, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    error_lines = [line for line in lines if "error:" in line]
    assert len(error_lines) == 1, err
    assert lines[-1] == error_lines[0]
    assert lines[-1].startswith("lmforge tokenizer: error: "), err
    assert expect in lines[-1], err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"part{i}.txt").write_text(_corpus_text(i), encoding="utf-8")
    (d / "sub").mkdir()
    (d / "sub" / "nested.txt").write_text(_corpus_text(10), encoding="utf-8")
    (d / "ignored.md").write_text("zzqqxx " * 500, encoding="utf-8")  # must not match --glob "*.txt"
    return d


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    rc = main(["tokenizer", "train", "--input", str(corpus), "--glob", "*.txt", "--vocab-size", "300",
               "--out", str(out), "--special", EOT])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("sample") / "sample.txt"
    f.write_text("\n".join(TEXTS) + _corpus_text(99) + f"tail {EOT} end\n", encoding="utf-8")
    return f


# ---------------------------------------------------------------------------------------------------- train


def test_train_writes_tokenizer_and_metadata(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "train", "--input", str(corpus), "--glob", "*.txt", "--vocab-size", "300",
                              "--out", str(out), "--special", EOT)
    assert rc == 0, err
    assert {"tokenizer.json", "tokenizer_config.json", "lmforge.json"} <= {p.name for p in out.iterdir()}
    assert "Traceback" not in err
    assert "training on 4 file(s)" in err  # 3 top-level + 1 nested .txt, not the .md
    assert stdout.startswith(f"wrote {out}/tokenizer.json: ")

    meta = json.loads((out / "lmforge.json").read_text())
    assert meta["stage"] == "tokenizer.train"
    args, metrics = meta["args"], meta["metrics"]
    assert args["vocab_size"] == 300
    assert args["glob"] == "*.txt"
    assert args["special"] == [EOT]
    assert args["pattern"] == "gpt4"
    assert args["input"] == [str(corpus)]
    txt_bytes = sum(p.stat().st_size for p in corpus.rglob("*.txt"))
    assert metrics["files"] == 4
    assert metrics["corpus_bytes"] == txt_bytes
    assert 257 < metrics["vocab_size"] <= 300
    assert metrics["merges"] == metrics["vocab_size"] - 256 - 1
    assert metrics["train_seconds"] >= 0

    loaded = load_tokenizer(out)
    assert loaded.vocab_size == metrics["vocab_size"]
    assert loaded.special_tokens == {EOT: loaded.vocab_size - 1}
    json.loads((out / "tokenizer_config.json").read_text())  # valid JSON


def test_train_on_explicit_files(corpus, tmp_path, capsys):
    files = sorted(str(p) for p in corpus.glob("part*.txt"))
    rc, _, err = run_cli(capsys, "train", "--input", *files, "--vocab-size", "280", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    meta = json.loads((tmp_path / "o" / "lmforge.json").read_text())
    assert meta["metrics"]["files"] == 3
    assert meta["args"]["special"] == []
    assert load_tokenizer(tmp_path / "o").vocab_size <= 280


# ---------------------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_encode_json_matches_library(tok_dir, tok, text, capsys):
    rc, out, err = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text, "--json")
    assert rc == 0, err
    assert out.count("\n") == 1
    ids = json.loads(out)
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text


def test_encode_plain_output_is_comma_separated(tok_dir, tok, capsys):
    rc, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", "hello world")
    assert rc == 0
    assert out == ",".join(map(str, tok.encode("hello world"))) + "\n"


def test_encode_file_equals_whole_file(tok_dir, tok, sample_file, capsys):
    rc, out, err = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--file", str(sample_file), "--json")
    assert rc == 0, err
    text = sample_file.read_bytes().decode("utf-8")
    ids = json.loads(out)
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.special_tokens[EOT] not in ids  # not allowed by default


def test_encode_file_non_utf8_encodes_raw_bytes(tok_dir, tok, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    data = "café crème\n".encode("latin-1") + b"\xff\xfe tail"
    f.write_bytes(data)
    rc, out, err = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--file", str(f), "--json")
    assert rc == 0, err
    ids = json.loads(out)
    assert ids == tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data


def test_allow_special(tok_dir, tok, capsys):
    eot_id = tok.special_tokens[EOT]
    text = f"end of doc{EOT}next"
    rc, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text, "--json")
    assert rc == 0
    plain = json.loads(out)
    assert eot_id not in plain
    assert tok.decode(plain) == text
    rc, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text, "--json", "--allow-special")
    assert rc == 0
    special = json.loads(out)
    assert special.count(eot_id) == 1
    assert special == tok.encode("end of doc") + [eot_id] + tok.encode("next")
    assert len(special) < len(plain)


# ---------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("form", ["comma", "json", "spaces"])
@pytest.mark.parametrize("text", ["hello world", "naïve café — Привет 中文 🤖\n\tx = 1"])
def test_decode_round_trips(tok_dir, tok, text, form, capsys):
    ids = tok.encode(text)
    spec = {"comma": ",".join(map(str, ids)), "json": json.dumps(ids), "spaces": " ".join(map(str, ids))}[form]
    rc, out, err = run_cli(capsys, "decode", "--tokenizer", str(tok_dir), "--ids", spec)
    assert rc == 0, err
    assert out == text + "\n"


def test_decode_special_id(tok_dir, tok, capsys):
    ids = tok.encode("a") + [tok.special_tokens[EOT]] + tok.encode("b")
    rc, out, _ = run_cli(capsys, "decode", "--tokenizer", str(tok_dir), "--ids", ",".join(map(str, ids)))
    assert rc == 0
    assert out == f"a{EOT}b\n"


def test_encode_decode_pipeline(tok_dir, capsys):
    text = "The quick brown fox, 12345 times."
    _, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text)
    rc, decoded, _ = run_cli(capsys, "decode", "--tokenizer", str(tok_dir), "--ids", out.strip())
    assert rc == 0
    assert decoded == text + "\n"


# ---------------------------------------------------------------------------------------------------- HF reference


def test_hf_tokenizers_agree_with_cli(tok_dir, tok, capsys):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size
    assert hf.token_to_id(EOT) == tok.special_tokens[EOT]
    for text in [t for t in TEXTS if t] + [SENTENCES[3] + SENTENCES[6]]:
        _, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text, "--json")
        assert json.loads(out) == hf.encode(text).ids, text
    # HF always splits added tokens out, which is what --allow-special does
    text = f"first doc{EOT}second doc"
    _, out, _ = run_cli(capsys, "encode", "--tokenizer", str(tok_dir), "--text", text, "--json", "--allow-special")
    assert json.loads(out) == hf.encode(text).ids


@pytest.mark.parametrize("pattern", ["", "[a-z]+"], ids=["empty", "letters-only"])
def test_custom_pattern_never_silently_drops_text(corpus, tmp_path, pattern, capsys):
    """A split pattern that cannot cover all text must be rejected, or the tokenizer must still be lossless.

    Either way, the tokenizer.json lmforge writes must encode the same way in HF `tokenizers`.
    """
    from tokenizers import Tokenizer

    out = tmp_path / "tok"
    rc, _, err = run_cli(capsys, "train", "--input", str(corpus), "--glob", "*.txt", "--vocab-size", "300",
                         "--out", str(out), "--pattern", pattern)
    if rc != 0:
        assert_clean_error(rc, err, "pattern")
        return
    text = "hello world, again!"
    rc, enc, _ = run_cli(capsys, "encode", "--tokenizer", str(out), "--text", text, "--json")
    assert rc == 0
    ids = json.loads(enc)
    rc, dec, _ = run_cli(capsys, "decode", "--tokenizer", str(out), "--ids", json.dumps(ids))
    assert rc == 0
    assert dec == text + "\n", f"pattern {pattern!r}: {text!r} encoded to {ids}, decoded to {dec!r}"
    assert ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids


# ---------------------------------------------------------------------------------------------------- stats


def test_stats_report_and_plot(tok_dir, tok, sample_file, tmp_path, capsys):
    png = tmp_path / "plots" / "lengths.png"
    rc, out, err = run_cli(capsys, "stats", "--tokenizer", str(tok_dir), "--file", str(sample_file),
                           "--plot", str(png))
    assert rc == 0, err
    n_tokens = len(tok.encode(sample_file.read_bytes().decode("utf-8")))
    lines = out.splitlines()
    tokens_line = next(line for line in lines if line.split()[:1] == ["tokens"])
    assert tokens_line.split()[-1] == f"{n_tokens:,}"
    assert any(line.startswith("bytes/token") for line in lines)
    assert any(line.startswith("vocab used") for line in lines)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
    assert f"wrote {png}" in err


def test_stats_json(tok_dir, tok, sample_file, capsys):
    rc, out, err = run_cli(capsys, "stats", "--tokenizer", str(tok_dir), "--file", str(sample_file), "--json")
    assert rc == 0, err
    stats = json.loads(out)
    text = sample_file.read_bytes().decode("utf-8")
    assert stats["n_bytes"] == len(text.encode("utf-8"))
    assert stats["n_tokens"] == len(tok.encode(text))
    assert stats["bytes_per_token"] == pytest.approx(stats["n_bytes"] / stats["n_tokens"])
    assert 1.0 < stats["bytes_per_token"] < 10.0
    assert stats["vocab_size"] == tok.vocab_size
    assert 0 < stats["vocab_used"] <= tok.vocab_size


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def paths(tmp_path, tok_dir, corpus) -> dict[str, str]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "tokenizer.json").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(512)))
    not_json = tmp_path / "not_json" / "tokenizer.json"
    not_json.parent.mkdir()
    not_json.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "truncated', encoding="utf-8")
    return {"{tok}": str(tok_dir), "{corpus}": str(corpus), "{empty}": str(empty), "{tmp}": str(tmp_path),
            "{bad}": str(bad_dir), "{badfile}": str(bad_dir / "tokenizer.json"), "{notjson}": str(not_json)}


ERRORS = {
    "empty-corpus": (["train", "--input", "{empty}", "--vocab-size", "300", "--out", "{tmp}/o"], "corpus is empty"),
    "missing-input": (["train", "--input", "{tmp}/nope", "--vocab-size", "300", "--out", "{tmp}/o"], "not found"),
    "glob-matches-nothing": (["train", "--input", "{corpus}", "--glob", "*.csv", "--vocab-size", "300",
                              "--out", "{tmp}/o"], "no files matching"),
    "vocab-too-small": (["train", "--input", "{corpus}", "--glob", "*.txt", "--vocab-size", "100",
                         "--out", "{tmp}/o"], "too small"),
    "vocab-too-small-for-specials": (["train", "--input", "{corpus}", "--vocab-size", "256", "--out", "{tmp}/o",
                                      "--special", EOT], "too small"),
    "bad-regex": (["train", "--input", "{corpus}", "--glob", "*.txt", "--vocab-size", "300", "--out", "{tmp}/o",
                   "--pattern", "(unclosed"], "invalid split pattern"),
    "empty-special": (["train", "--input", "{corpus}", "--vocab-size", "300", "--out", "{tmp}/o",
                       "--special", ""], "special tokens"),
    "missing-tokenizer": (["encode", "--tokenizer", "{tmp}/nope", "--text", "hi"], "not found"),
    "corrupt-tokenizer-dir": (["encode", "--tokenizer", "{bad}", "--text", "hi"], "corrupt"),
    "corrupt-tokenizer-file": (["decode", "--tokenizer", "{badfile}", "--ids", "1"], "corrupt"),
    "truncated-tokenizer-json": (["stats", "--tokenizer", "{notjson}", "--file", "{empty}"], "corrupt"),
    "id-out-of-range": (["decode", "--tokenizer", "{tok}", "--ids", "1,99999"], "out of range"),
    "negative-id": (["decode", "--tokenizer", "{tok}", "--ids", "[-1]"], "out of range"),
    "non-integer-ids": (["decode", "--tokenizer", "{tok}", "--ids", "a,b"], "--ids must be"),
    "float-ids": (["decode", "--tokenizer", "{tok}", "--ids", "[1.5]"], "--ids must be"),
    "bool-ids": (["decode", "--tokenizer", "{tok}", "--ids", "[true]"], "--ids must be"),
    "broken-json-ids": (["decode", "--tokenizer", "{tok}", "--ids", "[1,"], "--ids must be"),
    "stats-empty-file": (["stats", "--tokenizer", "{tok}", "--file", "{empty}"], "empty"),
    "stats-missing-file": (["stats", "--tokenizer", "{tok}", "--file", "{tmp}/nope.txt"], "not found"),
    "encode-missing-file": (["encode", "--tokenizer", "{tok}", "--file", "{tmp}/nope.txt"], "not found"),
    "encode-file-is-dir": (["encode", "--tokenizer", "{tok}", "--file", "{tmp}"], "not found"),
}


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in paths.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_error(case, paths, tmp_path, capsys):
    argv, expect = ERRORS[case]
    rc, out, err = run_cli(capsys, *_fill(argv, paths))
    assert_clean_error(rc, err, expect)
    if argv[0] != "train":  # train announces the corpus on stderr first; the others print only the error
        assert len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert not (tmp_path / "o" / "tokenizer.json").exists()  # a failed train writes nothing


USAGE_ERRORS = {
    "no-subcommand": [],
    "unknown-subcommand": ["frobnicate"],
    "train-missing-vocab": ["train", "--input", "x", "--out", "o"],
    "train-missing-input": ["train", "--vocab-size", "300", "--out", "o"],
    "train-vocab-not-int": ["train", "--input", "x", "--vocab-size", "big", "--out", "o"],
    "encode-no-source": ["encode", "--tokenizer", "t"],
    "encode-text-and-file": ["encode", "--tokenizer", "t", "--text", "a", "--file", "f"],
    "encode-missing-tokenizer": ["encode", "--text", "hi"],
    "decode-missing-ids": ["decode", "--tokenizer", "t"],
    "stats-missing-file": ["stats", "--tokenizer", "t"],
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2(case, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", *USAGE_ERRORS[case]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lmforge tokenizer" in err
    assert "error:" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------- help

HELP_OPTIONS = {
    "train": ["--input", "--glob", "--vocab-size", "--out", "--pattern", "--special", "--min-frequency", "--threads"],
    "encode": ["--tokenizer", "--text", "--file", "--json", "--allow-special"],
    "decode": ["--tokenizer", "--ids"],
    "stats": ["--tokenizer", "--file", "--plot", "--json"],
}


def test_tokenizer_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge tokenizer")
    for sub in HELP_OPTIONS:
        assert sub in out


@pytest.mark.parametrize("sub", list(HELP_OPTIONS))
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tokenizer", sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmforge tokenizer {sub}")
    for opt in HELP_OPTIONS[sub]:
        assert opt in out, opt


# ---------------------------------------------------------------------------------------------------- subprocess


def test_subprocess_train_encode_decode(corpus, tmp_path):
    out = tmp_path / "tok"
    r = lm("tokenizer", "train", "--input", str(corpus), "--glob", "*.txt", "--vocab-size", "300", "--out", str(out),
           "--special", EOT)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "tokenizer.json").is_file()
    text = "The lazy dog, naïve café 🤖"
    r = lm("tokenizer", "encode", "--tokenizer", str(out), "--text", text, "--json")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)
    assert ids == load_tokenizer(out).encode(text)
    r = lm("tokenizer", "decode", "--tokenizer", str(out), "--ids", json.dumps(ids))
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n"


@pytest.mark.parametrize("case", ["empty-corpus", "corrupt-tokenizer-dir", "id-out-of-range"])
def test_subprocess_errors_exit_2_without_traceback(case, paths):
    argv, expect = ERRORS[case]
    r = lm("tokenizer", *_fill(argv, paths))
    assert_clean_error(r.returncode, r.stderr, expect)
    assert r.stdout == ""


def test_subprocess_usage_error_exit_2():
    r = lm("tokenizer", "encode", "--text", "hi")
    assert r.returncode == 2
    assert "usage: lmforge tokenizer encode" in r.stderr
    assert "Traceback" not in r.stderr
