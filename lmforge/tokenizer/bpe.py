"""Byte-level BPE: encode / decode with safe special-token handling.

A vocabulary is a list `tokens[id] = bytes` (every single byte is a token) plus a merge rule:
  - `merges` given (HF / lmforge-trained): merge the adjacent pair with the lowest merge rank;
  - `merges=None` (tiktoken rank files): merge the adjacent pair whose concatenation has the lowest rank.
Both apply leftmost-first on ties. The compiled core (`_bpe.c`) does the same work fast; the methods
ending in `_py` here are the readable reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

import regex

from lmforge.common import LmforgeError, cpu_count
from lmforge.tokenizer import pretokenize

try:  # the compiled core is optional: without it everything runs on the reference path
    from lmforge.tokenizer import _bpe
except ImportError:  # pragma: no cover - exercised only where the C build failed
    _bpe = None

AllowedSpecial = Literal["all"] | Collection[str]
Backend = Literal["auto", "c", "python"]


def has_compiled_core() -> bool:
    return _bpe is not None


class BPETokenizer:
    """A byte-level BPE tokenizer: `encode(str) -> ids`, `decode(ids) -> str`, `decode_bytes` exact.

    Special tokens are control tokens only where the caller allows them (`allowed_special`); by default
    their text inside user input encodes as ordinary text, so a user cannot inject `<|endoftext|>`.
    """

    def __init__(
        self,
        tokens: list[bytes | None],
        merges: list[tuple[int, int]] | None,
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        *,
        ignore_merges: bool = False,
        add_prefix_space: bool = False,
        normalizer: str | None = None,
        backend: Backend = "auto",
    ) -> None:
        self.tokens = tokens
        self.merges = merges
        self.pattern = pretokenize.resolve_pattern(pattern)
        self.special_tokens = dict(special_tokens or {})
        self.ignore_merges = ignore_merges or merges is None  # tiktoken looks whole pieces up first
        self.add_prefix_space = add_prefix_space
        if normalizer not in (None, "NFC"):
            raise LmforgeError(f"unsupported normalizer {normalizer!r} (supported: none, NFC)")
        self.normalizer = normalizer
        self._token_id = {b: i for i, b in enumerate(tokens) if b is not None}
        if len(self._token_id) != sum(b is not None for b in tokens):
            raise LmforgeError("vocabulary has duplicate tokens")
        # A byte without a token (real vocabularies such as SmolLM2's lack bytes that never occur in UTF-8 text)
        # is dropped from the input, as HF tokenizers and llama.cpp do; -1 marks it.
        self._byte_id = [self._token_id.get(bytes([b]), -1) for b in range(256)]
        self._pair_rank: dict[tuple[int, int], tuple[int, int]] = {}
        pairs_c = None
        if merges is not None:
            pairs_c = []
            for rank, (a, b) in enumerate(merges):
                if not (0 <= a < len(tokens) and 0 <= b < len(tokens)) or tokens[a] is None or tokens[b] is None:
                    raise LmforgeError(f"merge {rank} refers to a token id that does not exist: ({a}, {b})")
                merged = self._token_id.get(tokens[a] + tokens[b])
                if merged is None:
                    raise LmforgeError(f"merge {rank} ({tokens[a]!r} + {tokens[b]!r}) builds no token in the vocab")
                if (a, b) not in self._pair_rank:
                    self._pair_rank[(a, b)] = (rank, merged)
                    pairs_c.append((a, b, rank, merged))
        for text, i in self.special_tokens.items():
            if not text:
                raise LmforgeError("special tokens must be non-empty strings")
            if i < len(tokens) and tokens[i] is not None:
                raise LmforgeError(f"special token {text!r} reuses id {i} of an ordinary token")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise LmforgeError("two special tokens share one id")
        self._id_bytes: dict[int, bytes] = {i: b for i, b in enumerate(tokens) if b is not None}
        self._id_bytes.update({i: t.encode("utf-8") for t, i in self.special_tokens.items()})
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self._kind = pretokenize.scanner_kind(self.pattern)
        if backend == "c" and _bpe is None:
            raise LmforgeError("the compiled tokenizer core is not built; reinstall with `pip install -e .`")
        self.backend = "python" if backend == "python" or _bpe is None else "c"
        self._core = None
        if self.backend == "c":
            specials = [(i, t.encode("utf-8")) for t, i in self.special_tokens.items()]
            self._core = _bpe.Encoder(tokens, pairs_c, self._kind, self.ignore_merges, specials)

    # ------------------------------------------------------------------ sizes and lookups
    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), ordinary and special."""
        return max(len(self.tokens), max(self.special_tokens.values(), default=-1) + 1)

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._id_bytes[token_id]
        except KeyError:
            raise LmforgeError(f"token id {token_id} is out of range (vocabulary has {self.vocab_size} ids)") from None

    def vocab_bytes(self, size: int | None = None) -> list[bytes]:
        """Every id's bytes, specials included (b"" for an id with none), padded to `size`: the vocabulary
        as `infer` sees it (stop strings, constrained decoding) without the tokenizer itself."""
        size = self.vocab_size if size is None else size
        return [self._id_bytes.get(i, b"") for i in range(size)]

    def token_to_id(self, token: bytes | str) -> int | None:
        """Id of an ordinary token (bytes) or a special token (str)."""
        if isinstance(token, str):
            return self.special_tokens.get(token)
        return self._token_id.get(token)

    def with_backend(self, backend: Backend) -> BPETokenizer:
        """The same tokenizer on another backend (tests compare them)."""
        return BPETokenizer(self.tokens, self.merges, self.pattern, self.special_tokens,
                            ignore_merges=self.ignore_merges, add_prefix_space=self.add_prefix_space,
                            normalizer=self.normalizer, backend=backend)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`. Special-token text is a control token only if listed in `allowed_special`."""
        if not isinstance(text, str):
            raise LmforgeError(f"encode() takes str, got {type(text).__name__} (use encode_bytes for bytes)")
        ids: list[int] = []
        for segment, special_id in self._split_specials(text, allowed_special):
            if special_id is not None:
                ids.append(special_id)
            else:
                ids.extend(self._encode_ordinary(segment))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (invalid UTF-8 included); `decode_bytes` gives `data` back exactly."""
        data = bytes(data)
        if self.add_prefix_space and data and not data.startswith(b" "):
            data = b" " + data
        if self._core is not None and self._kind:
            return self._core.encode_bytes(data)
        return self._encode_pieces(pretokenize.split_bytes(data, self.pattern))

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = (),
                     num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts, in parallel threads when the compiled core is available."""
        texts = list(texts)
        nthreads = num_threads or cpu_count()
        if self._core is None or not self._kind or self.normalizer or self.add_prefix_space:
            return [self.encode(t, allowed_special) for t in texts]
        if allowed_special:
            return self._encode_batch_special(texts, allowed_special, nthreads)
        try:
            return self._core.encode_batch(texts, nthreads)
        except UnicodeEncodeError:
            return self._core.encode_batch([_fix_surrogates(t) for t in texts], nthreads)

    def _encode_batch_special(self, texts: list[str], allowed: AllowedSpecial, nthreads: int) -> list[list[int]]:
        """Split every text on its allowed specials, encode all ordinary segments in one batch, regroup."""
        plan = [list(self._split_specials(t, allowed)) for t in texts]
        segments = [_fix_surrogates(s) for p in plan for s, sid in p if sid is None]
        encoded = iter(self._core.encode_batch(segments, nthreads))
        out = []
        for p in plan:
            ids: list[int] = []
            for _, sid in p:
                if sid is None:
                    ids.extend(next(encoded))
                else:
                    ids.append(sid)
            out.append(ids)
        return out

    def _encode_ordinary(self, text: str) -> list[int]:
        if self.normalizer == "NFC":
            import unicodedata

            text = unicodedata.normalize("NFC", text)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        if self._core is not None and self._kind:
            try:
                return self._core.encode(text)
            except UnicodeEncodeError:
                return self._core.encode(_fix_surrogates(text))
        text = _fix_surrogates(text)
        return self._encode_pieces([p.encode("utf-8") for p in pretokenize.split(text, self.pattern)])

    def _encode_pieces(self, pieces: list[bytes]) -> list[int]:
        if self._core is not None:
            return self._core.encode_pieces(pieces)
        ids: list[int] = []
        for piece in pieces:
            ids.extend(self.encode_piece_py(piece))
        return ids

    def _split_specials(self, text: str, allowed: AllowedSpecial):
        """Yield (segment, None) for ordinary text and (text, id) for each allowed special token."""
        if not allowed or not self.special_tokens:
            yield text, None
            return
        names = self.special_tokens.keys() if allowed == "all" else allowed
        unknown = [s for s in names if s not in self.special_tokens]
        if unknown:
            raise LmforgeError(f"allowed_special names unknown special token(s): {unknown}")
        alternation = "|".join(regex.escape(s) for s in sorted(names, key=len, reverse=True))
        pos = 0
        for m in regex.finditer(alternation, text):
            if m.start() > pos:
                yield text[pos : m.start()], None
            yield m.group(), self.special_tokens[m.group()]
            pos = m.end()
        if pos < len(text):
            yield text[pos:], None

    # ------------------------------------------------------------------ the reference merge engine
    def encode_piece_py(self, piece: bytes) -> list[int]:
        """Reference BPE on one pre-tokenized piece: join the lowest-ranked adjacent pair until none is left."""
        if self.ignore_merges and piece in self._token_id:
            return [self._token_id[piece]]
        ids = [self._byte_id[b] for b in piece if self._byte_id[b] >= 0]
        while len(ids) > 1:
            best = None  # (rank, position, merged id)
            for k in range(len(ids) - 1):
                found = self._rank(ids[k], ids[k + 1])
                if found is not None and (best is None or found[0] < best[0]):
                    best = (found[0], k, found[1])
            if best is None:
                break
            _, k, merged = best
            ids[k : k + 2] = [merged]
        return ids

    def _rank(self, a: int, b: int) -> tuple[int, int] | None:
        if self.merges is not None:
            return self._pair_rank.get((a, b))
        joined = self._token_id.get(self.tokens[a] + self.tokens[b])
        return None if joined is None else (joined, joined)

    # ------------------------------------------------------------------ decode
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (may be invalid UTF-8 when a character is split across ids)."""
        ids = list(ids)
        if self._core is not None:
            try:
                return self._core.decode_bytes(ids)
            except (ValueError, OverflowError, TypeError) as e:
                raise LmforgeError(f"cannot decode: {e}") from None
        out = []
        for i in ids:
            if not isinstance(i, int) or i not in self._id_bytes:
                raise LmforgeError(f"cannot decode: token id {i} is out of range (vocab has {self.vocab_size} ids)")
            out.append(self._id_bytes[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD (as in HF and tiktoken)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def save(self, out_dir) -> None:
        """Write tokenizer.json + tokenizer_config.json (HF format) into `out_dir`."""
        from lmforge.tokenizer.formats import save_tokenizer

        save_tokenizer(self, out_dir)

    def __repr__(self) -> str:
        name = pretokenize.pattern_name(self.pattern) or "custom"
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={name}, specials={len(self.special_tokens)}, "
                f"backend={self.backend})")


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8: replace them with U+FFFD and join valid pairs (as tiktoken does)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
