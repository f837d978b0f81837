"""Stop strings across token boundaries, and UTF-8 decoding that never splits a character.

`infer` never sees the tokenizer: the vocabulary arrives as bytes (`token_bytes[id]`), so stop strings are
matched on bytes. A stop string can span several tokens and even start or end inside a multi-byte character,
so text is streamed in two stages, as vLLM's detokenizer and HF's TextStreamer do:

    ids -> StopChecker (bytes safe to show: never the start of a possible stop string) -> Utf8Stream -> text
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmforge.common import LmforgeError


@dataclass(frozen=True)
class StopResult:
    """What one `StopChecker.feed` decided.

    `emit`: bytes now safe to show (may be empty); `stopped`: generation is over; `stop_reason`: the stop string
    (as bytes) or stop token id that ended it, like vLLM's `stop_reason`.
    """

    stopped: bool
    emit: bytes
    stop_reason: bytes | int | None = None


class StopChecker:
    """Watch one sequence's generated ids for stop strings and stop token ids; say which bytes may be streamed.

    OpenAI semantics: the output ends just before the stop string, which is not included; a stop token's
    own bytes are not included either. Generation halts at the first point where a stop string is complete,
    so that is where the cut is made; if several stop strings end there, the cut is at the longest (the one
    starting earliest), so the order of `stop_strings` never matters. A stop string is only reported
    complete, never predicted: "xyz" cannot win over "y" on "xy..." because generation stops at the "y".

    Bytes that could still be the start of a stop string are held back (the longest suffix of the text that
    is a proper prefix of some stop string) and released as soon as the candidate fails; `finish` releases
    them at the end of generation. Work per token is bounded by the stop strings' lengths, not the text's.
    """

    def __init__(self, stop_strings: Iterable[bytes | str], token_bytes: Sequence[bytes],
                 stop_token_ids: Iterable[int] = ()) -> None:
        self.stops = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in stop_strings]
        if any(not s for s in self.stops):
            raise LmforgeError("stop strings must not be empty")
        self.token_bytes = token_bytes
        self.stop_token_ids = frozenset(stop_token_ids)
        # every proper prefix of every stop string: a held-back suffix must be one of these
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._held = b""
        self.stopped = False
        self.stop_reason: bytes | int | None = None
        self._finished = False

    def feed(self, token_id: int) -> StopResult:
        """Add one generated id; return the bytes that became safe to show and whether generation is over.

        Feeding after a stop is harmless (batched decoding keeps producing ids for finished rows): it returns
        stopped with nothing to emit.
        """
        if self._finished:
            raise RuntimeError("StopChecker.feed after finish()")
        if self.stopped:
            return StopResult(True, b"", self.stop_reason)
        if token_id in self.stop_token_ids:
            # the stream ends here, so nothing held can become a stop string any more: release it
            emit, self._held = self._held, b""
            return self._stop(emit, token_id)
        if not 0 <= token_id < len(self.token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self.token_bytes) - 1})")
        text = self._held + self.token_bytes[token_id]
        cut = self._first_stop(text)
        if cut is not None:
            self._held = b""
            return self._stop(text[:cut[0]], cut[1])
        hold = self._held_suffix(text)
        self._held = text[len(text) - hold:] if hold else b""
        return StopResult(False, text[:len(text) - hold])

    def finish(self) -> bytes:
        """End of generation (length limit, EOS handled by the caller): the held-back bytes, now final."""
        self._finished = True
        held, self._held = self._held, b""
        return held

    def _stop(self, emit: bytes, reason: bytes | int) -> StopResult:
        self.stopped, self.stop_reason = True, reason
        return StopResult(True, emit, reason)

    def _first_stop(self, text: bytes) -> tuple[int, bytes] | None:
        """(start, stop string) of the stop string that completes first in `text`, the longest on a tie.

        No match can start before the held part (it would have made a longer held prefix), so searching
        held + new bytes sees every match that this token completes.
        """
        best: tuple[int, int, bytes] | None = None  # (end, start, stop)
        for s in self.stops:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        return None if best is None else (best[1], best[2])

    def _held_suffix(self, text: bytes) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string (0 if none)."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0


class Utf8Stream:
    """Turn a byte stream into text chunks without ever splitting a multi-byte character.

    A trailing incomplete sequence is held until its next byte arrives; bytes that can no longer become valid
    UTF-8 are replaced by U+FFFD as soon as that is certain, and an incomplete tail by U+FFFD at `finish`.
    The chunks joined equal `data.decode("utf-8", "replace")` of all the bytes, however they were split.
    This is the standard library's incremental decoder (maximal-subpart replacement, as Unicode recommends).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """The text that `data` completes (possibly empty)."""
        return self._decoder.decode(data, final=False)

    def finish(self) -> str:
        """Flush the end of the stream: an incomplete trailing sequence becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)
