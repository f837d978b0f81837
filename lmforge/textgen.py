"""Text in, text out: `lmforge generate` loads a run directory (model + tokenizer) and streams a continuation.

This is the one place that joins the tokenizer to `infer` (which sees only ids, logits and the vocabulary
as bytes). `lmforge chat` (`chat_main`) lives here too: a streaming REPL over the model's own chat template.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from lmforge.checkpoint.run import load_run
from lmforge.common import LmforgeError, pick_device
from lmforge.infer.generate import eos_ids, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.seq2seq import generate_seq2seq
from lmforge.infer.stopping import StopChecker, Utf8Stream
from lmforge.tokenizer import BPETokenizer, load_tokenizer
from lmforge.tokenizer.chat import ChatTemplate, encode_chat, end_of_turn_token, load_chat_template


def load_for_generation(run: str | Path, device: str | None = None) -> tuple[torch.nn.Module, BPETokenizer]:
    """Model (eval mode) and tokenizer of a run directory, checked against each other."""
    model, cfg = load_run(run, device=pick_device(device))
    tok = load_tokenizer(run)
    if tok.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tok.vocab_size} ids but the model embeds only {cfg.vocab_size}")
    return model.eval(), tok


def prompt_prefix(run: str | Path, tok: BPETokenizer) -> list[int]:
    """The ids HF's tokenizer puts before a prompt, so `generate` sees what transformers would feed the model.

    From tokenizer.json's post-processor (a TemplateProcessing's special tokens before `$A`, as Llama 3's
    `<|begin_of_text|>`), else tokenizer_config.json's `add_bos_token` with its `bos_token`; otherwise nothing
    (GPT-2 and lmforge's own tokenizers add no BOS).
    """
    run = Path(run)
    doc = _json_or_none(run / "tokenizer.json") or {}
    post = doc.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            prefix: list[int] = []
            for item in step.get("single", []):
                if "Sequence" in item:
                    return prefix
                name = item.get("SpecialToken", {}).get("id")
                prefix += step.get("special_tokens", {}).get(name, {}).get("ids", [])
            return prefix
    config = _json_or_none(run / "tokenizer_config.json") or {}
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if config.get("add_bos_token") and isinstance(bos, str):
        return tok.encode(bos, allowed_special="all")
    return []


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stream_text(model: torch.nn.Module, tok: BPETokenizer, prompt: str, params: SamplingParams,
                prefix: Sequence[int] = ()) -> Iterator[str]:
    """Yield the continuation of `prefix` + `prompt` as text chunks: stop strings removed, never half a
    character. `prefix`: what the tokenizer adds before a prompt (`prompt_prefix`)."""
    yield from stream_ids(model, tok, [*prefix, *tok.encode(prompt)], params)


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """An encoder-decoder (T5): generation runs `generate_seq2seq` on the prompt as the encoder's input."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "shift_right", None))


def stream_ids(model: torch.nn.Module, tok: BPETokenizer, ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
    """Yield the continuation of the prompt `ids` as text chunks. The config's eos ids and `params.stop_token_ids`
    end the text unprinted; stop strings are removed; a character is never split between chunks."""
    cfg = model.cfg
    table = tok.vocab_bytes(cfg.vocab_size)
    checker = StopChecker(params.stop, table, [*eos_ids(cfg.eos_token_id), *params.stop_token_ids])
    utf8 = Utf8Stream()
    if is_encoder_decoder(model):  # T5: the prompt is the encoder's input, ending in </s> as HF's T5 tokenizer ends it
        steps = generate_seq2seq(model, [[*ids, *eos_ids(cfg.eos_token_id)[:1]]], params,
                                 eos_token_id=cfg.eos_token_id, token_bytes=table)
        stream: Iterator[int] = itertools.takewhile(lambda t: t is not None, (s[0] for s in steps))
    else:
        stream = generate(model, ids, params, eos_token_id=cfg.eos_token_id, token_bytes=table)
    for t in stream:
        result = checker.feed(t)
        chunk = utf8.feed(result.emit)
        if chunk:
            yield chunk
        if result.stopped:
            break
    tail = utf8.feed(checker.finish()) + utf8.finish()
    if tail:
        yield tail


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The sampling flags `generate` and `chat` share (SamplingParams' fields)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge generate", description="Stream a continuation of a prompt.")
    p.add_argument("--model", required=True, help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = sampling_params(args)
    model, tok = load_for_generation(args.model, args.device)
    for chunk in stream_text(model, tok, args.prompt, params, prompt_prefix(args.model, tok)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------- lmforge chat

@dataclasses.dataclass
class ChatSession:
    """A conversation with a chat model: the history as messages, re-rendered with the model's template each turn.

    The prompt of every turn is the whole conversation rendered with `add_generation_prompt`, encoded with the
    template's special tokens as control tokens and the user's text sanitized (typing `<|im_end|>` does not end
    a turn). The reply ends at the config's eos ids, the tokenizer's eos token or the template's end-of-turn
    token, none of which is printed; its text is stored as the assistant message for the next turn.
    """

    model: torch.nn.Module
    tok: BPETokenizer
    template: ChatTemplate
    params: SamplingParams
    system: str | None = None
    messages: list[dict] = dataclasses.field(default_factory=list)
    turns: int = 0  # replies since the last reset: with a seed, turn k samples with seed + k

    def __post_init__(self) -> None:
        self.stop_ids = chat_stop_ids(self.tok, self.template)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = 0

    def prompt_ids(self) -> list[int]:
        return encode_chat(self.tok, self.template, self.messages, add_generation_prompt=True, sanitize=True)

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the reply; both stay in the history. When the caller stops early
        (Ctrl-C), the reply is kept as far as the caller took it. A failure leaves the history unchanged."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
            room = self.model.cfg.max_seq_len - len(ids)
            if room < 1:
                raise LmforgeError(f"the conversation ({len(ids)} tokens) fills the model's context "
                                   f"({self.model.cfg.max_seq_len}); /reset to start again")
        except LmforgeError:
            self.messages.pop()
            raise
        seed = None if self.params.seed is None else self.params.seed + self.turns
        params = dataclasses.replace(self.params, seed=seed, max_new_tokens=min(self.params.max_new_tokens, room),
                                     stop_token_ids=[*self.params.stop_token_ids, *self.stop_ids])
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
        self.turns += 1
        try:
            for chunk in stream_ids(self.model, self.tok, ids, params):
                yield chunk
                answer["content"] += chunk  # only once the caller comes back for more: it has shown the chunk
        except LmforgeError:
            del self.messages[-2:]
            self.turns -= 1
            raise


def chat_stop_ids(tok: BPETokenizer, template: ChatTemplate) -> list[int]:
    """Ids that end a reply besides the config's eos: the tokenizer config's eos token and the token the template
    writes after an assistant message (found by rendering a probe, see `end_of_turn_token`)."""
    names = [template.special_tokens.get("eos_token"), end_of_turn_token(template, tok.special_tokens)]
    ids = [tok.token_to_id(n) for n in names if n is not None]
    return sorted({i for i in ids if i is not None})


CHAT_HELP = "commands: /reset clears the conversation, /exit (or end of input) quits, /help shows this"


def build_chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge chat", description="Chat with a model in the terminal, using its own "
                                "chat template. " + CHAT_HELP + ".")
    p.add_argument("--model", required=True, help="run directory with a chat template (chat_template.jinja or "
                   "chat_template in tokenizer_config.json)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (kept across /reset)")
    add_sampling_args(p, max_new_tokens=512)
    return p


def _read_message(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """One line from the user, or None at end of input."""
    if interactive:
        try:
            return input(">>> ")  # line editing when the readline module is present
        except EOFError:
            stdout.write("\n")
            return None
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def chat_main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`lmforge chat`: one line of input is one user message; the reply streams to stdout, one line after it.

    Prompts (`>>> `) are shown only when stdin and stdout are the terminal, so piped input gives clean output.
    A turn that fails (the conversation no longer fits the context) prints one line to stderr and the chat goes
    on; Ctrl-C during a reply stops that reply.
    """
    args = build_chat_parser().parse_args(argv)
    params = sampling_params(args)
    template = load_chat_template(args.model)  # before the weights: a run that cannot chat fails fast
    model, tok = load_for_generation(args.model, args.device)
    if is_encoder_decoder(model):
        raise LmforgeError(f"{args.model} is an encoder-decoder model; chat needs a decoder-only model with a chat "
                           f"template")
    session = ChatSession(model, tok, template, params, system=args.system)
    interactive = stdin is None and stdout is None and sys.stdin.isatty() and sys.stdout.isatty()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - importing it gives input() history and line editing
        stdout.write(f"lmforge chat: {args.model} ({CHAT_HELP})\n")
    while (line := _read_message(stdin, stdout, interactive)) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            continue
        if command == "/help":
            stdout.write(CHAT_HELP + "\n")
            continue
        if not command:
            continue
        _stream_reply(session, line, stdout)
    stdout.flush()
    return 0


def _stream_reply(session: ChatSession, text: str, stdout: TextIO) -> None:
    try:
        for chunk in session.reply(text):
            stdout.write(chunk)
            stdout.flush()
    except LmforgeError as e:
        print(f"lmforge chat: error: {e}", file=sys.stderr)
        return
    except KeyboardInterrupt:
        stdout.write(" [stopped]")
    stdout.write("\n")
    stdout.flush()
