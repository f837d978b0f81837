"""Read training documents from text, JSON Lines and Parquet files, lazily, one document at a time.

What counts as a document:
  - any file that is not .jsonl / .parquet (.txt, .md, .py, ...): the whole file is one document, so a
    book or a source file keeps its paragraphs together; read as UTF-8 with errors="replace";
  - .jsonl: one JSON object per line, the document is its `text_field` (default "text"); blank lines and
    null values are skipped; a line that is not a JSON object with a string there is an error naming file:line;
  - .parquet: one document per row of the `text_field` column (needs `pip install pyarrow`);
  - a `str` item of `inputs` is itself one document (as in `train_bpe`: `str` = text, `Path` = file).
Directories are searched recursively for files matching `glob`, in sorted order; hidden files and
directories (names starting with ".") are skipped. Empty documents are skipped: they carry no tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.common import LmforgeError, list_files, require

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class Corpus:
    """A re-iterable stream of documents from files and in-memory texts; `nbytes` is the input size in bytes.

    Files are listed (and checked to exist) up front, but read only while iterating, one document at a time.
    """

    def __init__(self, inputs: Iterable[str | Path], text_field: str = "text", glob: str = "*") -> None:
        if isinstance(inputs, str):  # list("corpus.txt") would make one document per character
            raise LmforgeError("inputs must be a list: [Path(...)] for files or directories, [text] for a text")
        inputs = [inputs] if isinstance(inputs, Path) else list(inputs)
        if not inputs:
            raise LmforgeError("no inputs given: pass files, directories or texts")
        bad = [x for x in inputs if not isinstance(x, (str, Path))]
        if bad:
            raise LmforgeError(f"inputs must be str (a text) or Path (a file or directory), "
                               f"got {type(bad[0]).__name__}")
        self.texts = [x for x in inputs if isinstance(x, str)]
        self.paths = [x for x in inputs if isinstance(x, Path)]
        self.files = list_files(self.paths, glob)
        self.text_field = text_field
        self.nbytes = sum(f.stat().st_size for f in self.files) + sum(len(_utf8(t)) for t in self.texts)

    def sources(self) -> list[str]:
        """What the corpus was made of, for metadata: the paths as given, and a count of in-memory texts."""
        out = [str(p) for p in self.paths]
        if self.texts:
            out.append(f"<{len(self.texts)} in-memory text{'s' if len(self.texts) != 1 else ''}>")
        return out

    def iter_with_size(self) -> Iterator[tuple[str, int]]:
        """(document, bytes of input it used up): the sizes add up to about `nbytes`, for a progress bar."""
        n_docs = 0
        for text in self.texts:
            if text:
                n_docs += 1
                yield text, len(_utf8(text))
        for path in self.files:
            for text, size in read_file(path, self.text_field):
                n_docs += 1
                yield text, size
        if n_docs == 0:
            raise LmforgeError("the corpus is empty: no non-empty documents in " + ", ".join(self.sources()))

    def __iter__(self) -> Iterator[str]:
        for text, _ in self.iter_with_size():
            yield text


def read_documents(inputs: Iterable[str | Path], text_field: str = "text", glob: str = "*") -> Iterator[str]:
    """The documents of `inputs` (files, directories, texts), lazily; an empty corpus is an error."""
    return iter(Corpus(inputs, text_field, glob))


def read_file(path: Path, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document, bytes used) of one file, chosen by its suffix; empty documents are skipped."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _read_parquet(path, text_field)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
        if data:
            yield data.decode("utf-8", errors="replace"), len(data)


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    pending = 0  # bytes of skipped lines, credited to the next document so progress still adds up
    try:
        f = path.open("rb")
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            pending += len(raw)
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise LmforgeError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise LmforgeError(f"{path}:{lineno}: no field {text_field!r} (fields: {', '.join(record) or 'none'}); "
                                   "choose the text field with text_field / --text-field")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise LmforgeError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            if text:
                yield text, pending
                pending = 0


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    require("pyarrow", "pyarrow")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise LmforgeError(f"cannot read {path} as Parquet: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise LmforgeError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                           "choose the text column with text_field / --text-field")
    size, total_rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    rows_done = used = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            rows_done += 1
            if isinstance(text, bytes):  # a binary column: decode like the text files
                text = text.decode("utf-8", errors="replace")
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise LmforgeError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            share = size * rows_done // total_rows  # input bytes are spread evenly over rows
            yield text, share - used
            used = share


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="replace")  # lone surrogates in a str input become "?"
