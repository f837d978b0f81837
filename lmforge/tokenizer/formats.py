"""Read and write the ecosystem's tokenizer files: HF `tokenizer.json` (byte-level BPE) and tiktoken ranks.

`load_tokenizer` takes a run directory, a `tokenizer.json`, a `.tiktoken` rank file, or the name of a
public encoding (cl100k_base, o200k_base, p50k_base, r50k_base/gpt2) found in lmforge's offline cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_text
from lmforge.tokenizer import pretokenize
from lmforge.tokenizer.bpe import BPETokenizer

ENDOFTEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, ENDOFPROMPT = (
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")

# name -> (pattern, special tokens), as tiktoken defines them (tiktoken_ext/openai_public.py).
ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "r50k_base": (pretokenize.TIKTOKEN_R50K_PATTERN, {ENDOFTEXT: 50256}),
    "p50k_base": (pretokenize.TIKTOKEN_R50K_PATTERN, {ENDOFTEXT: 50256}),
    "cl100k_base": (pretokenize.CL100K_PATTERN, {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259,
                                                FIM_SUFFIX: 100260, ENDOFPROMPT: 100276}),
    "o200k_base": (pretokenize.O200K_PATTERN, {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}),
}
ALIASES = {"gpt2": "r50k_base"}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by HF ByteLevel (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _to_bytelevel(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _from_bytelevel(token: str) -> bytes | None:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


# ---------------------------------------------------------------------- HF tokenizer.json

def tokenizer_json(tok: BPETokenizer) -> dict:
    """The HF `tokenizers` JSON document for `tok` (byte-level BPE)."""
    if tok.merges is None:
        raise LmforgeError("this tokenizer has ranks but no merge list (a tiktoken file); save it with save_tiktoken")
    kind = pretokenize.scanner_kind(tok.pattern)
    if kind == 1:  # ByteLevel's built-in regex is the GPT-2 split
        pre = {"type": "ByteLevel", "add_prefix_space": tok.add_prefix_space, "trim_offsets": True, "use_regex": True}
    else:
        if kind == 3:
            raise LmforgeError("tiktoken's cl100k split uses `$`, which HF's regex engine reads differently; "
                               "train with pattern 'gpt4' for a tokenizer.json")
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": tok.add_prefix_space, "trim_offsets": True, "use_regex": False},
        ]}
    vocab = {_to_bytelevel(b): i for i, b in enumerate(tok.tokens) if b is not None}
    # Special tokens go in the model's vocab too, as HF's trainers write them: `tokenizers` gives an added token
    # that is not in the vocab a fresh id past its end, which is wrong for specials that are not the last ids.
    vocab.update(tok.special_tokens)
    # "a b" strings (not pairs): every tokenizers release reads them; byte-level tokens never hold a space
    merges = [f"{_to_bytelevel(tok.tokens[a])} {_to_bytelevel(tok.tokens[b])}" for a, b in tok.merges]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if tok.normalizer == "NFC" else None,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": tok.ignore_merges, "vocab": vocab, "merges": merges},
    }


def save_tokenizer(tok: BPETokenizer, out_dir: str | Path) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (atomically); returns the json path."""
    out_dir = Path(out_dir)
    path = out_dir / "tokenizer.json"
    atomic_write_text(path, json.dumps(tokenizer_json(tok), ensure_ascii=False, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000_000_000_019_884_624_838_656}
    if ENDOFTEXT in tok.special_tokens:
        config["eos_token"] = ENDOFTEXT
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=1))
    return path


def _pre_tokenizer_pattern(pre: dict | None) -> tuple[str, bool]:
    """(split pattern, add_prefix_space) for the byte-level pre-tokenizers lmforge supports."""
    if not pre:
        raise LmforgeError("tokenizer.json has no pre_tokenizer; only byte-level BPE is supported")
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True):
            raise LmforgeError("ByteLevel pre_tokenizer without a regex split is not supported")
        return pretokenize.GPT2_PATTERN, bool(pre.get("add_prefix_space", False))
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        splits = [s for s in steps if s.get("type") == "Split"]
        levels = [s for s in steps if s.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and len(steps) == 2 and steps[1] is levels[0]:
            split = splits[0]
            pattern = (split.get("pattern") or {}).get("Regex")
            if pattern is None or split.get("behavior") != "Isolated" or split.get("invert"):
                raise LmforgeError("unsupported Split pre_tokenizer (need an Isolated, non-inverted Regex split)")
            if levels[0].get("use_regex", True):
                raise LmforgeError("unsupported pre_tokenizer: a Split followed by ByteLevel(use_regex=true)")
            return pattern, bool(levels[0].get("add_prefix_space", False))
    raise LmforgeError(f"unsupported pre_tokenizer {json.dumps(pre)[:120]}; lmforge reads byte-level BPE only")


def tokenizer_from_json(doc: dict, source: str = "tokenizer.json") -> BPETokenizer:
    """Build a BPETokenizer from a parsed HF tokenizer.json document (byte-level BPE only)."""
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise LmforgeError(f"{source}: not a BPE tokenizer (model.type must be BPE with a vocab)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise LmforgeError(f"{source}: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise LmforgeError(f"{source}: byte_fallback BPE (SentencePiece style) is not supported")
    normalizer = doc.get("normalizer")
    norm = None
    if normalizer:
        if normalizer.get("type") != "NFC":
            raise LmforgeError(f"{source}: unsupported normalizer {normalizer.get('type')!r}")
        norm = "NFC"
    pattern, prefix_space = _pre_tokenizer_pattern(doc.get("pre_tokenizer"))
    added = {t["content"]: int(t["id"]) for t in doc.get("added_tokens") or []}
    vocab: dict[str, int] = model["vocab"]
    n = max(vocab.values(), default=-1) + 1
    tokens: list[bytes | None] = [None] * n
    for text, i in vocab.items():
        b = _from_bytelevel(text)
        if b is None or not b:
            if text in added:
                continue  # e.g. GPT-2 lists <|endoftext|> in its vocab too
            raise LmforgeError(f"{source}: vocab entry {text!r} is not a byte-level token")
        tokens[i] = b
    for text, i in added.items():
        if i < n and tokens[i] is not None and _to_bytelevel(tokens[i]) == text:
            tokens[i] = None  # an added token that is also spelled in the vocab: it is a special now
    special_ids = set(added.values())
    while tokens and tokens[-1] is None and len(tokens) - 1 in special_ids:
        tokens.pop()  # specials past the last ordinary token live only in the special table
    merges = []
    for k, m in enumerate(model.get("merges") or []):
        a, sep, b = m.partition(" ") if isinstance(m, str) else (m[0], " ", m[1])
        if not sep or a not in vocab or b not in vocab:
            raise LmforgeError(f"{source}: merge {k} ({m!r}) names a token missing from the vocab")
        merges.append((vocab[a], vocab[b]))
    return BPETokenizer(tokens, merges, pattern, added, ignore_merges=bool(model.get("ignore_merges", False)),
                        add_prefix_space=prefix_space, normalizer=norm)


def load_tokenizer_json(path: str | Path) -> BPETokenizer:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: corrupt or not JSON ({e})") from None
    try:
        return tokenizer_from_json(doc, str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LmforgeError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- tiktoken rank files

def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `base64(token) rank` per line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"rank file not found: {path}") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise LmforgeError(f"{path}:{lineno}: corrupt rank file line ({e})") from None
        if not token or rank < 0 or token in ranks:
            raise LmforgeError(f"{path}:{lineno}: corrupt rank file line (empty, negative or duplicate token)")
        ranks[token] = rank
    if not ranks:
        raise LmforgeError(f"{path}: rank file is empty")
    return ranks


def tokenizer_from_ranks(ranks: dict[bytes, int], pattern: str,
                         special_tokens: dict[str, int] | None = None) -> BPETokenizer:
    """A tiktoken-style tokenizer: ids are ranks, merges follow the ranks of joined bytes."""
    n = max(ranks.values()) + 1
    tokens: list[bytes | None] = [None] * n
    for b, r in ranks.items():
        if tokens[r] is not None:
            raise LmforgeError(f"two tokens share rank {r}")
        tokens[r] = b
    return BPETokenizer(tokens, None, pattern, special_tokens or {})


def save_tiktoken(tok: BPETokenizer, path: str | Path) -> Path:
    """Write the ordinary tokens as a tiktoken rank file (ids are ranks). Pattern and specials are not part
    of the format: pass them to `tiktoken.Encoding` yourself. Merge order from training is the id order."""
    lines = [base64.b64encode(b).decode("ascii") + f" {i}\n" for i, b in enumerate(tok.tokens) if b is not None]
    atomic_write_text(path, "".join(lines))
    return Path(path)


def _known_encoding_by_hash(path: Path) -> str | None:
    from lmforge import assets

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for name, expected in assets.TIKTOKEN_SHA256.items():
        if expected == digest:
            return name
    return None


def load_tiktoken(path: str | Path, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> BPETokenizer:
    """Load a rank file; a known public file (by hash) gets its own pattern and specials unless given."""
    path = Path(path)
    ranks = read_tiktoken_ranks(path)
    known = _known_encoding_by_hash(path) if pattern is None or special_tokens is None else None
    if pattern is None:
        if known is None:
            raise LmforgeError(f"{path}: unknown rank file; pass the split pattern (e.g. --pattern gpt4)")
        pattern = ENCODINGS[known][0]
    if special_tokens is None:
        special_tokens = ENCODINGS[known][1] if known else {}
    return tokenizer_from_ranks(ranks, pattern, special_tokens)


def load_encoding(name: str) -> BPETokenizer:
    """A public tiktoken encoding by name, from lmforge's offline asset cache."""
    from lmforge import assets

    name = ALIASES.get(name, name)
    if name not in ENCODINGS:
        raise LmforgeError(f"unknown encoding {name!r}; known: {sorted(ENCODINGS) + sorted(ALIASES)}")
    pattern, specials = ENCODINGS[name]
    return tokenizer_from_ranks(read_tiktoken_ranks(assets.tiktoken_file(name)), pattern, specials)


def load_tokenizer(spec: str | Path, pattern: str | None = None) -> BPETokenizer:
    """Load from a directory holding tokenizer.json, a tokenizer.json, a .tiktoken file, or an encoding name."""
    spec_str = str(spec)
    path = Path(spec)
    if not path.exists() and (spec_str in ENCODINGS or spec_str in ALIASES):
        return load_encoding(spec_str)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return load_tokenizer_json(path / "tokenizer.json")
        raise LmforgeError(f"{path} has no tokenizer.json")
    if not path.exists():
        raise LmforgeError(f"tokenizer not found: {spec_str} (a directory, a tokenizer.json, a .tiktoken file, "
                           f"or one of {sorted(ENCODINGS)})")
    if path.suffix == ".tiktoken":
        return load_tiktoken(path, pattern)
    return load_tokenizer_json(path)
