"""Document readers: what a document is for each file type, laziness, and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmforge.common import LmforgeError
from lmforge.data.sources import Corpus, list_files, read_documents


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_file_is_one_document_and_bad_utf8_is_replaced(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"first paragraph\n\nsecond paragraph \xff end\n")
    assert list(read_documents([f])) == ["first paragraph\n\nsecond paragraph \ufffd end\n"]


def test_strings_are_documents_and_empty_ones_are_skipped():
    assert list(read_documents(["one", "", "two"])) == ["one", "two"]


def test_directories_expand_recursively_sorted_with_glob_and_skip_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / "notes.md").write_text("markdown")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "x.txt").write_text("git object")
    assert list(read_documents([tmp_path], glob="*.txt")) == ["one", "two"]
    assert [p.name for p in list_files([tmp_path])] == ["1.txt", "2.txt", "notes.md"]
    with pytest.raises(LmforgeError, match="no files matching"):
        list_files([tmp_path], glob="*.csv")


def test_missing_input_and_no_inputs(tmp_path):
    with pytest.raises(LmforgeError, match="input not found"):
        Corpus([tmp_path / "nope.txt"])
    with pytest.raises(LmforgeError, match="no inputs"):
        Corpus([])
    with pytest.raises(LmforgeError, match="must be str"):
        Corpus([b"bytes"])
    with pytest.raises(LmforgeError, match="must be a list"):
        Corpus("corpus.txt")
    (tmp_path / "a.txt").write_text("one file")
    assert list(Corpus(tmp_path / "a.txt")) == ["one file"]  # a single Path is fine


def test_jsonl_one_document_per_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha", "id": 1}, {"text": None}, {"text": ""},
                                            {"text": "beta\nwith newline"}])
    with f.open("a") as out:
        out.write("\n   \n")  # blank lines are skipped
    write_jsonl(tmp_path / "e.jsonl", [{"body": "gamma"}])
    assert list(read_documents([f])) == ["alpha", "beta\nwith newline"]
    assert list(read_documents([tmp_path / "e.jsonl"], text_field="body")) == ["gamma"]


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "unterminated', r"bad\.jsonl:3: invalid JSON"),
    ('["a list"]', r"bad\.jsonl:3: expected a JSON object"),
    ('{"content": "x"}', r"bad\.jsonl:3: no field 'text' \(fields: content\)"),
    ('{"text": 5}', r"bad\.jsonl:3: field 'text' is int"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n' + line + "\n", encoding="utf-8")
    docs = read_documents([f])
    assert next(docs) == "ok"  # lazy: the bad line is only an error once it is reached
    with pytest.raises(LmforgeError, match=message):
        next(docs)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    write_jsonl(tmp_path / "nulls.jsonl", [{"text": None}, {"text": ""}])
    with pytest.raises(LmforgeError, match="corpus is empty"):
        list(read_documents([tmp_path]))
    with pytest.raises(LmforgeError, match="corpus is empty"):
        list(read_documents(["", ""]))


def test_sizes_add_up_to_the_input_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, {"text": None}, {"text": "yz"}])
    corpus = Corpus([tmp_path, "in memory ✓"])
    assert sum(size for _, size in corpus.iter_with_size()) == corpus.nbytes
    assert list(corpus) == list(corpus) == ["in memory ✓", "héllo wörld", "x", "yz"]  # re-iterable
    assert corpus.sources() == [str(tmp_path), "<1 in-memory text>"]


def test_parquet_without_pyarrow_names_the_fix(tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(LmforgeError, match="pip install pyarrow"):
        list(read_documents([f]))


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first", None, "", "second"], "n": [1, 2, 3, 4]}), f)
    corpus = Corpus([f])
    assert list(corpus) == ["first", "second"]
    assert sum(size for _, size in corpus.iter_with_size()) <= corpus.nbytes
    with pytest.raises(LmforgeError, match=r"no column 'body' \(columns: text, n\)"):
        list(read_documents([f], text_field="body"))
