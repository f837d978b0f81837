"""WordPiece tokenizers (BERT and its descendants): encode exactly as HF `tokenizers` does, read and write its
tokenizer.json.

    tok = load_wordpiece("runs/minilm")                # a run directory or a tokenizer.json
    enc = tok.encode("Hello, world!")                  # Encoding: ids [101, 7592, 1010, 2088, 999, 102], masks
    encs = tok.encode_batch(["a", ("question", "passage")])   # singles and pairs, padded together
    tok.truncation = Truncation(max_length=256)        # or None; the file's own settings apply by default
    tok.save("out/")                                   # tokenizer.json + tokenizer_config.json

The pipeline, step for step as `tokenizers` (Rust) runs a BERT tokenizer.json:
  1. added tokens ([CLS], [MASK], ...) are cut out of the raw text, leftmost-longest match first;
  2. BertNormalizer on the rest, character by character: drop control characters, any whitespace -> ' ',
     spaces around CJK ideographs, strip accents (NFD, drop nonspacing marks), lowercase;
  3. BertPreTokenizer: split on whitespace, isolate every punctuation character;
  4. WordPiece (Schuster & Nakajima 2012; Devlin et al. 2019): greedy longest-match-first from the left,
     continuation pieces prefixed "##"; a word with no full cover, or longer than max_input_chars_per_word,
     is one [UNK];
  5. truncation (leaving room for the template's special tokens), the template ([CLS] $A [SEP], pairs
     [CLS] $A [SEP] $B [SEP] with segment 1 for B), padding.
Character classes follow tokenizers' Rust code where Python's differ: `str.isspace` counts U+001C..U+001F, Rust's
`char::is_whitespace` does not; `str.lower` applies the final-sigma rule, Rust lowercases per character; and
tokenizers' punctuation / control / nonspacing-mark tests use Unicode 8.0 tables (the *_SINCE_8 sets below).
Checked on every code point: what still differs is only characters newer than Python's own Unicode tables.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, atomic_write_text, read_text_file

# Unicode White_Space, which Rust's char::is_whitespace tests (the \s of Rust regexes too).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
CONTROL = frozenset({"Cc", "Cf", "Co", "Cs"})  # `is_other` of the unicode_categories crate, as tokenizers sees it
PUNCTUATION = frozenset({"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"})
ASCII_PUNCTUATION = frozenset(string.punctuation)  # Rust's is_ascii_punctuation: includes $ + < = > ^ ` | ~
# "Chinese characters" as BERT defines them: the CJK Unified Ideographs blocks (not Hangul, kana, ...).
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _chars(spec: str) -> frozenset[str]:
    """Characters from space-separated hex code points and ranges ("61d 2e43-2e4f")."""
    out: set[str] = set()
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.update(chr(cp) for cp in range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# tokenizers tests categories with the unicode_categories crate, whose tables are Unicode 8.0; Python's are newer
# (14.0 in CPython 3.11). The characters assigned or re-categorized from 8.0 to 14.0, found by running every code
# point through tokenizers 0.23 (tests/tokenizer/test_wordpiece.py checks every one); characters added after
# 14.0 (a Python >= 3.12 knows them) are not listed yet.
PUNCT_SINCE_8 = _chars(  # punctuation now, unassigned in 8.0: tokenizers does not split them off
    "61d 9fd a76 c77 c84 1b7d-1b7e 2e43-2e4f 2e52-2e5d 10ead 10f55-10f59 10f86-10f89 1144b-1144f 1145a-1145b "
    "1145d 11660-1166c 116b9 1183b 11944-11946 119e2 11a3f-11a46 11a9a-11a9c 11a9e-11aa2 11c41-11c45 11c70-11c71 "
    "11ef7-11ef8 11fff 12ff1-12ff2 16e97-16e9a 16fe2 1e95e-1e95f")
PUNCT_IN_8 = _chars("166d 111c9")  # punctuation in 8.0, not now: tokenizers still splits them off
FORMAT_SINCE_8 = _chars("890-891 8e2 110cd 13430-13438")  # format (Cf) characters tokenizers does not drop
NONSPACING_SINCE_8 = _chars(  # nonspacing marks tokenizers does not strip
    "7fd 898-89f 8ca-8e1 9fe afa-aff b55 c04 c3c d00 d3b-d3c d81 eba 180f 1885-1886 1abf-1ace 1df6-1dfb a82c a8c5 "
    "a8ff a9bd 10d24-10d27 10eab-10eac 10f46-10f50 10f82-10f85 11070 11073-11074 110c2 111c9 111cf 1123e 1133b "
    "11438-1143f 11442-11444 11446 1145e 1182f-11837 11839-1183a 1193b-1193c 1193e 11943 119d4-119d7 119da-119db "
    "119e0 11a01-11a0a 11a33-11a38 11a3b-11a3e 11a47 11a51-11a56 11a59-11a5b 11a8a-11a96 11a98-11a99 11c30-11c36 "
    "11c38-11c3d 11c3f 11c92-11ca7 11caa-11cb0 11cb2-11cb3 11cb5-11cb6 11d31-11d36 11d3a 11d3c-11d3d 11d3f-11d45 "
    "11d47 11d90-11d91 11d95 11d97 11ef3-11ef4 16f4f 16fe4 1cf00-1cf2d 1cf30-1cf46 1e000-1e006 1e008-1e018 "
    "1e01b-1e021 1e023-1e024 1e026-1e02a 1e130-1e136 1e2ae 1e2ec-1e2ef 1e944-1e94a")
NONSPACING_IN_8 = _chars("1734")  # a nonspacing mark in 8.0, spacing (Mc) since 14.0: tokenizers strips it


# ---- normalizer and pre-tokenizer ----


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def _is_removed(c: str) -> bool:
    """BERT's clean_text drops NUL, U+FFFD and control/format/private-use characters, but keeps \\t \\n \\r."""
    return c == "\x00" or c == "\ufffd" or (
        c not in "\t\n\r" and unicodedata.category(c) in CONTROL and c not in FORMAT_SINCE_8)


def _is_punctuation(c: str) -> bool:
    return c in ASCII_PUNCTUATION or c in PUNCT_IN_8 or (
        unicodedata.category(c) in PUNCTUATION and c not in PUNCT_SINCE_8)


def _is_stripped(c: str) -> bool:
    """A nonspacing mark, as strip_accents removes them after NFD."""
    return c in NONSPACING_IN_8 or (unicodedata.category(c) == "Mn" and c not in NONSPACING_SINCE_8)


def bert_normalize(text: str, clean_text: bool = True, handle_chinese_chars: bool = True,
                   strip_accents: bool = True, lowercase: bool = True) -> str:
    """HF's BertNormalizer, in its order: clean, space out CJK, strip accents, lowercase."""
    if clean_text:
        text = "".join(" " if c in WHITESPACE else c for c in text if not _is_removed(c))
    if handle_chinese_chars and not text.isascii():
        text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
    if strip_accents and not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if not _is_stripped(c))
    if lowercase:  # per character, as Rust: 'Σ' -> 'σ' everywhere, no final-sigma context
        text = text.lower() if text.isascii() else "".join(c.lower() for c in text)
    return text


def bert_pre_tokenize(text: str) -> list[str]:
    """HF's BertPreTokenizer: words split on whitespace (dropped), each punctuation character its own word."""
    words: list[str] = []
    current: list[str] = []
    for c in text:
        if c in WHITESPACE or _is_punctuation(c):
            if current:
                words.append("".join(current))
                current = []
            if c not in WHITESPACE:
                words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


# ---- settings and results ----


@dataclass
class AddedToken:
    """A token matched in the text before the model sees it (`added_tokens` of tokenizer.json)."""

    content: str
    id: int
    special: bool = True  # skipped by decode(skip_special_tokens=True)
    normalized: bool = False  # matched in the normalized text (else in the raw text)
    lstrip: bool = False  # absorbs the whitespace on its left
    rstrip: bool = False  # ... and on its right
    single_word: bool = False  # only matches when not inside a word


@dataclass
class Truncation:
    """Cut sequences to max_length tokens, special tokens included (`truncation` of tokenizer.json)."""

    max_length: int
    strategy: str = "LongestFirst"  # or OnlyFirst / OnlySecond (pairs)
    direction: str = "Right"  # Right keeps the start, Left keeps the end
    stride: int = 0  # kept for the file's sake; overflowing windows are not produced


@dataclass
class Padding:
    """Pad to the longest sequence of a batch (length None) or to a fixed length (`padding` of tokenizer.json)."""

    length: int | None = None
    direction: str = "Right"
    pad_id: int = 0
    pad_type_id: int = 0
    pad_token: str = "[PAD]"
    pad_to_multiple_of: int | None = None


@dataclass
class Encoding:
    """One encoded input: ids, segment ids, the tokens' strings, and 1 for real tokens / 0 for padding."""

    ids: list[int]
    type_ids: list[int]
    tokens: list[str]
    attention_mask: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.attention_mask:
            self.attention_mask = [1] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def truncate(self, n: int, direction: str) -> None:
        if len(self.ids) > n:
            keep = slice(0, n) if direction == "Right" else slice(len(self.ids) - n, None)
            for name in ("ids", "type_ids", "tokens", "attention_mask"):
                setattr(self, name, getattr(self, name)[keep])

    def pad(self, n: int, p: Padding) -> None:
        k = n - len(self.ids)
        if k > 0:
            for name, value in (("ids", p.pad_id), ("type_ids", p.pad_type_id), ("tokens", p.pad_token),
                                ("attention_mask", 0)):
                old = getattr(self, name)
                setattr(self, name, old + [value] * k if p.direction == "Right" else [value] * k + old)


# Template pieces: ("$A", type_id), ("$B", type_id) for the sequences, (special token name, type_id) otherwise.
Template = list[tuple[str, int]]
BERT_SINGLE: Template = [("[CLS]", 0), ("$A", 0), ("[SEP]", 0)]
BERT_PAIR: Template = [("[CLS]", 0), ("$A", 0), ("[SEP]", 0), ("$B", 1), ("[SEP]", 1)]


# ---- the tokenizer ----


class WordPieceTokenizer:
    """A BERT-style WordPiece tokenizer. `vocab` maps token -> id (or lists tokens in id order)."""

    def __init__(self, vocab: dict[str, int] | Sequence[str], *, unk_token: str = "[UNK]", prefix: str = "##",
                 max_input_chars_per_word: int = 100, lowercase: bool = True, strip_accents: bool | None = None,
                 clean_text: bool = True, handle_chinese_chars: bool = True, normalizer: bool = True,
                 added_tokens: Iterable[AddedToken] | None = None, single: Template | None = None,
                 pair: Template | None = None, special_ids: dict[str, list[int]] | None = None,
                 truncation: Truncation | None = None, padding: Padding | None = None, decoder_cleanup: bool = True):
        self.vocab = dict(vocab) if isinstance(vocab, dict) else {t: i for i, t in enumerate(vocab)}
        if unk_token not in self.vocab:
            raise LmforgeError(f"WordPiece unk_token {unk_token!r} is not in the vocabulary")
        self.unk_token, self.prefix, self.max_input_chars_per_word = unk_token, prefix, max_input_chars_per_word
        self.normalizer = normalizer  # False: the file has no normalizer at all
        self.lowercase, self.strip_accents = lowercase, strip_accents  # strip_accents None: follow lowercase
        self.clean_text, self.handle_chinese_chars = clean_text, handle_chinese_chars
        if added_tokens is None:  # BERT's specials, wherever the vocabulary has them
            added_tokens = [AddedToken(t, self.vocab[t]) for t in BERT_SPECIALS if t in self.vocab]
        self.added_tokens = sorted(added_tokens, key=lambda t: t.id)
        has_template = all(t in self.vocab for t in ("[CLS]", "[SEP]"))
        self.single = single if single is not None else (BERT_SINGLE if has_template else None)
        self.pair = pair if pair is not None else (BERT_PAIR if has_template else None)
        self.special_ids = special_ids if special_ids is not None else self._template_ids()
        self.truncation, self.padding, self.decoder_cleanup = truncation, padding, decoder_cleanup
        self.id_to_str = {i: t for t, i in self.vocab.items()} | {t.id: t.content for t in self.added_tokens}
        self.vocab_size = 1 + max(self.id_to_str)  # number of ids, added tokens included
        self._raw_matcher = self._matcher([t for t in self.added_tokens if not t.normalized], normalize=False)
        self._norm_matcher = self._matcher([t for t in self.added_tokens if t.normalized], normalize=True)
        self._cache: dict[str, list[tuple[int, str]]] = {}

    def _template_ids(self) -> dict[str, list[int]]:
        names = {name for tpl in (self.single or [], self.pair or []) for name, _ in tpl if name not in ("$A", "$B")}
        missing = sorted(n for n in names if n not in self.vocab)
        if missing:
            raise LmforgeError(f"template special tokens not in the vocabulary: {', '.join(missing)}")
        return {n: [self.vocab[n]] for n in sorted(names)}

    def _matcher(self, tokens: list[AddedToken], normalize: bool) -> tuple[re.Pattern, dict[str, AddedToken]] | None:
        """A regex over the added tokens' contents, longest first: Python's first-alternative-wins at the
        leftmost position then equals the leftmost-longest Aho-Corasick match of `tokenizers`."""
        by_content = {(self.normalize(t.content) if normalize else t.content): t for t in tokens if t.content}
        if not by_content:
            return None
        alternatives = sorted(by_content, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, alternatives))), by_content

    # ---- vocabulary ----

    def token_to_id(self, token: str) -> int | None:
        added = next((t.id for t in self.added_tokens if t.content == token), None)
        return added if added is not None else self.vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self.id_to_str.get(i)

    def num_special_tokens(self, pair: bool = False) -> int:
        """How many ids the template adds around one sequence (or a pair)."""
        tpl = self.pair if pair else self.single
        return sum(len(self.special_ids[n]) for n, _ in tpl or [] if n not in ("$A", "$B"))

    # ---- encoding ----

    def normalize(self, text: str) -> str:
        if not self.normalizer:
            return text
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        return bert_normalize(text, self.clean_text, self.handle_chinese_chars, strip, self.lowercase)

    def tokenize(self, text: str) -> list[tuple[int, str]]:
        """(id, token) pairs of one text, before truncation and the template."""
        out: list[tuple[int, str]] = []
        for piece, added in _split_added(text, self._raw_matcher):
            if added is not None:
                out.append((added.id, piece))
                continue
            for sub, added in _split_added(self.normalize(piece), self._norm_matcher):
                if added is not None:
                    out.append((added.id, sub))
                    continue
                for word in bert_pre_tokenize(sub):
                    out.extend(self._wordpiece(word))
        return out

    def _wordpiece(self, word: str) -> list[tuple[int, str]]:
        """Greedy longest-match-first: the longest vocabulary prefix, then the longest "##" piece after it, ..."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        unk = [(self.vocab[self.unk_token], self.unk_token)]
        if len(word) > self.max_input_chars_per_word:
            return unk
        pieces: list[tuple[int, str]] = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    pieces.append((self.vocab[piece], piece))
                    start = end
                    break
            else:
                pieces = unk  # some part has no piece: the whole word is unknown
                break
        if len(self._cache) < 100_000:
            self._cache[word] = pieces
        return pieces

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        """Encode one text (or a pair): truncated, wrapped in the template and padded as configured."""
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            raise LmforgeError(f"encode takes text as str, got {type(text).__name__} / {type(pair).__name__}")
        a = _encoding(self.tokenize(text), 0)
        b = None if pair is None else _encoding(self.tokenize(pair), 1)
        if self.truncation is not None:
            self._truncate(a, b, add_special_tokens)
        enc = self._apply_template(a, b) if add_special_tokens else _concat(a, b)
        if self.padding is not None:
            _pad([enc], self.padding)
        return enc

    def encode_batch(self, inputs: Sequence[str | tuple[str, str]], add_special_tokens: bool = True) -> list[Encoding]:
        """Encode texts or (text, pair) tuples; padding (if set) is to the batch's longest or the fixed length."""
        encs = [self.encode(*x, add_special_tokens=add_special_tokens) if isinstance(x, tuple)
                else self.encode(x, add_special_tokens=add_special_tokens) for x in inputs]
        if self.padding is not None:
            _pad(encs, self.padding)
        return encs

    def _truncate(self, a: Encoding, b: Encoding | None, add_special_tokens: bool) -> None:
        """`truncate_encodings` of tokenizers, after taking the template's special tokens off max_length."""
        t = self.truncation
        room = t.max_length - (self.num_special_tokens(b is not None) if add_special_tokens else 0)
        if room < 0:
            raise LmforgeError(f"truncation max_length {t.max_length} leaves no room for the special tokens")
        n1, n2 = len(a), len(b) if b is not None else 0
        if n1 + n2 <= room:
            return
        if b is None and t.strategy == "OnlySecond":
            raise LmforgeError(f"cannot truncate to {t.max_length}: OnlySecond truncation needs a second sequence")
        if b is None or t.strategy in ("OnlyFirst", "OnlySecond"):
            target = a if b is None or t.strategy == "OnlyFirst" else b
            cut = n1 + n2 - room
            if len(target) <= cut:
                raise LmforgeError(f"cannot truncate to {t.max_length}: the {t.strategy} sequence is too short")
            target.truncate(len(target) - cut, t.direction)
            return
        short, long_ = sorted((n1, n2))  # LongestFirst on a pair: trim the longer first, then both evenly
        long_ = short if short > room else max(short, room - short)
        if short + long_ > room:
            short, long_ = room // 2, room // 2 + room % 2
        first, second = (short, long_) if n1 <= n2 else (long_, short)
        a.truncate(first, t.direction)
        b.truncate(second, t.direction)

    def _apply_template(self, a: Encoding, b: Encoding | None) -> Encoding:
        template = self.single if b is None else self.pair
        if not template:  # no post-processor: the sequences as they are (B keeps segment 1)
            return _concat(a, b)
        ids: list[int] = []
        types: list[int] = []
        tokens: list[str] = []
        for name, type_id in template:
            if name in ("$A", "$B"):
                seq = a if name == "$A" else b
                if seq is None:
                    continue
                ids += seq.ids
                tokens += seq.tokens
            else:
                ids += self.special_ids[name]
                tokens += [self.id_to_str.get(i, name) for i in self.special_ids[name]]
            types += [type_id] * (len(ids) - len(types))
        return Encoding(ids, types, tokens)

    # ---- decoding ----

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ids: "##" pieces glued to the previous token, others after a space; with the WordPiece decoder's
        cleanup, spaces before punctuation and inside contractions removed ("it ' s" -> "it's" as HF does)."""
        special = {t.id for t in self.added_tokens if t.special}
        tokens = [self.id_to_str[i] for i in ids if i in self.id_to_str and not (skip_special_tokens and i in special)]
        out = []
        for k, tok in enumerate(tokens):
            if k:
                tok = tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok
            out.append(_cleanup(tok) if self.decoder_cleanup else tok)
        return "".join(out)

    # ---- tokenizer.json ----

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = "tokenizer.json") -> WordPieceTokenizer:
        """Build from a parsed HF tokenizer.json (WordPiece model, BertNormalizer, BertPreTokenizer)."""
        return cls(**_read_doc(doc, source))

    def to_json(self) -> dict[str, Any]:
        """The HF tokenizer.json document, as `tokenizers` itself serializes it."""
        return {
            "version": "1.0",
            "truncation": None if self.truncation is None else {
                "direction": self.truncation.direction, "max_length": self.truncation.max_length,
                "strategy": self.truncation.strategy, "stride": self.truncation.stride},
            "padding": None if self.padding is None else {
                "strategy": "BatchLongest" if self.padding.length is None else {"Fixed": self.padding.length},
                "direction": self.padding.direction, "pad_to_multiple_of": self.padding.pad_to_multiple_of,
                "pad_id": self.padding.pad_id, "pad_type_id": self.padding.pad_type_id,
                "pad_token": self.padding.pad_token},
            "added_tokens": [{"id": t.id, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                              "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
                             for t in self.added_tokens],
            "normalizer": None if not self.normalizer else {
                "type": "BertNormalizer", "clean_text": self.clean_text,
                "handle_chinese_chars": self.handle_chinese_chars, "strip_accents": self.strip_accents,
                "lowercase": self.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": None if not self.single else {
                "type": "TemplateProcessing", "single": _template_json(self.single),
                "pair": _template_json(self.pair or []),
                "special_tokens": {n: {"id": n, "ids": ids, "tokens": [self.id_to_str.get(i, n) for i in ids]}
                                   for n, ids in self.special_ids.items()}},
            "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.decoder_cleanup},
            "model": {"type": "WordPiece", "unk_token": self.unk_token, "continuing_subword_prefix": self.prefix,
                      "max_input_chars_per_word": self.max_input_chars_per_word,
                      "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))},
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (atomically); returns the tokenizer.json path.

        tokenizer_config names PreTrainedTokenizerFast, which loads tokenizer.json as written: BertTokenizer would
        rebuild the normalizer from its own flags (tokenize_chinese_chars, ...) instead.
        """
        out_dir = Path(out_dir)
        path = out_dir / "tokenizer.json"
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n")
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": self.lowercase,
                                  "clean_up_tokenization_spaces": True}
        for key, tok in (("unk_token", self.unk_token), ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
                         ("sep_token", "[SEP]"), ("mask_token", "[MASK]")):
            if tok in self.vocab:
                config[key] = tok
        if self.truncation is not None:
            config["model_max_length"] = self.truncation.max_length
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=1) + "\n")
        return path


def load_wordpiece(path: str | Path) -> WordPieceTokenizer:
    """A WordPiece tokenizer from a tokenizer.json, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        doc = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"invalid JSON in {path}: {e}") from None
    return WordPieceTokenizer.from_json(doc, str(path))


# ---- helpers ----


def _encoding(pieces: list[tuple[int, str]], type_id: int) -> Encoding:
    return Encoding([i for i, _ in pieces], [type_id] * len(pieces), [t for _, t in pieces])


def _concat(a: Encoding, b: Encoding | None) -> Encoding:
    if b is None:
        return a
    return Encoding(a.ids + b.ids, a.type_ids + b.type_ids, a.tokens + b.tokens)


def _pad(encs: list[Encoding], p: Padding) -> None:
    n = max(len(e) for e in encs) if p.length is None else p.length
    if p.pad_to_multiple_of and n % p.pad_to_multiple_of:
        n += p.pad_to_multiple_of - n % p.pad_to_multiple_of
    for e in encs:
        e.pad(n, p)


def _is_word_char(c: str) -> bool:
    """`\\w` of Rust's regex crate: letters, digits, marks, connector punctuation, joiners."""
    return c.isalnum() or unicodedata.category(c)[0] == "M" or unicodedata.category(c) == "Pc" or c in "\u200c\u200d"


def _split_added(text: str, matcher: tuple[re.Pattern, dict[str, AddedToken]] | None
                 ) -> list[tuple[str, AddedToken | None]]:
    """Split text around added-token matches (`AddedVocabulary::find_matches`): single_word matches inside a word
    are skipped; lstrip/rstrip widen a match over the whitespace beside it. Empty pieces are dropped."""
    if matcher is None or not text:
        return [(text, None)] if text else []
    pattern, by_content = matcher
    out: list[tuple[str, AddedToken | None]] = []
    done = 0
    for m in pattern.finditer(text):
        start, stop = m.span()
        tok = by_content[m.group()]
        if tok.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                or (stop < len(text) and _is_word_char(text[stop]))):
            continue
        if tok.lstrip:
            while start > done and text[start - 1] in WHITESPACE:
                start -= 1
        if tok.rstrip:
            while stop < len(text) and text[stop] in WHITESPACE:
                stop += 1
        if done < start:
            out.append((text[done:start], None))
        out.append((text[start:stop], tok))
        done = stop
    if done < len(text):
        out.append((text[done:], None))
    return out


CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # tokenizers' decoders::wordpiece


def _cleanup(s: str) -> str:
    for old, new in CLEANUP:
        s = s.replace(old, new)
    return s


def _template_json(template: Template) -> list[dict[str, Any]]:
    return [{"Sequence": {"id": name[1], "type_id": t}} if name in ("$A", "$B")
            else {"SpecialToken": {"id": name, "type_id": t}} for name, t in template]


def _read_template(pieces: list[dict[str, Any]], source: str) -> Template:
    out: Template = []
    for piece in pieces:
        if "Sequence" in piece:
            out.append(("$" + piece["Sequence"]["id"], int(piece["Sequence"].get("type_id", 0))))
        elif "SpecialToken" in piece:
            out.append((piece["SpecialToken"]["id"], int(piece["SpecialToken"].get("type_id", 0))))
        else:
            raise LmforgeError(f"{source}: unsupported template piece {json.dumps(piece)[:80]}")
    return out


def _read_post_processor(pp: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """single/pair templates and special ids from TemplateProcessing, BertProcessing, or none at all ([])."""
    if pp is None:
        return {"single": [], "pair": [], "special_ids": {}}
    kind = pp.get("type")
    if kind == "TemplateProcessing":
        specials = {name: [int(i) for i in spec["ids"]] for name, spec in (pp.get("special_tokens") or {}).items()}
        return {"single": _read_template(pp.get("single") or [], source),
                "pair": _read_template(pp.get("pair") or [], source), "special_ids": specials}
    if kind == "BertProcessing":  # older files: {"cls": ["[CLS]", 101], "sep": ["[SEP]", 102]}
        (cls_tok, cls_id), (sep_tok, sep_id) = pp["cls"], pp["sep"]
        return {"single": [(cls_tok, 0), ("$A", 0), (sep_tok, 0)],
                "pair": [(cls_tok, 0), ("$A", 0), (sep_tok, 0), ("$B", 1), (sep_tok, 1)],
                "special_ids": {cls_tok: [cls_id], sep_tok: [sep_id]}}
    raise LmforgeError(f"{source}: unsupported post_processor {kind!r} (TemplateProcessing or BertProcessing)")


def _read_doc(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Constructor arguments from a tokenizer.json document; anything this tokenizer cannot reproduce is an error."""
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise LmforgeError(f"{source} is not a tokenizers document (no 'model')")
    model = doc["model"]
    if model.get("type") != "WordPiece":
        raise LmforgeError(f"{source} holds a {model.get('type')!r} model; load_wordpiece reads WordPiece")
    norm, pre = doc.get("normalizer"), doc.get("pre_tokenizer")
    if norm is not None and norm.get("type") != "BertNormalizer":
        raise LmforgeError(f"{source}: unsupported normalizer {norm.get('type')!r} (BertNormalizer or none)")
    if (pre or {}).get("type") != "BertPreTokenizer":
        raise LmforgeError(f"{source}: unsupported pre_tokenizer {json.dumps(pre)[:80]} (BertPreTokenizer)")
    decoder = doc.get("decoder") or {}
    if decoder and decoder.get("type") != "WordPiece":
        raise LmforgeError(f"{source}: unsupported decoder {decoder.get('type')!r} (WordPiece)")
    prefix = model.get("continuing_subword_prefix") or "##"
    if decoder and decoder.get("prefix", prefix) != prefix:
        raise LmforgeError(f"{source}: the decoder's prefix differs from the model's continuing_subword_prefix")
    norm = norm or {}
    args: dict[str, Any] = dict(
        vocab=model["vocab"], unk_token=model.get("unk_token", "[UNK]"), prefix=prefix,
        max_input_chars_per_word=model.get("max_input_chars_per_word", 100), normalizer=bool(norm),
        lowercase=norm.get("lowercase", True), strip_accents=norm.get("strip_accents"),
        clean_text=norm.get("clean_text", True), handle_chinese_chars=norm.get("handle_chinese_chars", True),
        added_tokens=[AddedToken(t["content"], t["id"], t.get("special", False), t.get("normalized", True),
                                 t.get("lstrip", False), t.get("rstrip", False), t.get("single_word", False))
                      for t in doc.get("added_tokens") or []],
        truncation=_read_truncation(doc.get("truncation"), source), padding=_read_padding(doc.get("padding"), source),
        decoder_cleanup=bool(decoder.get("cleanup", True)))
    args.update(_read_post_processor(doc.get("post_processor"), source))
    return args


def _read_truncation(t: dict[str, Any] | None, source: str) -> Truncation | None:
    if t is None:
        return None
    out = Truncation(int(t["max_length"]), t.get("strategy", "LongestFirst"), t.get("direction", "Right"),
                     int(t.get("stride", 0)))
    if out.strategy not in ("LongestFirst", "OnlyFirst", "OnlySecond") or out.direction not in ("Left", "Right"):
        raise LmforgeError(f"{source}: unsupported truncation {json.dumps(t)}")
    return out


def _read_padding(p: dict[str, Any] | None, source: str) -> Padding | None:
    if p is None:
        return None
    strategy = p.get("strategy", "BatchLongest")
    length = strategy.get("Fixed") if isinstance(strategy, dict) else None
    if (strategy != "BatchLongest" and length is None) or p.get("direction", "Right") not in ("Left", "Right"):
        raise LmforgeError(f"{source}: unsupported padding {json.dumps(p)}")
    return Padding(length, p.get("direction", "Right"), int(p.get("pad_id", 0)), int(p.get("pad_type_id", 0)),
                   p.get("pad_token", "[PAD]"), p.get("pad_to_multiple_of"))


