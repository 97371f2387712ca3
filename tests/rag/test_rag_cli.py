"""`haina rag …` end to end: index a slice of the standard library's docs, query it as JSON, edit records, and every
bad input as one line."""

import json
import socket
import subprocess
import sys
from itertools import takewhile

import pytest
import torch

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.cli import main
from haina.data.stdlib_corpus import iter_stdlib_documents
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

HAS_CHROMA = __import__("importlib").util.find_spec("chromadb") is not None
TOPICS = {"assert", "break", "continue", "del", "for", "global", "if", "lambda", "nonlocal", "pass", "raise",
          "return", "try", "while", "with", "yield"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Some pydoc topics (the language reference behind help("try")), as `haina data` writes the stdlib corpus."""
    path = tmp_path_factory.mktemp("stdlib") / "topics.jsonl"
    pydoc = takewhile(lambda d: d["id"].startswith("pydoc:"), iter_stdlib_documents())
    docs = [d for d in pydoc if d["id"].removeprefix("pydoc:") in TOPICS]
    assert len(docs) == len(TOPICS)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("cli-model")
    tok = train_bpe([corpus.read_text()], vocab_size=300)
    torch.manual_seed(0)
    save_model(root / "m", Transformer(ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=1,
                                                             n_embd=32, n_head=2)), tok)
    return root / "m"


def haina(*args, cwd):
    return subprocess.run([sys.executable, "-m", "haina", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *args, expect=""):
    rc, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.mark.skipif(not HAS_CHROMA, reason="chromadb is not installed (extra 'rag')")
def test_index_and_query_end_to_end(corpus, tmp_path, monkeypatch, capsys):
    done = haina("rag", "index", "--input", corpus, "--collection", "pydoc", cwd=tmp_path)  # Chroma in runs/rag
    assert done.returncode == 0, done.stderr
    assert "added" in done.stdout and "0 updated" in done.stdout
    assert (tmp_path / "runs" / "rag" / "chroma.sqlite3").is_file()
    assert (tmp_path / "runs" / "rag" / ".bm25" / "pydoc" / "bm25.json").is_file()

    q = haina("rag", "query", "--collection", "pydoc", "--text", "exception handler finally clause", "--json",
              "--top-k", "3", cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    hits = [json.loads(line) for line in q.stdout.splitlines()]
    assert len(hits) == 3 and all(set(h) == {"id", "score", "text", "metadata"} for h in hits)
    assert hits[0]["metadata"]["doc"] == "pydoc:try" and hits[0]["id"].startswith("pydoc:try:")
    assert hits[0]["metadata"]["source"] == "pydoc_data.topics" and "finally" in hits[0]["text"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # The rest in-process (each subprocess pays for importing Chroma), on the same store.
    s = ("--store", tmp_path / "runs" / "rag")
    where = json.dumps({"doc": {"$in": ["pydoc:while", "pydoc:for"]}})
    rc, out, err = run(capsys, "rag", "query", "--collection", "pydoc", "--text", "loop else clause", "--where", where,
                       "--json", *s)
    assert rc == 0 and out, err
    assert {json.loads(line)["metadata"]["doc"] for line in out.splitlines()} <= {"pydoc:while", "pydoc:for"}
    monkeypatch.chdir(tmp_path)  # ids hold paths relative to the working directory: index from the same one
    rc, out, err = run(capsys, "rag", "index", "--input", corpus, "--collection", "pydoc", "--json", *s)
    counts = json.loads(out)
    assert (counts["added"], counts["updated"], counts["deleted"]) == (0, 0, 0) and counts["unchanged"] > 16
    rc, out, err = run(capsys, "rag", "stats", "--collection", "pydoc", *s)
    assert rc == 0 and "BM25-only" in out, err


def test_table_output_and_stats(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = ("--store", tmp_path / "s", "--backend", "exact")
    assert run(capsys, "rag", "index", "--input", corpus, "--collection", "pydoc", *s)[0] == 0
    rc, out, _ = run(capsys, "rag", "query", "--collection", "pydoc", "--text", "assert statement debugging", *s)
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["#", "score", "id"] and "pydoc:assert:0" in out
    rc, out, _ = run(capsys, "rag", "stats", "--collection", "pydoc", "--json", *s)
    stats = json.loads(out)
    assert stats["retrieval"] == "bm25" and stats["embedder"] is None and stats["files"] == 1
    assert stats["count"] == stats["bm25"]["documents"] and stats["chunk"]["max_tokens"] == 256
    rc, out, _ = run(capsys, "rag", "collection", "list", "--json", *s)
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["pydoc"]
    assert run(capsys, "rag", "collection", "drop", "pydoc", *s)[0] == 0
    assert not (tmp_path / "s" / ".bm25" / "pydoc").exists()
    assert run(capsys, "rag", "collection", "list", "--json", *s)[1] == ""


def test_records_create_upsert_update_get_delete(tmp_path, capsys):
    s = ("--store", tmp_path / "s", "--backend", "exact")
    assert run(capsys, "rag", "collection", "create", "vecs", "--dim", "3", "--metric", "l2", *s)[0] == 0
    records = [{"id": "a", "text": "apples and pears", "metadata": {"kind": "fruit", "n": 1}, "vector": [1, 0, 0]},
               {"id": "b", "text": "boats on rivers", "metadata": {"kind": "travel", "n": 2}, "vector": [0, 1, 0]},
               {"id": "c", "text": "cherries", "metadata": {"kind": "fruit", "n": 3}, "vector": [0, 0, 1]}]
    (tmp_path / "up.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(capsys, "rag", "upsert", "--collection", "vecs", "--input", tmp_path / "up.jsonl", *s)[0] == 0
    rc, out, _ = run(capsys, "rag", "get", "--collection", "vecs", "--ids", "c", "a", "--vectors", *s)
    assert [json.loads(line) for line in out.splitlines()] == [
        {k: r[k] for k in ("id", "text", "metadata", "vector")} for r in (records[2], records[0])]

    (tmp_path / "edit.jsonl").write_text(json.dumps({"id": "c", "text": "cherries and plums"}) + "\n")
    one_line_error(capsys, "rag", "update", "--collection", "vecs", "--input", tmp_path / "edit.jsonl", *s,
                   expect="names no embedder, so every record needs its \"vector\"")
    (tmp_path / "edit.jsonl").write_text(json.dumps({"id": "c", "text": "cherries and plums", "vector": [0, 0, 2]}) +
                                         "\n" +
                                         json.dumps({"id": "b", "metadata": {"kind": "fruit", "n": 9}}) + "\n")
    assert run(capsys, "rag", "update", "--collection", "vecs", "--input", tmp_path / "edit.jsonl", *s)[0] == 0
    rc, out, _ = run(capsys, "rag", "get", "--collection", "vecs", "--where", '{"n": {"$gte": 3}}', *s)
    got = {json.loads(line)["id"]: json.loads(line) for line in out.splitlines()}
    assert set(got) == {"b", "c"} and got["c"]["text"] == "cherries and plums" and got["b"]["text"] == "boats on rivers"
    rc, out, _ = run(capsys, "rag", "query", "--collection", "vecs", "--text", "plums", "--mode", "bm25", "--json", *s)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["c"]  # the BM25 index saw the new text

    assert run(capsys, "rag", "delete", "--collection", "vecs", "--where", '{"kind": "fruit"}', "--ids", "a", "b",
               *s)[0] == 0
    rc, out, _ = run(capsys, "rag", "get", "--collection", "vecs", *s)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["c"]
    rc, out, _ = run(capsys, "rag", "query", "--collection", "vecs", "--text", "apples boats", "--mode", "bm25",
                     "--json", *s)
    assert rc == 0 and out == ""
    one_line_error(capsys, "rag", "query", "--collection", "vecs", "--text", "plums", *s, expect="names no embedder")


def test_upsert_embeds_with_the_collections_embedder(corpus, ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = ("--store", tmp_path / "s", "--backend", "exact", "--device", "cpu")
    assert run(capsys, "rag", "index", "--input", corpus, "--collection", "dense", "--embedder", ckpt, *s)[0] == 0
    (tmp_path / "new.jsonl").write_text(json.dumps({"id": "note", "text": "a zanzibar note", "metadata": {}}) + "\n")
    assert run(capsys, "rag", "upsert", "--collection", "dense", "--input", tmp_path / "new.jsonl", *s)[0] == 0
    rc, out, _ = run(capsys, "rag", "query", "--collection", "dense", "--text", "zanzibar", "--json", "--top-k", "1",
                     *s)
    assert json.loads(out)["id"] == "note"
    rc, out, _ = run(capsys, "rag", "query", "--collection", "dense", "--text", "a zanzibar note", "--mode", "dense",
                     "--json", "--top-k", "1", *s)
    assert rc == 0 and json.loads(out)["score"] == pytest.approx(1.0, abs=1e-5)  # its own vector: cosine 1
    rc, out, _ = run(capsys, "rag", "stats", "--collection", "dense", *s[:4])
    assert "hybrid: dense" in out and "32 dimensions" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_inputs_are_one_line(corpus, ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = ("--store", tmp_path / "s", "--backend", "exact")
    assert run(capsys, "rag", "collection", "create", "vecs", "--dim", "8", *s)[0] == 0
    assert run(capsys, "rag", "index", "--input", corpus, "--collection", "words", *s)[0] == 0
    one_line_error(capsys, "rag", "query", "--collection", "nope", "--text", "x", *s, expect="no collection 'nope'")
    one_line_error(capsys, "rag", "collection", "create", "other", "--dim", "3", "--metric", "cosinus", *s,
                   expect="unknown metric 'cosinus'")
    one_line_error(capsys, "rag", "query", "--collection", "words", "--text", "x", "--where", '{"lang": "en"}', *s,
                   expect="filter field 'lang' is not a metadata field")
    one_line_error(capsys, "rag", "query", "--collection", "words", "--text", "x", "--where", "{lang", *s,
                   expect="--where is not JSON")
    one_line_error(capsys, "rag", "query", "--collection", "words", "--text", "x", "--mode", "dense", *s,
                   expect="BM25-only")
    one_line_error(capsys, "rag", "index", "--input", corpus, "--collection", "vecs", "--embedder", ckpt,
                   "--device", "cpu", *s, expect="dimension 8 but the embedder gives 32")
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"id": "x", "text": "t", "vector": [1, 2]}) + "\n")
    one_line_error(capsys, "rag", "upsert", "--collection", "vecs", "--input", tmp_path / "wrong.jsonl", *s,
                   expect="vector of dimension 2 for collection 'vecs' of dimension 8")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.md").write_text("\n\n")
    one_line_error(capsys, "rag", "index", "--input", tmp_path / "empty", "--collection", "empty", *s,
                   expect="no text to index")
    one_line_error(capsys, "rag", "collection", "rename", "vecs", *s, expect="unknown collection action 'rename'")
    one_line_error(capsys, "rag", "delete", "--collection", "vecs", *s, expect="give --ids or --where")
    port = _free_port()
    one_line_error(capsys, "rag", "collection", "list", "--server", f"http://127.0.0.1:{port}",
                   expect=f"no Chroma server at http://127.0.0.1:{port}")
    if HAS_CHROMA:  # a mistake on a store that did not exist leaves no store behind
        one_line_error(capsys, "rag", "query", "--collection", "nope", "--text", "x", "--store", tmp_path / "fresh",
                       expect="no collection 'nope'")
        assert not (tmp_path / "fresh").exists()
