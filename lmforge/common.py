"""Shared plumbing every stage may use: user-facing errors, atomic writes, seeding, device pick.

This module sits at the bottom of the import graph; it imports nothing from lmforge. Heavy
libraries (torch) are imported inside functions so `lmforge tokenizer ...` starts fast.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class LmforgeError(Exception):
    """A problem the user can fix (bad input, missing file, bad config): printed as one line, exit code 2."""


def require(module: str, pip_name: str | None = None, extra: str | None = None):
    """Import an optional dependency or raise an LmforgeError naming the pip command that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install 'lmforge[{extra}]'" if extra else f"pip install {pip_name or module}"
        raise LmforgeError(f"optional dependency '{module}' is missing ({e}); fix: {hint}") from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path` (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, turning the usual failures into one-line LmforgeErrors."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"file not found: {path}")
    if path.is_dir():
        raise LmforgeError(f"expected a file, got a directory: {path}")
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None


def list_files(paths: Iterable[str | Path], glob: str = "*") -> list[Path]:
    """Files named by `paths`, with directories expanded recursively (sorted, hidden entries skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and fnmatch.fnmatch(f.name, glob)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise LmforgeError(f"no files matching {glob!r} under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LmforgeError(f"input not found: {p}")
    return files


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (if installed) for reproducible runs."""
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)


def pick_device(requested: str | None = None) -> str:
    """'cuda' when available (or asked for), else 'mps', else 'cpu'; a request for a missing device is an error."""
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise LmforgeError(f"device '{requested}' requested but CUDA is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    """bf16 on GPUs that support it, fp32 on CPU unless asked otherwise."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if requested:
        if requested not in names:
            raise LmforgeError(f"unknown dtype '{requested}'; choose one of {sorted(names)}")
        return names[requested]
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
