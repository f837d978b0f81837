"""Chat templates: a conversation -> the exact text (and ids) a chat model was trained on.

    template = load_chat_template("runs/sft")                  # chat_template.jinja or tokenizer_config.json
    text = template.render(messages, add_generation_prompt=True)
    ids = encode_chat(tok, template, messages, add_generation_prompt=True)
    ids, mask = encode_chat_with_mask(tok, template, messages)  # mask[i] = 1 on tokens the assistant wrote

A chat template is a Jinja program shipped with the model. Rendering must match transformers'
`apply_chat_template` character for character, or the model sees a format it was never trained on, so this
module rebuilds transformers' Jinja environment (`transformers/utils/chat_template_utils.py`): a sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` and `{% generation %}` extensions, the globals
`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`, and a `tojson` that does not
HTML-escape. The template sees `messages`, `tools` (JSON schemas), `documents`, `add_generation_prompt`,
the tokenizer's named special tokens (`bos_token`, `eos_token`, ...) and any extra keyword arguments.
"""

from __future__ import annotations

import bisect
import contextvars
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.common import LmforgeError, atomic_write_text, read_text_file
from lmforge.tokenizer.bpe import BPETokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside tokenizer.json; wins over tokenizer_config.json (transformers)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # more named templates, one NAME.jinja each
TOKENIZER_CONFIG = "tokenizer_config.json"
# The special tokens transformers passes to every template (`special_tokens_map`), when the config names them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read the first (transformers aliases the others to it).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Message = dict[str, Any]
Span = tuple[int, int]  # [start, end) character offsets in the rendered text


# ---------------------------------------------------------------------- the Jinja environment

class TemplateRaised(jinja2.TemplateError):
    """The template called `raise_exception(message)`: it refuses this conversation."""


# The spans of `{% generation %}` blocks in the render in progress (None when nobody asked for them). A context
# variable keeps concurrent renders of one compiled template apart.
_tracker: contextvars.ContextVar[_SpanTracker | None] = contextvars.ContextVar("lmforge_chat_spans", default=None)


class _SpanTracker:
    def __init__(self) -> None:
        self.rendered = 0  # characters the template has yielded so far
        self.spans: list[Span] = []


class GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the text the assistant writes (transformers'
    AssistantTracker). The block renders unchanged; while spans are tracked, its character span is recorded.

    The span starts at the length of everything rendered *before the enclosing top-level output* was yielded,
    exactly as transformers counts it, so a generation block nested inside a macro or a `{% set %}` block is
    misplaced the same way in both.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        tracker = _tracker.get()
        if tracker is not None:
            tracker.spans.append((tracker.rendered, tracker.rendered + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    """json.dumps as transformers exposes it: Jinja's own `tojson` would HTML-escape `<`, `>`, `&` and `'`."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names so a template cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - Jinja's signature trick: `namespace(self=...)`
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names on a namespace: "
                                                  f"{name!r}")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """Templates come from model repositories: untrusted code, so they run in Jinja's immutable sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationExtension, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template syntax error on line {e.lineno}: {_one_line(e.message or str(e))}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------- what the template sees

def _plain(value: Any) -> Any:
    """Rebuild template input from plain JSON-like types (transformers' `_plain_template_data`).

    Rich objects carry methods the sandbox does not know to be dangerous, so anything that is not a scalar,
    mapping, list, tuple, dataclass, pydantic model or numpy scalar becomes an inert "<TypeName>" placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # subclasses (enums, ...) stripped to plain str
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar can only exist if numpy is already imported
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Messages as transformers hands them to the template: None-valued keys dropped (OpenAI-style
    `content=None` would render as "None"), plain data only, reasoning aliased under every name templates read."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise LmforgeError("a conversation is a non-empty list of messages ({'role': ..., 'content': ...})")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise LmforgeError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Message] | None:
    if tools is None:
        return None
    if any(not isinstance(t, Mapping) for t in tools):
        raise LmforgeError("tools must be JSON schemas (dicts); transformers' conversion of Python functions is "
                           "not supported")
    return _plain(list(tools))


def _prepare_documents(documents: Sequence[Mapping[str, Any]] | None) -> list[Message] | None:
    if documents is None:
        return None
    if any(not isinstance(d, Mapping) for d in documents):
        raise LmforgeError("documents must be dicts (usually with 'title' and 'text' keys)")
    return _plain(list(documents))


# ---------------------------------------------------------------------- templates

class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with (name -> text, e.g. eos_token)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise LmforgeError("a chat template must be a non-empty string")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """The conversation as text, equal to transformers' `apply_chat_template(..., tokenize=False)`.

        Extra keyword arguments reach the template as variables and override the special tokens of the same name.
        """
        return self._render(messages, add_generation_prompt, tools, documents, kwargs, None)

    def render_with_spans(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                          tools: Sequence[Mapping[str, Any]] | None = None,
                          documents: Sequence[Mapping[str, Any]] | None = None,
                          **kwargs: Any) -> tuple[str, list[Span]]:
        """The rendered text and the character spans of its `{% generation %}` blocks (the assistant's text)."""
        tracker = _SpanTracker()
        text = self._render(messages, add_generation_prompt, tools, documents, kwargs, tracker)
        return text, tracker.spans

    def _render(self, messages, add_generation_prompt, tools, documents, kwargs, tracker) -> str:
        variables = {**self.special_tokens, **_plain(kwargs)}
        context = dict(messages=_prepare_messages(messages), tools=_prepare_tools(tools),
                       documents=_prepare_documents(documents), add_generation_prompt=add_generation_prompt,
                       **variables)
        token = _tracker.set(tracker)
        try:
            if tracker is None:
                return self._template.render(**context)
            pieces = []
            for piece in self._template.generate(**context):
                pieces.append(piece)
                tracker.rendered += len(piece)
            return "".join(pieces)
        except TemplateRaised as e:
            raise LmforgeError(f"chat template refused the conversation: {_one_line(e.message)}") from None
        except Exception as e:  # the template is a program from the model's author: its failures are input errors
            raise LmforgeError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            _tracker.reset(token)

    @property
    def has_generation_tags(self) -> bool:
        """Whether the template marks the assistant's text with `{% generation %}` (needed for assistant masks)."""
        return re.search(r"\{%-?\s*generation\s*-?%\}", self.source) is not None

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, specials={sorted(self.special_tokens)})"


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return doc


def read_chat_templates(run_dir: str | Path) -> dict[str, str]:
    """Every chat template of a run directory by name, found where transformers looks.

    `chat_template.jinja` (named "default") and `additional_chat_templates/NAME.jinja` win; only when neither
    exists is `chat_template` in tokenizer_config.json read: a string ("default"), or a list of
    `{"name", "template"}` (older multi-template repositories). Empty when the run has no template.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    templates: dict[str, str] = {}
    if (run_dir / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = read_text_file(run_dir / CHAT_TEMPLATE_FILE)
    if (run_dir / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((run_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = read_text_file(path)
    config_path = run_dir / TOKENIZER_CONFIG
    if templates or not config_path.is_file():
        return templates
    value = _read_json(config_path).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise LmforgeError(f"{config_path}: chat_template must be a string or a list of {{name, template}} objects")


def read_special_tokens(run_dir: str | Path) -> dict[str, str]:
    """The named special tokens in tokenizer_config.json (`bos_token`, `eos_token`, ...) as text.

    A value may be a string or an added-token object (`{"content": ...}`); unset names are left out.
    """
    path = Path(run_dir) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    config = _read_json(path)
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def load_chat_template(run_dir: str | Path, name: str | None = None, tools: bool = False) -> ChatTemplate:
    """The run's chat template, picked as transformers' `get_chat_template` does: `name` if given, else
    "tool_use" when `tools` is set and such a template exists, else "default"."""
    templates = read_chat_templates(run_dir)
    if not templates:
        raise LmforgeError(f"{run_dir} has no chat template ({CHAT_TEMPLATE_FILE} or chat_template in "
                           f"{TOKENIZER_CONFIG}); it is not a chat model")
    if name is None:
        name = "tool_use" if tools and "tool_use" in templates else "default"
    if name not in templates:
        raise LmforgeError(f"{run_dir} has no chat template named {name!r}; it has {sorted(templates)}")
    return ChatTemplate(templates[name], read_special_tokens(run_dir))


def save_chat_template(run_dir: str | Path, source: str) -> Path:
    """Write `source` as the run's `chat_template.jinja` (atomically), after checking that it compiles."""
    ChatTemplate(source)
    path = Path(run_dir) / CHAT_TEMPLATE_FILE
    atomic_write_text(path, source)
    return path


# ---------------------------------------------------------------------- end of turn

_PROBE = "lmforgeprobe"  # letters only: survives the trim / strip filters templates apply to content


def end_of_turn_token(template: ChatTemplate, special_tokens: Iterable[str]) -> str | None:
    """The special token a template writes right after an assistant message: ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`, Gemma's `<end_of_turn>`, Llama 2's `</s>` (after a space).

    Found by rendering a probe reply and reading what follows it (whitespace skipped), so it needs no table of
    model families. None when the reply is followed by ordinary text, or the probe cannot be rendered.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = template.render(probe)
    except LmforgeError:
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = text[at + len(_PROBE):].lstrip()
    matches = [s for s in special_tokens if s and after.startswith(s)]
    return max(matches, key=len) if matches else None


# ---------------------------------------------------------------------- text -> ids

# Private-use characters that mark control tokens inside user strings (the ones transformers uses).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _mark_control_tokens(obj: Any, pattern: re.Pattern) -> Any:
    """Wrap every control token inside the strings of `obj` in markers (dict keys are left alone)."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")  # no forged markers
        return pattern.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
    if isinstance(obj, Mapping):
        return {k: _mark_control_tokens(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_control_tokens(v, pattern) for v in obj]
    return obj


def encode_chat(tok: BPETokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None, sanitize: bool = False,
                **kwargs: Any) -> list[int]:
    """Ids of the rendered conversation; no bos is added (the template writes it when the model wants one).

    Special-token text in the rendered template is encoded as the special token: the template's own markers
    must be. With `sanitize`, special-token text that came from the messages, tools, documents or kwargs is
    encoded as ordinary text instead, so a user cannot end a turn by typing `<|im_end|>` (transformers'
    `sanitize_control_tokens=True`, which treats every special token as a control token, as here).
    """
    if not sanitize:
        text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, **kwargs)
        return tok.encode(text, allowed_special="all")
    specials = sorted(tok.special_tokens, key=len, reverse=True)  # longest first: a token beats its own prefix
    control = re.compile("|".join(map(re.escape, specials)) or "(?!)")
    mark = lambda obj: _mark_control_tokens(obj, control)  # noqa: E731
    text = template.render(mark(list(messages)), add_generation_prompt=add_generation_prompt, tools=mark(tools),
                           documents=mark(documents), **mark(kwargs))
    # [text, marked token, text, marked token, ..., text]; None where a lone marker split the text (template
    # string methods can separate a marker from its token): dropped, but it still breaks the text there.
    pieces = re.split(f"{_MARK_START}({control.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]", text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tok.encode(piece, allowed_special=() if i % 2 else "all")
    return ids


def char_to_token_map(tok: BPETokenizer, ids: Sequence[int], text: str) -> list[int | None]:
    """For each character of `text` (which `ids` must spell exactly), the index of the token holding its first
    byte; one more entry, None, for the end of the text. This is transformers' `char_to_token` for byte-level
    tokenizers: a character split across tokens belongs to the first of them."""
    token_starts, at, spelled = [], 0, []
    for i in ids:
        token_starts.append(at)
        b = tok.token_bytes(i)
        at += len(b)
        spelled.append(b)
    if b"".join(spelled) != text.encode("utf-8", "surrogatepass"):
        raise LmforgeError("the tokens do not spell the rendered text exactly (a normalizer or prefix space); "
                           "assistant masks need a tokenizer without either")
    out: list[int | None] = []
    at = 0
    for ch in text:
        out.append(bisect.bisect_right(token_starts, at) - 1)
        at += len(ch.encode("utf-8", "surrogatepass"))
    out.append(None)
    return out


def assistant_mask(tok: BPETokenizer, ids: Sequence[int], text: str, spans: Iterable[Span]) -> list[int]:
    """1 for every token that overlaps an assistant span of `text`, else 0 (transformers'
    `return_assistant_tokens_mask`: from the token holding a span's first character through the token holding
    its last, so a token straddling a span boundary counts as the assistant's)."""
    to_token = char_to_token_map(tok, ids, text)
    n = len(ids)
    mask = [0] * n
    for start, end in spans:
        if not 0 <= start < len(text):
            break  # as transformers does: a span starting at the end of the text ends the mask
        first, last = to_token[start], to_token[end - 1] if end > 0 else None
        for t in range(first, n if last is None else last + 1):
            mask[t] = 1
    return mask


def encode_chat_with_mask(tok: BPETokenizer, template: ChatTemplate, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                          documents: Sequence[Mapping[str, Any]] | None = None,
                          **kwargs: Any) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a conversation: the tokens an SFT loss should train on are those with mask 1.

    The template must mark the assistant's text with `{% generation %}` ... `{% endgeneration %}`.
    """
    if not template.has_generation_tags:
        raise LmforgeError("this chat template has no {% generation %} blocks, so it cannot say which tokens the "
                           "assistant wrote")
    text, spans = template.render_with_spans(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                             documents=documents, **kwargs)
    ids = tok.encode(text, allowed_special="all")
    return ids, assistant_mask(tok, ids, text, spans)
