"""The embedded corpus: Python's own documentation, read without importing anything."""

import json
import sys
import time

from haina.data.stdlib_corpus import iter_stdlib_documents, write_stdlib_corpus


def test_corpus_content_determinism_and_file(tmp_path):
    modules_before = set(sys.modules)
    start = time.perf_counter()
    stats = write_stdlib_corpus(tmp_path / "corpus.jsonl")
    assert time.perf_counter() - start < 30  # 15 s on an idle machine; slack for a shared one
    lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines]
    assert stats["documents"] == len(docs) > 300
    assert stats["characters"] == sum(len(d["text"]) for d in docs) > 1_000_000
    assert all(set(d) == {"id", "text", "source"} and d["text"].strip() for d in docs)
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    by_id = {d["id"]: d for d in docs}
    # pydoc topics, one document each.
    assert by_id["pydoc:if"]["text"].startswith('The "if" statement')
    # Module, function and class docstrings with pydoc-like headers.
    js = by_id["stdlib:json"]["text"]
    assert js.startswith("module json\n\nJSON (JavaScript Object Notation)")
    assert "json.dumps(obj, *, skipkeys=False" in js and "Serialize ``obj`` to a JSON formatted ``str``" in js
    assert "class json.decoder.JSONDecoder(object)" in by_id["stdlib:json.decoder"]["text"]
    assert "collections.OrderedDict" in by_id["stdlib:collections"]["text"]
    # Tests, the IDE, GUI demos, third-party packages: left out.
    assert not any(part in i for i in ids for part in (".test.", "idlelib", "tkinter", "lib2to3", "turtledemo"))
    assert not any(d["source"].startswith("site-packages") for d in docs)
    # Read with ast, never imported.
    assert not {"turtle", "antigravity", "this", "json.tool"} & (set(sys.modules) - modules_before)
    # Deterministic.
    again = list(iter_stdlib_documents())
    assert again == docs
