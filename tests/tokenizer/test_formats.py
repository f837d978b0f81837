"""Formats against the real references in-process: HF `tokenizers` and `tiktoken` give identical ids."""

import json
import random

import pytest

from lmforge.common import LmforgeError
from lmforge.tokenizer import load_tiktoken, load_tokenizer, save_tiktoken, save_tokenizer

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_pair(trained, tmp_path_factory):
    """pattern -> (ours reloaded from our tokenizer.json, HF tokenizers loading the same file)."""
    out = {}
    for pattern in ("gpt2", "gpt4", "o200k"):
        d = tmp_path_factory.mktemp(f"tok_{pattern}")
        save_tokenizer(trained[pattern], d)
        out[pattern] = (load_tokenizer(d), tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")))
    return out


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "o200k"])
def test_our_tokenizer_json_matches_hf_tokenizers(hf_pair, trained, strings, pattern):
    ours, hf = hf_pair[pattern]
    assert len(strings) >= 2000
    assert ours.tokens == trained[pattern].tokens and ours.merges == trained[pattern].merges
    hf_ids = [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]
    for s, ref in zip(strings, hf_ids):
        assert ours.encode(s, allowed_special="all") == ref, s  # HF matches added tokens in input by default
    hf.encode_special_tokens = True  # HF's switch for "special-token text is ordinary text"
    for s in strings:
        if "<|" in s:
            assert ours.encode(s) == hf.encode(s, add_special_tokens=False).ids, s


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_decode_matches_hf_including_invalid_utf8(hf_pair, pattern):
    """Random id sequences split characters mid-way: our bytes are exact and our text equals HF's."""
    ours, hf = hf_pair[pattern]
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert ours.decode_bytes(ids) == b"".join(ours.token_bytes(i) for i in ids)


def test_we_load_what_hf_trains(train_text, strings, tmp_path):
    """A tokenizer.json written by HF's own trainer loads in lmforge and encodes identically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([train_text], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert ours.special_tokens == {"<|endoftext|>": 0}
    for s in strings:
        assert ours.encode(s, allowed_special="all") == hf.encode(s).ids, s


def test_we_load_llama3_style_split_with_ignore_merges(train_text, strings, tmp_path, trained):
    """Sequence[Split(regex), ByteLevel(use_regex=false)] + ignore_merges, as Llama 3 ships it."""
    from lmforge.tokenizer import tokenizer_json

    doc = tokenizer_json(trained["gpt4"])
    doc["model"]["ignore_merges"] = True
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    ours, hf = load_tokenizer(path), tokenizers.Tokenizer.from_file(str(path))
    assert ours.ignore_merges
    for s in strings[:800]:
        assert ours.encode(s, allowed_special="all") == hf.encode(s).ids, s


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base", "r50k_base", "p50k_base"])
def test_real_encodings_match_tiktoken(tiktoken_mod, strings, name):
    ours = load_tokenizer(name)
    ref = tiktoken_mod.get_encoding(name)
    assert ours.vocab_size == ref.n_vocab
    assert ours.encode_batch(strings) == ref.encode_ordinary_batch(strings)
    for s in strings:
        assert ours.encode(s) == ref.encode_ordinary(s), s
        assert ours.encode(s, allowed_special="all") == ref.encode(s, allowed_special="all"), s
    ids = ref.encode_ordinary("".join(strings[:50]))
    assert ours.decode_bytes(ids) == ref.decode_bytes(ids)


def test_tiktoken_handles_surrogates_like_us(tiktoken_mod):
    ours, ref = load_tokenizer("cl100k_base"), tiktoken_mod.get_encoding("cl100k_base")
    for s in ["\ud83d\ude00 paired", "lone \ud800 high", "\udfff"]:
        assert ours.encode(s) == ref.encode(s)


def test_our_rank_file_runs_in_tiktoken(trained, strings, tiktoken_mod, tmp_path):
    """save_tiktoken output + our pattern drives real tiktoken to our ids."""
    from tiktoken.load import load_tiktoken_bpe

    tok = trained["gpt4"]
    path = save_tiktoken(tok, tmp_path / "ours.tiktoken")
    enc = tiktoken_mod.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                special_tokens=tok.special_tokens)
    reloaded = load_tiktoken(path, pattern="gpt4", special_tokens=tok.special_tokens)
    for s in strings:
        assert enc.encode_ordinary(s) == tok.encode(s) == reloaded.encode(s), s


# ---------------------------------------------------------------------- bad files

def test_corrupt_tokenizer_json(tmp_path, trained):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\x00\xff{not json")
    with pytest.raises(LmforgeError, match="corrupt or not JSON"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(LmforgeError, match="not a BPE"):
        load_tokenizer(bad)
    save_tokenizer(trained["gpt2"], tmp_path)
    doc = json.loads(bad.read_text())
    doc["model"]["merges"][3] = "Ġzzz qqq"
    bad.write_text(json.dumps(doc))
    with pytest.raises(LmforgeError, match="merge 3"):
        load_tokenizer(bad)
    bad.write_text(bad.read_text()[: len(bad.read_text()) // 2])  # truncated
    with pytest.raises(LmforgeError, match="corrupt"):
        load_tokenizer(bad)
    with pytest.raises(LmforgeError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(LmforgeError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "sub" if (tmp_path / "sub").mkdir() is None else None)


def test_corrupt_rank_file(tmp_path):
    path = tmp_path / "x.tiktoken"
    path.write_text("".join(f"{__import__('base64').b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    assert load_tiktoken(path, pattern="gpt2").encode("hi") == [104, 105]
    with pytest.raises(LmforgeError, match="pass the split pattern"):
        load_tiktoken(path)
    path.write_text(path.read_text() + "!!notbase64!! 300\n")
    with pytest.raises(LmforgeError, match=r"x.tiktoken:257: corrupt"):
        load_tiktoken(path, pattern="gpt2")
    path.write_text("")
    with pytest.raises(LmforgeError, match="empty"):
        load_tiktoken(path, pattern="gpt2")
    with pytest.raises(LmforgeError, match="unknown encoding|not found"):
        load_tokenizer("cl999k_base")


def test_public_rank_file_is_recognised_by_hash(tiktoken_mod):
    from lmforge import assets

    tok = load_tiktoken(assets.tiktoken_file("cl100k_base"))  # no pattern given: known by its sha256
    assert tok.special_tokens["<|endoftext|>"] == 100257
    assert tok.encode("hello  world\n ") == tiktoken_mod.get_encoding("cl100k_base").encode("hello  world\n ")


def test_special_tokens_keep_their_ids_in_hf_tokenizers(tmp_path):
    """Specials that are not the last ids (real vocabularies put them first) keep their ids through tokenizer.json."""
    from tokenizers import Tokenizer

    from lmforge.tokenizer import BPETokenizer
    from lmforge.tokenizer.formats import load_tokenizer_json, save_tokenizer

    tokens = [None, None, *[bytes([b]) for b in range(256)], b"ab"]  # ids 0 and 1: specials
    tok = BPETokenizer(tokens, [(2 + ord("a"), 2 + ord("b"))], "gpt2", {"<|im_start|>": 0, "<|im_end|>": 1})
    path = save_tokenizer(tok, tmp_path)
    hf = Tokenizer.from_file(str(path))
    assert hf.token_to_id("<|im_start|>") == 0 and hf.token_to_id("<|im_end|>") == 1
    text = "<|im_start|>ab<|im_end|>"
    assert hf.encode(text).ids == tok.encode(text, allowed_special="all") == [0, 258, 1]
    back = load_tokenizer_json(path)
    assert back.special_tokens == tok.special_tokens and back.encode(text, allowed_special="all") == [0, 258, 1]
