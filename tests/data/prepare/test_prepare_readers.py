"""Every reader and compression, malformed records, invalid UTF-8, and input discovery."""

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from haina.core.errors import HainaError
from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.readers import discover_units, read_unit

RECORDS = [{"text": "first document", "label": "a"}, {"text": "second document", "label": "b", "id": "x2"}]


def read_all(paths, **cfg):
    c = PrepareConfig(**cfg)
    units, skipped = discover_units([str(p) for p in paths], c.format)
    stats = {}
    docs = [d for u in units for d in read_unit(u, c, stats)]
    return docs, stats, units, skipped


def jsonl_bytes(records=RECORDS):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("suffix,compress", [
    ("", lambda b: b), (".gz", gzip.compress), (".bz2", bz2.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_with_every_compression(tmp_path, suffix, compress):
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(compress(jsonl_bytes()))
    docs, _, units, _ = read_all([path])
    assert units[0].format == "jsonl"
    assert [d["text"] for d in docs] == ["first document", "second document"]
    assert [d.get("label") for d in docs] == ["a", "b"]
    assert docs[0]["id"] == "data.jsonl" + suffix + ":1" and docs[1]["id"] == "x2"
    assert docs[0]["source"] == str(path)


def test_txt_whole_file_lines_and_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n\npara two\nstill two\n")
    docs, *_ = read_all([tmp_path / "a.txt"])
    assert len(docs) == 1 and docs[0]["text"].startswith("line one")
    docs, *_ = read_all([tmp_path / "a.txt"], split_lines=True)
    assert [d["text"] for d in docs] == ["line one", "line two", "", "para two", "still two"]
    docs, *_ = read_all([tmp_path / "a.txt"], split_paragraphs=True)
    assert [d["text"] for d in docs] == ["line one\nline two", "para two\nstill two"]
    assert docs[1]["id"].endswith(":4")  # the line the paragraph starts on


def test_json_array_and_json_lines_named_json(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(RECORDS))
    (tmp_path / "lines.json").write_bytes(jsonl_bytes())
    docs, *_ = read_all([tmp_path / "arr.json", tmp_path / "lines.json"])
    assert [d["text"] for d in docs] == ["first document", "second document"] * 2


def test_csv_and_tsv_with_a_malformed_row(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"hello, world",pos\nbad row,neg,extra\n"multi\nline",neg\n')
    (tmp_path / "d.tsv").write_text("label\ttext\npos\ttab separated\n")
    docs, *_ = read_all([tmp_path / "d.csv", tmp_path / "d.tsv"])
    good = [d for d in docs if "reason" not in d]
    bad = [d for d in docs if "reason" in d]
    assert [(d["text"], d["label"]) for d in good] == [("hello, world", "pos"), ("multi\nline", "neg"),
                                                      ("tab separated", "pos")]
    assert len(bad) == 1 and bad[0]["reason"] == "malformed_record"
    assert bad[0]["meta"]["line"] == 3 and bad[0]["meta"]["file"].endswith("d.csv")


def test_csv_without_the_text_column_is_a_clear_error(tmp_path):
    (tmp_path / "d.csv").write_text("body,label\nx,y\n")
    with pytest.raises(HainaError, match="no column 'text'.*--text-field"):
        read_all([tmp_path / "d.csv"])
    docs, *_ = read_all([tmp_path / "d.csv"], text_field="body")
    assert docs[0]["text"] == "x"


def test_parquet(tmp_path):
    pq.write_table(pa.table({"content": ["p one", "p two", None], "label": [1, 0, 1]}), tmp_path / "d.parquet")
    docs, *_ = read_all([tmp_path / "d.parquet"], text_field="content")
    assert [d["text"] for d in docs] == ["p one", "p two", ""]
    assert [d["label"] for d in docs] == [1, 0, 1]


def _save_to_disk_layout(d, texts, labels):
    """The files `datasets.Dataset.save_to_disk` writes: Arrow IPC streams plus state.json."""
    d.mkdir(parents=True)
    table = pa.table({"text": texts, "label": labels})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                              "_split": None}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_hugging_face_dataset_and_dataset_dict(tmp_path):
    _save_to_disk_layout(tmp_path / "ds", ["hf one", "hf two"], [0, 1])
    docs, _, units, _ = read_all([tmp_path / "ds"])
    assert units[0].format == "hf" and [d["text"] for d in docs] == ["hf one", "hf two"]
    root = tmp_path / "dd"
    _save_to_disk_layout(root / "train", ["t1", "t2"], [0, 0])
    _save_to_disk_layout(root / "test", ["e1"], [1])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    docs, _, units, skipped = read_all([root])
    assert sorted(d["text"] for d in docs) == ["e1", "t1", "t2"] and len(units) == 2
    assert skipped == [str(root / "dataset_dict.json")]


def test_malformed_json_lines_are_rejects_with_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n[1, 2]\n{"body": "no text field"}\n{"text": 5}\n\n{"text": null}\n')
    docs, *_ = read_all([path])
    assert [d["text"] for d in docs if "reason" not in d] == ["ok", ""]
    bad = [d for d in docs if "reason" in d]
    assert [d["meta"]["line"] for d in bad] == [2, 3, 4, 5]
    assert all(d["reason"] == "malformed_record" and d["meta"]["file"] == str(path) for d in bad)
    assert "invalid JSON" in bad[0]["meta"]["error"] and bad[0]["text"] == "{broken"


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "na\xefve"}\n{"text": "fine"}\n')
    docs, stats, *_ = read_all([tmp_path])
    texts = sorted(d["text"] for d in docs)
    assert "caf\ufffd au lait\n" in texts and "na\ufffdve" in texts and "fine" in texts
    assert stats["invalid_utf8"] == 2


def test_directories_globs_and_unknown_files(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "deep" / "a.txt").write_text("a")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes()))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("hidden")
    units, skipped = discover_units([str(tmp_path)])
    assert [u.name for u in units] == ["b.jsonl.gz", "sub/deep/a.txt"]
    assert skipped == [str(tmp_path / "image.png")]
    units, _ = discover_units([str(tmp_path / "**" / "*.txt"), str(tmp_path / "sub")])
    assert len(units) == 1  # the same file found twice is read once
    with pytest.raises(HainaError, match="input not found"):
        discover_units([str(tmp_path / "missing*.txt")])
    with pytest.raises(HainaError, match="cannot tell the format"):
        discover_units([str(tmp_path / "image.png")])
    units, _ = discover_units([str(tmp_path / "image.png")], "txt")
    assert units[0].format == "txt"


def test_truncated_compressed_file_ends_in_a_reject(tmp_path):
    data = gzip.compress(jsonl_bytes(RECORDS * 50))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, *_ = read_all([tmp_path / "cut.jsonl.gz"])
    assert docs[-1]["reason"] == "malformed_record" and "cannot read the rest" in docs[-1]["meta"]["error"]


def test_output_directory_inside_an_input_directory_is_not_read(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "part-00000.jsonl").write_text('{"text": "old output"}\n')
    units, _ = discover_units([str(tmp_path)], exclude=str(tmp_path / "out"))
    assert [u.name for u in units] == ["a.txt"]


def test_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + jsonl_bytes())
    (tmp_path / "b.json").write_bytes(bom + json.dumps(RECORDS).encode())
    (tmp_path / "c.csv").write_bytes(bom + b"text,label\nfirst document,a\n")
    (tmp_path / "d.txt").write_bytes(bom + b"whole file")
    docs, *_ = read_all([tmp_path])
    assert not [d for d in docs if "reason" in d]
    assert [d["text"] for d in docs] == ["first document", "second document"] * 2 + ["first document", "whole file"]


def test_corrupt_parquet_is_a_reject_not_a_crash(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    docs, *_ = read_all([tmp_path / "bad.parquet"])
    assert len(docs) == 1 and docs[0]["reason"] == "malformed_record"
    assert "cannot read the rest" in docs[0]["meta"]["error"]


def test_lone_surrogate_escape_in_json_is_replaced_and_counted(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "cut emoji \\ud83d here", "id": "x\\udc00"}\n')
    docs, stats, *_ = read_all([tmp_path / "s.jsonl"])
    assert docs[0]["text"] == "cut emoji \ufffd here" and docs[0]["id"] == "x\ufffd" and stats["invalid_utf8"] == 1


def test_jsonl_writer_escapes_a_lone_surrogate_it_cannot_encode(tmp_path):
    from haina.data.prepare.writers import JsonlZstWriter, read_jsonl_zst

    w = JsonlZstWriter(tmp_path / "r.jsonl.zst")
    w.write({"text": "caf\u00e9 \ud83d"})
    w.write({"text": "ok"})
    w.close()
    assert [r["text"] for r in read_jsonl_zst(tmp_path / "r.jsonl.zst")] == ["caf\u00e9 \ud83d", "ok"]


def test_files_of_the_same_name_give_distinct_document_ids(tmp_path):
    for d in ("s1", "s2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.jsonl").write_bytes(jsonl_bytes(RECORDS[:1]))
    docs, _, units, _ = read_all([tmp_path / "*" / "train.jsonl"])
    assert len({d["id"] for d in docs}) == 2 and [u.name for u in units] == [u.path for u in units]
    _, _, units, _ = read_all([tmp_path / "s1" / "train.jsonl"])
    assert units[0].name == "train.jsonl"  # a unique name stays short


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_json_array_streams_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    # Read a few bytes at a time, never whole: characters, numbers and records cut at every boundary.
    from haina.data.prepare import readers

    monkeypatch.setattr(readers, "JSON_CHUNK_BYTES", chunk)
    records = [{"text": f"日本語 🎉 record {i}", "label": "ab"[i % 2], "meta": {"n": 12345 + i}} for i in range(6)]
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf [\n" + b" ,\n".join(json.dumps(r, ensure_ascii=False).encode()
                                                                      for r in records) + b"\n]\n")
    docs, stats, *_ = read_all([tmp_path / "a.json"])
    assert [(d["text"], d["label"]) for d in docs] == [(r["text"], r["label"]) for r in records]
    assert "invalid_utf8" not in stats
    (tmp_path / "a.json").write_bytes(b'[{"text": "bad \xff byte"}, {"text": "fine"}]')
    docs, stats, *_ = read_all([tmp_path / "a.json"])
    assert [d["text"] for d in docs] == ["bad \ufffd byte", "fine"] and stats["invalid_utf8"] >= 1
    (tmp_path / "a.json").write_text("[ ]")
    assert read_all([tmp_path / "a.json"])[0] == []


def test_a_broken_json_array_keeps_what_came_before_and_rejects_the_rest(tmp_path, monkeypatch):
    from haina.data.prepare import readers

    monkeypatch.setattr(readers, "JSON_CHUNK_BYTES", 5)
    cases = {'[{"text": "one"}, {"text": "two"': "record 2",  # a truncated file
             '[{"text": "one"} {"text": "two"}]': "expected ','",
             '[{"text": "one"}] trailing': "after the closing",
             '[{"text": "one"}, {"text": "' + "x" * 200 + '"}]': "over 100 characters"}
    monkeypatch.setattr(readers, "MAX_JSON_RECORD_CHARS", 100)
    for body, why in cases.items():
        (tmp_path / "b.json").write_text(body)
        docs, *_ = read_all([tmp_path / "b.json"])
        assert docs[0]["text"] == "one" and "reason" not in docs[0]
        assert len(docs) == 2 and docs[1]["reason"] == "malformed_record" and why in docs[1]["meta"]["error"], body


def test_an_empty_csv_label_cell_is_no_label(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,pos\nworld,\n")
    docs, *_ = read_all([tmp_path / "d.csv"])
    assert [d.get("label") for d in docs] == ["pos", None]
