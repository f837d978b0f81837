"""`lmforge chat`: a tiny random Llama with a ChatML template, driven through `chat_main` with fake stdin/stdout.

The prompt of every turn is recorded (a spy around `textgen.generate`) and compared with the rendered template's
encoding; the expected replies come from `infer.generate` directly, cut at the stop ids, then decoded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge import cli, textgen
from lmforge.checkpoint import save_run
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.textgen import chat_main
from lmforge.tokenizer import train_bpe
from lmforge.tokenizer.chat import ChatTemplate, save_chat_template
from tests.test_textgen import tiny_model

EOT, IM_START, IM_END, STOP = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|stop|>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ("system user assistant Hello there! How are you today? I am fine, thank you. Tell me a story. "
          "Once upon a time there was a fox. Be brief. ") * 20
N = 8
SYSTEM = "Be brief."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe([CORPUS], vocab_size=330, special_tokens=[EOT, IM_START, IM_END, STOP])


def make_run(path, tok, model):
    save_run(model, model.cfg, path, tokenizer=tok)  # tokenizer_config.json names eos_token <|endoftext|>
    save_chat_template(path, CHATML)
    return str(path)


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    model = tiny_model(tok.vocab_size, max_seq_len=256)
    return make_run(tmp_path_factory.mktemp("chat"), tok, model), model


def encode(tok, messages) -> list[int]:
    """What the model must see: the rendered template, its special tokens as control tokens, no bos added."""
    return tok.encode(ChatTemplate(CHATML).render(messages, add_generation_prompt=True), allowed_special="all")


def stop_ids(tok, model) -> set[int]:
    eos = model.cfg.eos_token_id
    return {tok.token_to_id(IM_END), tok.token_to_id(EOT)} | ({eos} if isinstance(eos, int) else set(eos or ()))


def greedy_ids(tok, model, ids, n=N, **params) -> list[int]:
    out = []
    for t in generate(model, ids, SamplingParams(**{"temperature": 0.0, "max_new_tokens": n, **params})):
        if t in stop_ids(tok, model):
            break
        out.append(t)
    return out


class Chat:
    """Run chat_main on lines of input; record the prompt ids and params of every generate call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[list[int], SamplingParams]] = []
        real = textgen.generate

        def spy(model, ids, params=None, **kw):
            self.calls.append((list(ids), params))
            yield from real(model, ids, params, **kw)

        monkeypatch.setattr(textgen, "generate", spy)

    def __call__(self, run_dir: str, lines: list[str], *flags: str, stdout=None) -> tuple[int, str]:
        stdout = stdout or io.StringIO()
        stdin = io.StringIO("".join(line + "\n" for line in lines))
        code = chat_main(["--model", run_dir, "--temperature", "0", "--max-new-tokens", str(N), *flags],
                         stdin=stdin, stdout=stdout)
        return code, stdout.getvalue()

    @property
    def prompts(self) -> list[list[int]]:
        return [ids for ids, _ in self.calls]


@pytest.fixture
def chat(monkeypatch):
    return Chat(monkeypatch)


# --- the conversation -----------------------------------------------------------------------------------------

def test_prompt_is_the_rendered_template_and_history_accumulates(run, tok, chat):
    run_dir, model = run
    code, out = chat(run_dir, ["Hello there!", "Tell me a story."], "--system", SYSTEM)
    assert code == 0
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there!"}]
    assert chat.prompts[0] == encode(tok, history)
    first = greedy_ids(tok, model, chat.prompts[0])
    assert len(first) >= 4 and len(set(first)) >= 3  # a real reply, so the history check below means something
    reply1 = tok.decode(first)
    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Tell me a story."}]
    assert chat.prompts[1] == encode(tok, history)
    assert chat.prompts[1][:len(chat.prompts[0])] == chat.prompts[0]  # the first turn is a prefix of the second
    reply2 = tok.decode(greedy_ids(tok, model, chat.prompts[1]))
    assert out == reply1 + "\n" + reply2 + "\n"


def test_reset_clears_history_but_keeps_the_system_prompt(run, tok, chat):
    run_dir, _ = run
    code, out = chat(run_dir, ["Hello there!", "/reset", "Hello there!"], "--system", SYSTEM)
    assert code == 0
    assert len(chat.prompts) == 2 and chat.prompts[0] == chat.prompts[1]
    first, second = out.split("\n")[:2]
    assert first == second
    assert chat.prompts[0] == encode(tok, [{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": "Hello there!"}])


@pytest.mark.parametrize("lines, n_turns", [
    (["Hi", "/exit", "never read"], 1), (["Hi", "  /quit  ", "never read"], 1), (["Hi", "", "/help"], 1), ([], 0),
])
def test_exit_eof_and_blank_lines(run, chat, lines, n_turns):
    code, out = chat(run[0], lines)
    assert code == 0
    assert len(chat.prompts) == n_turns
    if "/help" in lines:
        assert out.endswith("/reset clears the conversation, /exit (or end of input) quits, /help shows this\n")


def test_user_text_cannot_inject_control_tokens(run, tok, chat):
    run_dir, _ = run
    chat(run_dir, [f"Hi{IM_END}\n"[:-1]])
    im_end = tok.token_to_id(IM_END)
    rendered = encode(tok, [{"role": "user", "content": f"Hi{IM_END}"}])
    assert chat.prompts[0].count(im_end) == rendered.count(im_end) - 1  # only the template's own marker
    assert tok.decode(chat.prompts[0]) == tok.decode(rendered)


# --- where a reply ends ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop, where", [(IM_END, "template"), (EOT, "tokenizer_config"), (STOP, "config.json")])
def test_reply_ends_at_each_stop_token_unprinted(tok, tmp_path, chat, stop, where):
    """Make the model emit `stop` at step k: swap its output row with that of the k-th greedy token (the prompt is
    read exactly as before, and the logits are the same up to renaming those two ids)."""
    stop_id = tok.token_to_id(stop)
    model = tiny_model(tok.vocab_size, max_seq_len=256, eos_token_id=stop_id if where == "config.json" else None)
    prompt = encode(tok, [{"role": "user", "content": "Hello there!"}])
    out = list(generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=N)))
    specials = {tok.token_to_id(s) for s in (EOT, IM_START, IM_END, STOP)}
    k = next(k for k in range(3, N) if out[k] not in out[:k] and not specials & set(out[:k + 1]))
    with torch.no_grad():
        model.lm_head.weight[[out[k], stop_id]] = model.lm_head.weight[[stop_id, out[k]]]
    assert list(generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=k + 1))) == out[:k] + [stop_id]
    run_dir = make_run(tmp_path, tok, model)
    code, text = chat(run_dir, ["Hello there!", "Thanks"])
    assert code == 0
    reply = tok.decode(out[:k])
    assert text.split("\n")[0] == reply and stop not in text
    assert stop_id in chat.calls[0][1].stop_token_ids or where == "config.json"
    # the template closes the reply with its own <|im_end|>: the stop token is not doubled in the history
    assert chat.prompts[1] == encode(tok, [{"role": "user", "content": "Hello there!"},
                                           {"role": "assistant", "content": reply},
                                           {"role": "user", "content": "Thanks"}])


def test_sampling_flags_and_a_seed_per_turn(run, tok, chat):
    run_dir, model = run
    code, out = chat(run_dir, ["Hello there!", "/reset", "Hello there!", "Again"], "--temperature", "1",
                     "--top-k", "5", "--seed", "7")
    assert code == 0
    seeds = [params.seed for _, params in chat.calls]
    assert seeds == [7, 7, 8]  # turn k of a conversation samples with seed + k; /reset starts again
    assert all(p.top_k == 5 and p.temperature == 1.0 and p.max_new_tokens == N for _, p in chat.calls)
    first = tok.decode(greedy_ids(tok, model, chat.prompts[0], temperature=1.0, top_k=5, seed=7))
    lines = out.split("\n")
    assert lines[0] == lines[1] == first


def test_ctrl_c_stops_the_reply_and_keeps_what_was_shown(run, tok, chat):
    class InterruptAfterOneChunk(io.StringIO):
        """Ctrl-C arrives while the second chunk of the first reply is being shown."""
        chunks = 0

        def write(self, s):
            self.chunks += 1
            if self.chunks == 2:
                raise KeyboardInterrupt
            return super().write(s)

    stdout = InterruptAfterOneChunk()
    code, out = chat(run[0], ["Hello there!", "Again"], stdout=stdout)
    assert code == 0
    shown = out.split(" [stopped]")[0]
    assert shown and len(chat.prompts) == 2
    assert chat.prompts[1] == encode(tok, [{"role": "user", "content": "Hello there!"},
                                           {"role": "assistant", "content": shown},
                                           {"role": "user", "content": "Again"}])


# --- errors ---------------------------------------------------------------------------------------------------

def test_a_turn_that_overflows_the_context_is_skipped(tok, tmp_path, chat, capsys):
    model = tiny_model(tok.vocab_size, max_seq_len=48)
    run_dir = make_run(tmp_path, tok, model)
    code, out = chat(run_dir, ["Tell me a story. " * 10, "Hi"])
    assert code == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "fills the model's context (48)" in err
    assert chat.prompts == [encode(tok, [{"role": "user", "content": "Hi"}])]  # the long message was dropped
    assert len(out.splitlines()) == 1


def test_replies_are_clamped_to_the_context_left(tok, tmp_path, chat):
    model = tiny_model(tok.vocab_size, max_seq_len=40)
    run_dir = make_run(tmp_path, tok, model)
    chat(run_dir, ["Hello there!"], "--max-new-tokens", "500")
    assert chat.calls[0][1].max_new_tokens == 40 - len(chat.prompts[0])


def test_run_without_chat_template(tok, tmp_path):
    model = tiny_model(tok.vocab_size)
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    with pytest.raises(LmforgeError, match="has no chat template") as e:
        chat_main(["--model", str(tmp_path)], stdin=io.StringIO("Hi\n"), stdout=io.StringIO())
    assert "\n" not in str(e.value)


def test_bad_flag_value(run):
    with pytest.raises(LmforgeError, match="temperature"):
        chat_main(["--model", run[0], "--temperature", "-1"], stdin=io.StringIO(), stdout=io.StringIO())


def test_template_in_tokenizer_config_only(tok, tmp_path, chat):
    model = tiny_model(tok.vocab_size, max_seq_len=256)
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    code, _ = chat(str(tmp_path), ["Hello there!"])
    assert code == 0 and chat.prompts[0] == encode(tok, [{"role": "user", "content": "Hello there!"}])


# --- through `lmforge chat` (once cli.STAGES dispatches "chat" to chat_main) ----------------------------------

wired = pytest.mark.skipif("chat" not in cli.STAGES, reason="lmforge.cli does not dispatch `chat` yet")


@wired
def test_cli_no_template_is_a_one_line_error_exit_2(tok, tmp_path, capsys):
    model = tiny_model(tok.vocab_size)
    save_run(model, model.cfg, tmp_path, tokenizer=tok)
    assert cli.main(["chat", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge chat: error: ") and "has no chat template" in err and len(err.splitlines()) == 1


@wired
def test_python_dash_m_lmforge_chat(run, tok):
    run_dir, model = run
    r = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--model", run_dir, "--temperature", "0",
                        "--max-new-tokens", str(N), "--device", "cpu"], input="Hello there!\n/exit\n",
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    prompt = encode(tok, [{"role": "user", "content": "Hello there!"}])
    assert r.stdout == tok.decode(greedy_ids(tok, model, prompt)) + "\n"
