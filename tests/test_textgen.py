"""`lmforge generate`: a run directory (tiny random Llama + a tokenizer trained here) in, the continuation out.

Expected text is computed independently of textgen: our greedy / seeded ids from `infer.generate`, decoded with
the tokenizer, cut where the output should end (before the eos token, before a stop string).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import save_run
from lmforge.cli import main
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Llama, LlamaConfig
from lmforge.tokenizer import train_bpe

EOT = "<|endoftext|>"
CORPUS = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Many hands make light work. "
          f"{EOT}Look before you leap. Actions speak louder than words. Where there is smoke there is fire.{EOT}"
          "Better late than never. The early bird catches the worm. Practice makes perfect.") * 3
PROMPT = "The quick brown"
N = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe([CORPUS], vocab_size=300, special_tokens=[EOT])


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> Llama:
    """Random Llama (every matrix N(0, 1/fan_in), norm weights N(0, 1): varied greedy output, no near-ties).

    Byte tokens that are not printable ASCII get a zero output row and the rest a larger one, so the text the
    model writes is readable (and stop strings can be picked from it); they stay possible when sampling.
    """
    cfg = LlamaConfig(**{"vocab_size": vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "max_seq_len": 64, **kw})
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
        unreadable = [i for i in range(256) if not 32 <= i < 127]
        model.lm_head.weight.mul_(3)[unreadable] = 0
    return model.eval()


def expected_ids(model: Llama, tok, prompt: str = PROMPT, **params) -> list[int]:
    """The ids the CLI should show: our generate on the encoded prompt, cut before the eos token."""
    cfg = model.cfg
    ids = tok.encode(prompt)
    if cfg.bos_token_id is not None:
        ids = [cfg.bos_token_id, *ids]
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": N, **params})
    eos = {cfg.eos_token_id} if isinstance(cfg.eos_token_id, int) else set(cfg.eos_token_id or ())
    out = []
    for t in generate(model, ids, params):
        if t in eos:
            break
        out.append(t)
    return out


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    """(run dir, model): eos is the tokenizer's <|endoftext|>, as `lmforge pretrain` sets it."""
    model = tiny_model(tok.vocab_size, eos_token_id=tok.token_to_id(EOT))
    path = save_run(model, model.cfg, tmp_path_factory.mktemp("run"), tokenizer=tok)
    return str(path), model


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def greedy_cli(capsys, run_dir: str, *extra: str, prompt: str = PROMPT) -> str:
    code, out, err = cli(capsys, "--model", run_dir, "--prompt", prompt, "--temperature", "0",
                         "--max-new-tokens", str(N), *extra)
    assert code == 0, err
    assert err == ""
    assert out.endswith("\n")
    return out[:-1]


def assert_one_line_error(code: int, out: str, err: str, match: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lmforge generate: error: ")
    assert match in err, err


# --- output ---------------------------------------------------------------------------------------------------

def test_greedy_prints_only_the_continuation(run, tok, capsys):
    run_dir, model = run
    ids = expected_ids(model, tok)
    assert len(ids) == N and len(set(ids)) >= 4  # no eos, varied: the comparison means something
    text = greedy_cli(capsys, run_dir)
    assert text == tok.decode(ids)
    assert text.isascii() and text.isprintable()


def test_bos_is_prepended_when_the_tokenizer_adds_it(tok, tmp_path, capsys):
    """As HF's tokenizer: config.json's bos id alone adds nothing; tokenizer_config.json's add_bos_token does."""
    import json

    model = tiny_model(tok.vocab_size, seed=1, bos_token_id=tok.token_to_id(EOT))
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    ids = expected_ids(model, tok)
    without = list(generate(model, tok.encode(PROMPT), SamplingParams(temperature=0, max_new_tokens=N)))
    assert ids != without  # the bos token changes the continuation, so this test can tell
    assert greedy_cli(capsys, str(tmp_path)) == tok.decode(without)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "bos_token": EOT}))
    assert greedy_cli(capsys, str(tmp_path)) == tok.decode(ids)


def first_stop_candidate(text: str, start: int) -> int:
    """First i >= start where text[i:i+2] is two printable ASCII chars occurring nowhere before i."""
    for i in range(start, len(text) - 1):
        piece = text[i: i + 2]
        if piece.isascii() and piece.isprintable() and text.find(piece) == i:
            return i
    raise AssertionError(f"no stop string candidate in {text!r}")


def test_stop_string_and_what_follows_are_removed(run, tok, capsys):
    run_dir, model = run
    full = tok.decode(expected_ids(model, tok))
    i = first_stop_candidate(full, 3)
    stop = full[i: i + 2]
    text = greedy_cli(capsys, run_dir, "--stop", "never seen", "--stop", stop)
    assert text == full[:i]
    assert stop not in text
    # a stop string completed by the first token: nothing is printed
    assert greedy_cli(capsys, run_dir, "--stop", full[0]) == ""
    # a stop string that never occurs changes nothing
    assert greedy_cli(capsys, run_dir, "--stop", "\x00zz") == full
    # the text ends with the start of a stop string: held back while it might complete, printed at the end
    assert greedy_cli(capsys, run_dir, "--stop", full[-1] + "\x00") == full


def test_eos_ends_the_text_and_is_not_printed(tok, tmp_path, capsys):
    """Make the model emit <|endoftext|> after k tokens (swap its rows with the k-th greedy token's: the same model
    up to renaming two ids), then the CLI must print the k tokens and nothing of the eos token."""
    eot = tok.token_to_id(EOT)
    model = tiny_model(tok.vocab_size, seed=2)
    prompt_ids = tok.encode(PROMPT)
    out = expected_ids(model, tok)
    k = next(k for k in range(3, N) if out[k] not in out[:k] + prompt_ids)
    assert eot not in out + prompt_ids
    with torch.no_grad():
        for w in (model.embed_tokens.weight, model.lm_head.weight):
            w[[out[k], eot]] = w[[eot, out[k]]]
    swapped = list(generate(model, prompt_ids, SamplingParams(temperature=0, max_new_tokens=k + 1)))
    assert swapped == out[:k] + [eot]
    model.cfg.eos_token_id = eot
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    text = greedy_cli(capsys, str(tmp_path))
    assert EOT not in text
    assert text == tok.decode(out[:k])


def test_eos_list_in_config(run, tok, tmp_path, capsys):
    """config.json may hold a list of eos ids (Llama 3 does): each ends the text."""
    _, model = run
    out = expected_ids(model, tok)
    k = next(k for k in range(3, N) if out[k] not in out[:k])
    model = tiny_model(tok.vocab_size, eos_token_id=[tok.token_to_id(EOT), out[k]])
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    text = greedy_cli(capsys, str(tmp_path))
    assert text == tok.decode(out[:k])


def test_seed_makes_sampling_reproducible(run, tok, capsys):
    run_dir, model = run

    def sampled(seed: int) -> str:
        code, out, err = cli(capsys, "--model", run_dir, "--prompt", PROMPT, "--temperature", "1",
                             "--max-new-tokens", str(N), "--seed", str(seed))
        assert code == 0 and err == ""
        return out[:-1]

    a = sampled(5)
    assert a == sampled(5)
    assert a != sampled(6)
    assert a == tok.decode(expected_ids(model, tok, temperature=1.0, seed=5))
    assert a != tok.decode(expected_ids(model, tok))


@pytest.mark.parametrize("flags", [
    dict(temperature=0.5, seed=3), dict(temperature=1.0, top_k=3, seed=3), dict(temperature=1.0, top_p=0.5, seed=3),
    dict(temperature=1.0, min_p=0.3, seed=3), dict(temperature=0.0, repetition_penalty=3.0),
    dict(temperature=0.0, frequency_penalty=2.0), dict(temperature=0.0, presence_penalty=2.0),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_sampling_flag_reaches_the_sampler(run, tok, capsys, flags):
    run_dir, model = run
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    code, out, err = cli(capsys, "--model", run_dir, "--prompt", PROMPT, "--max-new-tokens", str(N), *argv)
    assert code == 0, err
    expected = expected_ids(model, tok, **flags)
    assert out[:-1] == tok.decode(expected)
    baseline = {"temperature": 1.0, "seed": 3} if flags.get("temperature") else {}
    assert expected != expected_ids(model, tok, **baseline), "the flag changes nothing here: pick another value"


def test_top_k_one_is_greedy(run, tok, capsys):
    run_dir, model = run
    code, out, _ = cli(capsys, "--model", run_dir, "--prompt", PROMPT, "--max-new-tokens", str(N), "--top-k", "1",
                       "--temperature", "2", "--seed", "1")
    assert code == 0
    assert out[:-1] == tok.decode(expected_ids(model, tok))


# --- errors ---------------------------------------------------------------------------------------------------

def test_missing_run_dir(tmp_path, capsys):
    assert_one_line_error(*cli(capsys, "--model", str(tmp_path / "nope"), "--prompt", "hi"), match="nope")


def test_tokenizer_larger_than_model_vocab(tok, tmp_path, capsys):
    model = tiny_model(tok.vocab_size - 10)
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    assert_one_line_error(*cli(capsys, "--model", str(tmp_path), "--prompt", "hi", "--temperature", "0"),
                          match=f"tokenizer has {tok.vocab_size} ids")


def test_run_without_tokenizer(tok, tmp_path, capsys):
    model = tiny_model(tok.vocab_size)
    save_run(model, model.cfg, tmp_path)
    assert_one_line_error(*cli(capsys, "--model", str(tmp_path), "--prompt", "hi"), match="tokenizer")


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "100"], "exceeds the model's context"),
    (["--prompt", ""], "at least one token"),
])
def test_bad_requests_are_one_line_errors(run, capsys, args, match):
    argv = ["--model", run[0], "--prompt", PROMPT, *args]  # a later --prompt overrides the first
    assert_one_line_error(*cli(capsys, *argv), match=match)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge generate")
    for flag in ("--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                 "--seed", "--stop"):
        assert flag in out


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi"])
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err


# --- a real process -------------------------------------------------------------------------------------------

def test_python_dash_m_lmforge_generate(run, tok):
    run_dir, model = run
    r = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", run_dir, "--prompt", PROMPT,
                        "--temperature", "0", "--max-new-tokens", str(N), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == tok.decode(expected_ids(model, tok)) + "\n"


def test_prompt_prefix_follows_the_tokenizer(tok, tmp_path):
    """BOS before a prompt only where HF's tokenizer would add it (post-processor template or add_bos_token)."""
    import json

    from lmforge.textgen import prompt_prefix

    tok.save(tmp_path)
    assert prompt_prefix(tmp_path, tok) == []  # our own tokenizer.json: ByteLevel post-processor, no BOS
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    bos = tok.encode(EOT, allowed_special="all")
    doc["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel"},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": EOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "special_tokens": {EOT: {"id": EOT, "ids": bos, "tokens": [EOT]}}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    assert prompt_prefix(tmp_path, tok) == bos


def test_generate_and_perplexity_cli_on_a_t5_run(tok, tmp_path, capsys):
    """`lmforge generate` runs an encoder-decoder on the prompt (+ </s>) as its input; `eval perplexity` scores
    text as the decoder's output for an empty input; chat refuses it."""
    import json
    import math

    from lmforge.cli import main as lmforge_main
    from lmforge.eval.perplexity import perplexity
    from lmforge.infer.seq2seq import generate_seq2seq_ids
    from lmforge.model.encdec import T5, T5Config

    torch.manual_seed(0)
    eot = tok.token_to_id(EOT)
    cfg = T5Config(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, eos_token_id=eot, pad_token_id=eot,
                   decoder_start_token_id=eot)
    model = T5(cfg).eval()
    save_run(model, cfg, tmp_path, tokenizer=tok)
    ids = tok.encode(PROMPT)
    want = generate_seq2seq_ids(model, [[*ids, eot]], SamplingParams(temperature=0, max_new_tokens=N),
                                eos_token_id=eot, decoder_start_token_id=eot)[0]
    want = want[:want.index(eot)] if eot in want else want
    assert greedy_cli(capsys, str(tmp_path)) == tok.decode(want)
    (tmp_path / "text.txt").write_text(CORPUS[:300])
    assert lmforge_main(["eval", "perplexity", "--model", str(tmp_path), "--data", str(tmp_path / "text.txt"),
                         "--json", "--seq-len", "32"]) == 0
    got = json.loads(capsys.readouterr().out)
    direct = perplexity(model, tok.encode(CORPUS[:300], allowed_special="all"), seq_len=32)
    assert math.isfinite(got["perplexity"]) and got["tokens"] > 0
    assert abs(got["nll"] - direct["nll"]) < 0.05  # the CLI joins documents with <|endoftext|>, otherwise the same
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert lmforge_main(["chat", "--model", str(tmp_path)]) == 2
    assert "encoder-decoder" in capsys.readouterr().err


def test_generate_cli_on_a_gpt2_run(tok, tmp_path, capsys):
    """`lmforge generate` on a GPT-2 run (load_run dispatches on model_type): the greedy ids of `generate`."""
    from lmforge.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=64,
                     eos_token_id=tok.token_to_id(EOT))
    model = GPT2(cfg).eval()
    save_run(model, cfg, tmp_path, tokenizer=tok)
    ids = list(generate(model, tok.encode(PROMPT), SamplingParams(temperature=0, max_new_tokens=N),
                        eos_token_id=cfg.eos_token_id))
    ids = ids[:ids.index(cfg.eos_token_id)] if cfg.eos_token_id in ids else ids
    assert greedy_cli(capsys, str(tmp_path)) == tok.decode(ids)
