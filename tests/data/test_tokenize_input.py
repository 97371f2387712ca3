"""The strict document reader: formats, compression, directories and globs, errors, prepare outputs."""

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from haina.core.errors import HainaError
from haina.data.text_input import find_split_dirs, iter_documents


def _jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def test_formats_and_compression(tmp_path):
    (tmp_path / "a.txt").write_text("whole file\nis one document\n")
    (tmp_path / "b.jsonl").write_bytes(_jsonl(["one", "two"]) + b"\n")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(["gz"])))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(["zst ☃"])))
    (tmp_path / "e.txt.bz2").write_bytes(bz2.compress(b"bz2 text"))
    pq.write_table(pa.table({"text": ["p1", None, "p2"], "n": [1, 2, 3]}), tmp_path / "f.parquet")
    (tmp_path / "notes.md").write_text("skipped: not a text input format")
    (tmp_path / ".hidden.txt").write_text("skipped: hidden")
    docs = list(iter_documents([str(tmp_path)]))
    assert docs == ["whole file\nis one document\n", "one", "two", "gz", "zst ☃", "bz2 text", "p1", "p2"]


def test_recursive_sorted_globs_and_text_field(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "z" / "1.jsonl").write_bytes(_jsonl(["z1"], field="content"))
    (tmp_path / "a" / "2.jsonl").write_bytes(_jsonl(["a2"], field="content"))
    assert list(iter_documents([str(tmp_path)], text_field="content")) == ["a2", "z1"]
    # A directory and a glob inside it name the same file: read once.
    assert list(iter_documents([str(tmp_path / "z"), str(tmp_path / "*" / "*.jsonl")], text_field="content")) == [
        "z1", "a2"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(HainaError, match="input not found"):
        list(iter_documents([str(tmp_path / "missing*.txt")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(HainaError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents([str(bad)]))
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(HainaError, match=r"bad\.jsonl:1: no 'text' field"):
        list(iter_documents([str(bad)]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(HainaError, match="expected .txt, .jsonl or .parquet"):
        list(iter_documents([str(tmp_path / "x.csv")]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(HainaError, match="no column 'text'"):
        list(iter_documents([str(tmp_path / "p.parquet")]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(HainaError, match="invalid UTF-8"):
        list(iter_documents([str(tmp_path / "latin1.txt")]))


def test_find_split_dirs(tmp_path):
    assert find_split_dirs([str(tmp_path)]) is None
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert find_split_dirs([str(tmp_path)]) is None  # no report.json: not a prepare output
    (tmp_path / "report.json").write_text("{}")
    assert find_split_dirs([str(tmp_path)]) == {"train": [str(tmp_path / "train")], "val": [str(tmp_path / "val")]}
    (tmp_path / "test").mkdir()  # prepare always makes test/; empty, it is no split
    assert set(find_split_dirs([str(tmp_path)])) == {"train", "val"}
    (tmp_path / "test" / "part-00000.jsonl").write_text("")
    assert set(find_split_dirs([str(tmp_path)])) == {"train", "val", "test"}
    assert find_split_dirs([str(tmp_path), str(tmp_path)]) is None
