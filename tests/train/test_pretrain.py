"""`lmforge pretrain`: end to end on a tiny corpus, exact resume through the CLI, one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.common import LmforgeError
from lmforge.train.pretrain import main, parse_duration

EOT = "<|endoftext|>"
SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the old man", "a small bird"]
VERBS = ["sat on", "looked at", "ran to", "wrote about", "jumped over", "slept near"]
OBJECTS = ["the mat.", "a tree.", "the river.", "the house.", "a book.", "the hill."]


def sentences(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A directory of 12 small text files and a 300-id tokenizer trained on them."""
    from lmforge.tokenizer import save_tokenizer, train_bpe

    root = tmp_path_factory.mktemp("pretrain")
    data = root / "corpus"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i:02d}.txt").write_text(sentences(120, seed=i))
    tok = train_bpe(sorted(data.glob("*.txt")), vocab_size=300, special_tokens=[EOT])
    save_tokenizer(tok, root / "tok")
    return data, root / "tok"


def argv(corpus, out, *extra) -> list[str]:
    data, tok = corpus
    return ["--data", str(data), "--tokenizer", str(tok), "--depth", "1", "--out", str(out), "--seq-len", "32",
            "--batch-size", "8", "--lr", "3e-3", "--val-fraction", "0.2", "--log-every", "1", "--no-progress",
            *extra]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretrain_end_to_end(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(argv(corpus, run, "--max-steps", "40", "--eval-every", "20")) == 0
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "unigram baseline" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lmforge.json", "metrics.jsonl", "loss.png",
                 "trainer_state/state.json", "data/meta.json", "data/train.bin", "data/val.bin"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "lmforge.json").read_text())
    m = meta["metrics"]
    assert meta["stage"] == "pretrain" and meta["args"]["depth"] == 1 and m["step"] == 40
    assert m["val_perplexity"] < m["unigram_perplexity"]  # the model learned more than token frequencies
    assert m["val_bits_per_byte"] < m["unigram_bits_per_byte"]
    assert f"{m['val_perplexity']:.2f}" in out

    from lmforge.checkpoint import load_run
    from lmforge.eval.cli import main as eval_main
    from lmforge.tokenizer import load_tokenizer

    _, cfg = load_run(run)
    assert cfg.n_layers == 1 and cfg.vocab_size == 300
    assert cfg.eos_token_id == load_tokenizer(corpus[1]).special_tokens[EOT]
    # `lmforge eval perplexity` on the same validation split and window gives the training loop's number
    assert eval_main(["perplexity", "--model", str(run), "--data", str(run / "data"), "--seq-len", "32",
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(m["val_perplexity"], rel=1e-6)
    assert result["nll"] == pytest.approx(m["val_loss"], rel=1e-6)


def test_resume_through_the_cli_is_exact(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(argv(corpus, full, "--max-steps", "10", "--schedule-steps", "10")) == 0
    assert main(argv(corpus, part, "--max-steps", "5", "--schedule-steps", "10")) == 0
    assert sorted(losses(part)) == [1, 2, 3, 4, 5]
    assert main(["--out", str(part), "--resume", "--max-steps", "10", "--no-progress"]) == 0  # the rest is saved
    assert losses(part) == losses(full)
    final = [json.loads((d / "lmforge.json").read_text())["metrics"]["val_loss"] for d in (full, part)]
    assert final[0] == final[1]


def test_time_budget(corpus, tmp_path):
    assert main(argv(corpus, tmp_path / "run", "--time-budget", "2s", "--eval-every", "0")) == 0
    meta = json.loads((tmp_path / "run" / "lmforge.json").read_text())
    assert meta["metrics"]["step"] >= 1 and meta["args"]["time_budget"] == "2s"


def test_preset_takes_the_tokenizer_vocabulary(corpus, tmp_path):
    args = argv(corpus, tmp_path / "run", "--max-steps", "2", "--eval-every", "0", "--eval-tokens", "64")
    args[args.index("--depth"):args.index("--depth") + 2] = ["--preset", "llama-1m"]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 4 and config["vocab_size"] == 300
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400),
                                                ("45", 45), ("1.5m", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-3s", "0s"])
def test_parse_duration_rejects(text):
    with pytest.raises(LmforgeError, match="time-budget"):
        parse_duration(text)


# ---------------------------------------------------------------------------------------------- bad input

def test_unknown_preset(corpus, tmp_path):
    args = argv(corpus, tmp_path / "run", "--max-steps", "1")
    args[args.index("--depth"):args.index("--depth") + 2] = ["--preset", "llama-7t"]
    with pytest.raises(LmforgeError, match="unknown preset 'llama-7t'; choose one of llama-1m"):
        main(args)


def test_missing_options(corpus, tmp_path):
    with pytest.raises(LmforgeError, match="--max-steps N or --time-budget"):
        main(argv(corpus, tmp_path / "a"))
    with pytest.raises(LmforgeError, match="--data is required"):
        main(["--tokenizer", "x", "--depth", "1", "--out", str(tmp_path / "b"), "--max-steps", "1"])
    with pytest.raises(LmforgeError, match="bad --time-budget"):
        main(argv(corpus, tmp_path / "c", "--time-budget", "soon"))


def test_data_shorter_than_one_window(corpus, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat. " * 3)
    args = argv(corpus, tmp_path / "run", "--max-steps", "1")
    args[args.index("--data") + 1] = str(short)
    with pytest.raises(LmforgeError, match="shorter than one training window"):
        main(args)


def test_tokenizer_and_shards_vocab_mismatch(corpus, tmp_path):
    from lmforge.data import build_shards
    from lmforge.tokenizer import train_bpe

    big = train_bpe([sentences(400, seed=99)], vocab_size=320, special_tokens=[EOT])
    build_shards([corpus[0]], big, tmp_path / "shards", val_fraction=0.2, progress=False, log=None)
    args = argv(corpus, tmp_path / "run", "--max-steps", "1")
    args[args.index("--data") + 1] = str(tmp_path / "shards")  # prebuilt with a 320-id tokenizer
    with pytest.raises(LmforgeError, match="320 ids, but the model has only 300"):
        main(args)


def test_resume_errors(corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LmforgeError, match="--resume: no checkpoint in"):
        main(argv(corpus, run, "--max-steps", "2", "--resume"))
    assert main(argv(corpus, run, "--max-steps", "2")) == 0
    with pytest.raises(LmforgeError, match="already holds a run; continue it with --resume"):
        main(argv(corpus, run, "--max-steps", "2"))

    from lmforge.tokenizer import save_tokenizer, train_bpe

    other = train_bpe([sentences(300, seed=7)], vocab_size=280, special_tokens=[EOT])
    save_tokenizer(other, tmp_path / "other_tok")
    with pytest.raises(LmforgeError, match="tokenizer/model vocab mismatch"):
        main(["--out", str(run), "--resume", "--max-steps", "3", "--tokenizer", str(tmp_path / "other_tok")])

    (run / "trainer_state" / "state.json").write_text('{"format": 1, "step": ')
    with pytest.raises(LmforgeError, match="corrupt or mismatched checkpoint") as exc:
        main(["--out", str(run), "--resume", "--max-steps", "3", "--no-progress"])
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_ctrl_c_on_a_real_process_saves_and_exits_130(corpus, tmp_path):
    """A real SIGINT to `lmforge pretrain` in its own process: it finishes the step, saves, exits 130, resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    code = "import sys; from lmforge.train.pretrain import main; sys.exit(main(sys.argv[1:]))"
    args = argv(corpus, run, "--max-steps", "100000", "--eval-every", "0", "--save-every", "0")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = json.loads((run / "trainer_state" / "state.json").read_text())["step"]
    assert step >= 3
    assert main(["--out", str(run), "--resume", "--max-steps", str(step + 2), "--no-progress"]) == 0
    assert sorted(losses(run))[-1] == step + 2


def test_pretrain_arch_lab_end_to_end_and_resume(corpus, tmp_path):
    lab_cfg = '{"position": "alibi", "norm": "layernorm", "mlp": "geglu", "max_seq_len": 64}'
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["--arch", "lab", "--lab-config", lab_cfg, "--schedule-steps", "6", "--eval-every", "0"]
    assert main(argv(corpus, full, "--max-steps", "6", *extra)) == 0
    assert main(argv(corpus, part, "--max-steps", "3", *extra)) == 0
    assert main(["--out", str(part), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert losses(part) == losses(full)
    from lmforge.checkpoint import load_run
    from lmforge.model.lab import LabConfig

    _, cfg = load_run(full)
    assert isinstance(cfg, LabConfig) and (cfg.position, cfg.norm, cfg.mlp, cfg.max_seq_len) == (
        "alibi", "layernorm", "geglu", 64)
    assert cfg.vocab_size == 300 and cfg.n_layers == 1 and cfg.eos_token_id is not None
    meta = json.loads((full / "lmforge.json").read_text())
    assert meta["args"]["arch"] == "lab" and meta["metrics"]["val_perplexity"] > 0


@pytest.mark.parametrize("extra, match", [
    (["--lab-config", "{}"], "--lab-config needs --arch lab"),
    (["--arch", "lab", "--lab-config", "{bad"], "not valid JSON"),
    (["--arch", "lab", "--lab-config", "[1]"], "JSON object"),
    (["--arch", "lab", "--lab-config", '{"vocab_size": 9}'], "cannot set vocab_size"),
])
def test_lab_option_errors(corpus, tmp_path, extra, match):
    with pytest.raises(LmforgeError, match=match):
        main(argv(corpus, tmp_path / "run", "--max-steps", "1", *extra))


def test_lab_config_typo_is_an_error(corpus, tmp_path):
    with pytest.raises(LmforgeError, match="unknown LabConfig keys: postion"):
        main(argv(corpus, tmp_path / "run", "--max-steps", "1", "--arch", "lab", "--lab-config", '{"postion": "x"}'))
