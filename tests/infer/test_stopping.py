"""StopChecker (stop strings across token boundaries, held-back bytes) and Utf8Stream (no split characters)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmforge.common import LmforgeError
from lmforge.infer.stopping import StopChecker, StopResult, Utf8Stream


class Vocab:
    """A toy vocabulary built on the fly: `ids(pieces)` adds each byte piece and returns its ids."""

    def __init__(self) -> None:
        self.token_bytes: list[bytes] = []

    def ids(self, pieces: list[bytes]) -> list[int]:
        out = []
        for piece in pieces:
            if piece not in self.token_bytes:
                self.token_bytes.append(piece)
            out.append(self.token_bytes.index(piece))
        return out


def run(stops, pieces: list[bytes], stop_token_ids=()) -> tuple[list[StopResult], bytes, StopChecker]:
    """Feed pieces until the checker stops; return the results, all emitted bytes (finish included), checker."""
    vocab = Vocab()
    ids = vocab.ids(pieces)
    checker = StopChecker(stops, vocab.token_bytes, [vocab.ids([b])[0] for b in stop_token_ids])
    results = []
    for i in ids:
        results.append(checker.feed(i))
        if results[-1].stopped:
            break
    return results, b"".join(r.emit for r in results) + checker.finish(), checker


def test_stop_string_split_across_two_and_three_tokens():
    results, out, _ = run(["world"], [b"Hello wo", b"rld", b"!!"])
    assert [r.emit for r in results] == [b"Hello ", b""]
    assert results[-1].stopped and results[-1].stop_reason == b"world" and out == b"Hello "

    results, out, _ = run(["world"], [b"Hello wo", b"rl", b"d!!", b"more"])
    assert [(r.stopped, r.emit) for r in results] == [(False, b"Hello "), (False, b""), (True, b"")]
    assert out == b"Hello "


def test_text_before_the_stop_in_the_same_token_is_emitted():
    results, out, _ = run(["STOP"], [b"abc", b"deSTOPfg"])
    assert [r.emit for r in results] == [b"abc", b"de"] and results[-1].stopped and out == b"abcde"


def test_stop_string_inside_multibyte_characters():
    # "é" is b"\xc3\xa9": the token boundary falls inside the character
    results, out, _ = run(["é"], [b"caf\xc3", b"\xa9 au lait"])
    assert [r.emit for r in results] == [b"caf", b""] and results[-1].stopped
    # "è" shares the first byte: the held \xc3 is released with its continuation
    results, out, _ = run(["é"], [b"caf\xc3", b"\xa8", b"!"])
    assert [r.emit for r in results] == [b"caf", b"\xc3\xa8", b"!"] and not results[-1].stopped
    # a 4-byte emoji stop string fed one byte per token
    emoji = "😀".encode()
    results, out, _ = run(["😀"], [b"hi "] + [emoji[i: i + 1] for i in range(4)] + [b"x"])
    assert [r.emit for r in results] == [b"hi ", b"", b"", b"", b""] and results[-1].stopped and out == b"hi "


def test_overlapping_candidates():
    # "ab" completes first: generation stops there, "abc" is never waited for
    results, out, _ = run(["abc", "ab"], [b"x", b"a", b"b", b"c"])
    assert results[-1].stopped and results[-1].stop_reason == b"ab" and out == b"x"
    # both end on the same byte: cut at the longer (earlier) one, whatever the list order
    for stops in (["abc", "bc"], ["bc", "abc"]):
        results, out, _ = run(stops, [b"a", b"b", b"c"])
        assert results[-1].stop_reason == b"abc" and out == b""
    # a stop string that completes earlier wins over a longer one that started earlier
    results, out, _ = run(["xyz", "y"], [b"x", b"y", b"z"])
    assert results[-1].stop_reason == b"y" and out == b"x"
    # ... even when one token completes both: the cut depends on the bytes, never on the tokenization
    for pieces in ([b"abc"], [b"a", b"bc"], [b"a", b"b", b"c"]):
        results, out, _ = run(["abc", "b"], pieces)
        assert results[-1].stop_reason == b"b" and out == b"a"


def test_held_back_bytes_released_when_the_candidate_fails():
    results, out, _ = run(["</s>"], [b"a<", b"/", b"x", b"<"])
    assert [r.emit for r in results] == [b"a", b"", b"</x", b""]
    assert out == b"a</x<"  # finish releases the last held "<"
    # the held part shrinks to the next viable prefix, not all or nothing: "aab" held "aa", then "aaa" -> "aa"
    results, _, _ = run(["aab"], [b"a", b"a", b"a", b"c"])
    assert [r.emit for r in results] == [b"", b"", b"a", b"aac"]


def test_stop_token_ids():
    results, out, checker = run(["</s>"], [b"hi <", b"<eos>", b"after"], stop_token_ids=[b"<eos>"])
    assert [r.emit for r in results] == [b"hi ", b"<"]  # the stream ended: held bytes are final
    assert results[-1].stopped and checker.stop_reason == 1 and out == b"hi <"  # the stop token's bytes dropped


def test_feed_after_stop_and_finish():
    vocab = Vocab()
    a, s = vocab.ids([b"a", b"S"])
    checker = StopChecker(["S"], vocab.token_bytes)
    assert checker.feed(a) == StopResult(False, b"a")
    assert checker.feed(s) == StopResult(True, b"", b"S")
    assert checker.feed(a) == StopResult(True, b"", b"S")  # batched decoding keeps feeding finished rows
    assert checker.finish() == b""
    with pytest.raises(RuntimeError):
        checker.feed(a)


def test_no_stop_strings_streams_everything_and_bad_input():
    vocab = Vocab()
    checker = StopChecker([], vocab.token_bytes, [])
    (i,) = vocab.ids([b"\xf0\x9f"])
    assert checker.feed(i) == StopResult(False, b"\xf0\x9f")
    with pytest.raises(ValueError):
        checker.feed(len(vocab.token_bytes))
    with pytest.raises(LmforgeError):
        StopChecker([""], vocab.token_bytes)


# --- property test against a reference on the whole text -----------------------------------------------------

def first_occurrence_cut(full: bytes, stops: list[bytes]) -> int | None:
    """The simple reference: cut at the first occurrence of any stop string (None: no stop string occurs)."""
    found = [full.find(s) for s in stops if s in full]
    return min(found) if found else None


def first_completion_cut(full: bytes, stops: list[bytes]) -> int | None:
    """Streaming reference: the first end position where a stop string is complete; cut at the longest there.

    Equals `first_occurrence_cut` unless one stop string contains another (then generation halts at the
    inner one before the outer could complete).
    """
    for end in range(1, len(full) + 1):
        done = [len(s) for s in stops if full[:end].endswith(s)]
        if done:
            return end - max(done)
    return None


def longest_held(text: bytes, stops: list[bytes]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


PIECES = [b"a", b"b", b"c", b"ab", b"ba", b"abc", b"\xc3", b"\xa9", b"\xc3\xa9", "😀".encode()[:2],
          "😀".encode()[2:], b" "]
STOP_STRINGS = st.lists(st.sampled_from([b"a", b"ab", b"abc", b"bca", b"cc", b"aab", b"ba", "é".encode(),
                                         "😀".encode(), b"b\xc3", b" a", b"abab"]), max_size=3)


@settings(max_examples=500, deadline=None)
@example(tokens=[b"ab", b"ab"], stops=[b"abab", b"ba"])  # "ba" completes inside the token that completes "abab"
@given(tokens=st.lists(st.sampled_from(PIECES), max_size=25), stops=STOP_STRINGS)
def test_emitted_bytes_equal_full_text_cut_at_the_first_stop(tokens, stops):
    full = b"".join(tokens)
    expected_cut = first_completion_cut(full, stops)
    if not any(a != b and a in b for a, b in itertools.permutations(stops, 2)):
        assert expected_cut == first_occurrence_cut(full, stops)

    vocab = Vocab()
    checker = StopChecker(stops, vocab.token_bytes)
    emitted, seen = b"", b""
    for i in vocab.ids(tokens):
        result = checker.feed(i)
        emitted += result.emit
        seen += vocab.token_bytes[i]
        if result.stopped:
            break
        # everything is released as early as possible: only a possible stop-string start is held back
        assert emitted == seen[: len(seen) - longest_held(seen, stops)]
    emitted += checker.finish()

    if expected_cut is None:
        assert not checker.stopped and emitted == full
    else:
        assert checker.stopped and emitted == full[:expected_cut]
        assert full[expected_cut:].startswith(checker.stop_reason)


# --- Utf8Stream ------------------------------------------------------------------------------------------------

def decode_in_chunks(chunks: list[bytes]) -> list[str]:
    stream = Utf8Stream()
    return [stream.feed(c) for c in chunks] + [stream.finish()]


def splits(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def test_emoji_split_at_every_byte_position():
    text = "a😀é"
    data = text.encode()
    for n in range(len(data)):
        for cuts in itertools.combinations(range(1, len(data)), n):
            out = decode_in_chunks(splits(data, cuts))
            assert "".join(out) == text and "\ufffd" not in "".join(out)


def test_partial_character_is_held_until_complete():
    emoji = "😀".encode()
    stream = Utf8Stream()
    assert [stream.feed(emoji[i: i + 1]) for i in range(4)] == ["", "", "", "😀"]
    assert stream.finish() == ""


def test_invalid_bytes_become_replacement_characters():
    stream = Utf8Stream()
    assert stream.feed(b"ok\xff") == "ok\ufffd"  # \xff can never be valid: replaced at once
    assert stream.feed(b"\xf0\x9f") == ""  # could still become an emoji
    assert stream.feed(b"A") == "\ufffdA"  # now it cannot
    assert stream.feed(b"\xe2\x82") == ""
    assert stream.finish() == "\ufffd"  # incomplete at the end


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40) | st.text(max_size=15).map(str.encode), cuts=st.lists(st.integers(0, 40)))
def test_any_split_decodes_like_the_whole(data, cuts):
    chunks = splits(data, tuple(sorted(c for c in cuts if c <= len(data))))
    assert "".join(decode_in_chunks(chunks)) == data.decode("utf-8", errors="replace")
