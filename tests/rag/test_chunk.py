"""Chunking for retrieval: headings and paragraphs first, a token budget with overlap, stable ids."""

import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haina.core.errors import HainaError
from haina.rag.chunk import (
    Chunk,
    ChunkConfig,
    chunk_text,
    plan_reindex,
    split_sections,
    tokenizer_counter,
    whitespace_tokens,
)
from haina.tokenizer.train import train_bpe

DOC = """Preamble before any heading.

# Guide

Intro to the guide, one paragraph.

## Install

Run the installer. It takes a minute.

Check the version afterwards.

```
# not a heading: a comment in a fenced block

still code
```

## Use

Call the function with a path.
"""


def _covered(text: str, chunks: list[Chunk]) -> None:
    """Every chunk is the slice its offsets name, and every non-blank character is in some chunk."""
    seen = bytearray(len(text))
    for c in chunks:
        start, end = c.metadata["start"], c.metadata["end"]
        assert c.text == text[start:end] and c.text.strip() == c.text and c.text
        seen[start:end] = b"\1" * (end - start)
    missing = [i for i, ch in enumerate(text) if not ch.isspace() and not seen[i]]
    assert not missing, f"not covered: {text[missing[0]:missing[0] + 20]!r}"


def test_sections_follow_markdown_headings_not_code():
    secs = split_sections(DOC)
    assert [s.headings for s in secs] == [(), ("Guide",), ("Guide", "Install"), ("Guide", "Use")]
    assert DOC[secs[2].start:].startswith("## Install")
    chunks = chunk_text(DOC, "guide.md")
    assert [c.metadata["section"] for c in chunks] == ["", "Guide", "Guide > Install", "Guide > Use"]
    assert "# not a heading" in chunks[2].text  # the fenced block stays in its section
    _covered(DOC, chunks)


def test_underlined_and_pydoc_titles():
    rst = "Title\n=====\n\nBody one.\n\nPart\n----\n\nBody two.\n\n*******\nThe if\n*******\n\nBody three.\n"
    assert [s.headings for s in split_sections(rst)] == [("Title",), ("Title", "Part"), ("Title", "Part", "The if")]
    pydoc = "Help on module json:\n\nNAME\n    json - JSON encoder\n\nDESCRIPTION\n    Text here.\n"
    assert [s.headings for s in split_sections(pydoc)] == [(), ("NAME",), ("DESCRIPTION",)]
    # Not titles: an upper-case line without indented text under it; a rule after a blank line.
    plain = "Some text.\n\nNOTE\nnot indented.\n\n-----\n\nMore.\n"
    assert [s.headings for s in split_sections(plain)] == [()]


def test_a_heading_without_body_joins_the_next_section():
    text = "# A\n\n## B\n\nbody of B\n"
    (sec,) = split_sections(text)
    assert sec.headings == ("A", "B") and sec.start == 0


def test_paragraphs_are_packed_whole_within_the_budget():
    paras = [" ".join(f"p{i}w{j}" for j in range(4)) for i in range(6)]  # six paragraphs of four words
    text = "\n\n".join(paras)
    chunks = chunk_text(text, "s", config=ChunkConfig(max_tokens=9, overlap=0))
    assert [c.text for c in chunks] == ["\n\n".join(paras[i:i + 2]) for i in (0, 2, 4)]
    assert all(c.metadata["tokens"] == 8 for c in chunks)


def test_long_paragraph_is_split_by_tokens_with_overlap():
    words = [f"w{i}" for i in range(50)]
    text = " ".join(words)
    chunks = chunk_text(text, "s", config=ChunkConfig(max_tokens=10, overlap=3))
    got = [c.text.split() for c in chunks]
    assert all(len(g) <= 10 for g in got)
    assert got[0] == words[:10]
    for prev, cur in pairwise(got):
        assert cur[:3] == prev[-3:]  # three tokens carried over
    assert got[-1][-1] == "w49"
    _covered(text, chunks)


def test_subword_budget_holds_exactly():
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 30], vocab_size=300)
    count = tokenizer_counter(tok)
    text = ("The quick brown fox jumps over the lazy dog, again and again. " * 12 + "\n\n") * 3 + \
        "Zyxwvutsrqponmlkjihgfedcba" * 8  # one "word" far longer than the budget: cut between characters
    cfg = ChunkConfig(max_tokens=24, overlap=6)
    chunks = chunk_text(text, "s", config=cfg, count_tokens=count)
    assert len(chunks) > 5
    assert all(count(c.text) <= 24 and c.metadata["tokens"] == count(c.text) for c in chunks)
    _covered(text, chunks)


def test_ids_are_stable_and_reindexing_touches_only_changes():
    old = chunk_text(DOC, "docs/guide.md", config=ChunkConfig(max_tokens=12, overlap=2))
    again = chunk_text(DOC, "docs/guide.md", config=ChunkConfig(max_tokens=12, overlap=2))
    assert [(c.id, c.hash) for c in old] == [(c.id, c.hash) for c in again]
    assert [c.id for c in old] == [f"docs/guide.md:{n}" for n in range(len(old))]
    assert all(c.metadata["source"] == "docs/guide.md" and c.metadata["chunk"] == n for n, c in enumerate(old))
    held = {c.id: c.hash for c in old}

    assert plan_reindex(held, again).counts() == {"added": 0, "updated": 0, "unchanged": len(old), "deleted": 0}
    edited = DOC.replace("Call the function with a path.", "Call the function with a file name.")
    new = chunk_text(edited, "docs/guide.md", config=ChunkConfig(max_tokens=12, overlap=2))
    plan = plan_reindex(held, new)
    assert plan.updated == [new[-1].id] and len(plan.unchanged) == len(old) - 1 and not plan.added + plan.deleted

    shorter = chunk_text(DOC.split("## Use")[0], "docs/guide.md", config=ChunkConfig(max_tokens=12, overlap=2))
    plan = plan_reindex(held, shorter)
    assert plan.deleted == [old[-1].id] and len(plan.unchanged) == len(old) - 1
    longer = chunk_text(DOC + "\n## More\n\nA new section.\n", "docs/guide.md",
                        config=ChunkConfig(max_tokens=12, overlap=2))
    assert plan_reindex(held, longer).counts() == {"added": 1, "updated": 0, "unchanged": len(old), "deleted": 0}

    with pytest.raises(HainaError, match="occurs twice"):
        plan_reindex({}, old + old)


def test_config_and_blank_documents():
    for bad in ({"max_tokens": 0}, {"max_tokens": 8, "overlap": 8}, {"overlap": -1}):
        with pytest.raises(HainaError, match="chunk"):
            ChunkConfig(**bad)
    assert chunk_text("  \n\n \t\n", "empty") == []
    (c,) = chunk_text("one line", "a.txt", source_id="A", metadata={"title": "T"})
    assert c.id == "A:0" and c.metadata["title"] == "T" and c.metadata["source"] == "a.txt"


_line = st.one_of(
    st.text(alphabet="abc xyz.,\t", min_size=0, max_size=40),
    st.sampled_from(["", "", "# Head", "## Sub", "Title", "=====", "-----", "NAME", "    indented text", "```"]),
    st.text(alphabet="qwertyuiopasdfghjkl", min_size=15, max_size=60),  # a long word
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(lines=st.lists(_line, max_size=40), max_tokens=st.integers(1, 12), overlap=st.integers(0, 11),
       chars=st.booleans())
def test_chunks_cover_all_text_within_the_budget(lines, max_tokens, overlap, chars):
    text = "\n".join(lines)
    cfg = ChunkConfig(max_tokens=max_tokens, overlap=min(overlap, max_tokens - 1))
    count = (lambda s: len(re.sub(r"\s", "", s)) // 4 + 1) if chars else whitespace_tokens  # a subword-like counter
    chunks = chunk_text(text, "doc", config=cfg, count_tokens=count)
    _covered(text, chunks)
    assert [c.id for c in chunks] == [f"doc:{n}" for n in range(len(chunks))]
    for c in chunks:
        assert count(c.text) <= max_tokens or len(c.text) == 1  # only a lone character may exceed a tiny budget
    sections = split_sections(text)
    for c in chunks:  # no chunk spans two sections
        assert any(s.start <= c.metadata["start"] and c.metadata["end"] <= s.end for s in sections)
