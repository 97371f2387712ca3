"""`haina.rag.serving`: the numbered-sources prompt, fitting sources to the context, the `RagContext` provider on
a BM25-only collection, the up-front checks, and `serve_rag_command`'s composed signature and help."""

import argparse
import inspect
from typing import get_type_hints

import pytest

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina import cli
from haina.core.errors import HainaError
from haina.rag import open_store
from haina.rag.index import index_documents
from haina.rag.serving import (
    INSTRUCTIONS,
    NOTHING_FOUND,
    RagContext,
    check_collection,
    fit_sources,
    serve_rag_command,
    with_sources,
)
from haina.serve.command import serve_command

DOCS = {
    "cooking.md": "# Pasta\n\nBoil the pasta in salted water for nine minutes, then drain it and add the sauce.\n",
    "music.md": "# Instruments\n\nThe xylophone is struck with mallets; each wooden bar sounds one note.\n",
    "gardening.md": "# Roses\n\nPrune roses in late winter and water them deeply during dry summer weeks.\n",
}
S = [{"n": 1, "id": "a:0", "source": "a.md", "score": 2.0, "text": "alpha " * 20},
     {"n": 2, "id": "b:0", "source": "b.md", "score": 1.0, "text": "beta " * 20}]
USER = [{"role": "user", "content": "question?"}]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text)
    with open_store("exact", tmp_path / "store") as s:
        index_documents(s, "docs", list(DOCS))
    return tmp_path / "store"


def test_sources_join_the_system_message():
    out = with_sources(USER, S)
    assert out[1:] == USER and out[0]["role"] == "system"
    assert out[0]["content"].startswith(INSTRUCTIONS) and "[1] a.md\nalpha" in out[0]["content"]
    assert out[0]["content"].index("[1] a.md") < out[0]["content"].index("[2] b.md")
    system = [{"role": "system", "content": "You are terse."}, *USER]
    merged = with_sources(system, S)
    assert len(merged) == 2 and merged[0]["content"].startswith("You are terse.\n\n" + INSTRUCTIONS)
    assert with_sources(USER, [])[0]["content"] == NOTHING_FOUND


def test_fit_sources_drops_from_the_last_then_shortens():
    def under(n):
        return lambda messages: sum(len(m["content"]) for m in messages) <= n

    assert fit_sources(USER, S, under(10_000)) == (with_sources(USER, S), S)
    one = len(with_sources(USER, S[:1])[0]["content"]) + len(USER[0]["content"])
    _, kept = fit_sources(USER, S, under(one))
    assert kept == S[:1]
    _, kept = fit_sources(USER, S, under(one - 40))  # the one left is cut in half, marked
    assert len(kept) == 1 and kept[0]["text"].endswith(" …") and len(kept[0]["text"]) < len(S[0]["text"])
    assert fit_sources(USER, S, under(5)) == (USER, [])  # nothing fits: the conversation as it came


def test_rag_context_retrieves_for_the_last_user_message(store):
    ctx = RagContext("docs", store=str(store), backend="exact", top_k=2, mode="hybrid")
    try:
        assert ctx.describe() == {"collection": "docs", "top_k": 2, "mode": "bm25"}
        conversation = [{"role": "user", "content": "tell me about pasta"}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "what is a xylophone struck with?"}]
        messages, sources = ctx(conversation, lambda m: True)
        assert messages[1:] == conversation and 1 <= len(sources) <= 2
        top = sources[0]
        assert top["n"] == 1 and top["source"] == "music.md" and "mallets" in top["text"]
        assert set(top) == {"n", "id", "source", "score", "text"} and isinstance(top["score"], float)
        assert f"[1] music.md\n{top['text']}" in messages[0]["content"]
        # Nothing matching: the model is told to say so; nothing asked: nothing added.
        messages, sources = ctx([{"role": "user", "content": "zzzz qqqq"}], lambda m: True)
        assert sources == [] and messages[0]["content"] == NOTHING_FOUND
        prefill = [{"role": "assistant", "content": "hello"}]
        assert ctx(prefill, lambda m: True) == (prefill, [])
    finally:
        ctx.close()


def test_checks_before_the_server_starts(store, tmp_path):
    check_collection("docs", str(store), None, "exact", "hybrid")
    with pytest.raises(HainaError, match="does not exist; index documents"):
        check_collection("docs", str(tmp_path / "nowhere"), None, "exact", "hybrid")
    assert not (tmp_path / "nowhere").exists()  # never created by the check
    with pytest.raises(HainaError, match="no collection 'other'"):
        check_collection("other", str(store), None, "exact", "hybrid")
    with pytest.raises(HainaError, match="BM25-only"):
        check_collection("docs", str(store), None, "exact", "dense")
    with open_store("exact", store) as s:
        s.create_collection("empty", dim=4)
    with pytest.raises(HainaError, match="is empty"):
        check_collection("empty", str(store), None, "exact", "hybrid")
    with pytest.raises(HainaError, match="--rag-top-k"):
        serve_rag_command(checkpoint=["x"], rag="docs", rag_store=str(store), rag_top_k=0)


def test_the_wrapper_has_serve_options_then_its_own():
    serve = [n for n in inspect.signature(serve_command).parameters if n != "context"]
    names = list(inspect.signature(serve_rag_command).parameters)
    assert names == serve + ["rag", "rag_store", "rag_server", "rag_backend", "rag_top_k", "rag_mode", "rag_bm25_dir"]
    hints = get_type_hints(serve_rag_command)
    assert hints["dtype"] == get_type_hints(serve_command)["dtype"] and "context" not in hints
    description, args = cli._doc_parts(serve_rag_command)
    assert "--rag NAME" in description and "OpenAI API" in description
    assert set(args) == set(names) and "Python API" not in " ".join(args.values())
    parser = argparse.ArgumentParser()
    cli._add_function_args(parser, serve_rag_command)
    ns = parser.parse_args(["--checkpoint", "c", "--rag", "docs", "--rag-mode", "bm25", "--port", "9"])
    assert (ns.checkpoint, ns.rag, ns.rag_mode, ns.port, ns.rag_top_k) == (["c"], "docs", "bm25", "9", 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "c", "--context", "x"])  # serve's Python-only hook is no option
