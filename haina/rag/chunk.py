"""Documents into retrieval chunks: cut at headings and paragraphs first, then packed up to a token budget.

A document is first split into sections at its headings, then each section into paragraphs at blank lines;
paragraphs are packed into chunks of at most `max_tokens` tokens, and each chunk after the first of a section
starts with about `overlap` tokens carried over from the end of the one before, so that a sentence cut by a
chunk boundary is whole in one of the two. A paragraph longer than the budget is split between words (and a
single word longer than the budget, a URL or a blob, between characters). A chunk never spans two sections:
its heading path is then one line of metadata, and a new section starts a fresh chunk without overlap.

Headings recognised (outside fenced code blocks):

    Markdown        `# Title` .. `###### Title` (after a blank line, so that a `# comment` inside code
                    without fences is rarely taken for one)
    underlined      a one-line title under a line of one repeated punctuation character (=, -, ~, *, ^, ...),
                    with or without the same line above it: reStructuredText, Markdown's setext form, and the
                    text of `pydoc_data.topics`; levels in order of first appearance, as reStructuredText does
    pydoc           an upper-case title alone on its line (NAME, DESCRIPTION, CLASSES, FUNCTIONS) followed by
                    indented text, as `pydoc` renders a module

Every chunk's text is the slice `text[start:end]` of its document, so its character offsets point back into
the file. Together the chunks cover every non-blank character of the document.

Ids and change detection: a chunk's id is `<source-id>:<n>`, n counting the chunks of its source from 0, so
re-chunking an unchanged document gives the same ids. `metadata["hash"]` is a hash of what retrieval sees (the
text and the heading path, not the offsets): `plan_reindex` compares them with what a collection holds and
says which chunks to add, re-embed, keep and delete. A chunk whose text is unchanged but whose offsets moved
(an edit earlier in its file) is `unchanged`; an indexer that shows offsets should rewrite those chunks'
metadata, which costs no embedding.

Token counts come from a callable (`TokenCounter`): `tokenizer_counter(tokenizer)` for a model's own
tokenizer, or `whitespace_tokens`, which needs no model. With a subword tokenizer the counts of words are
summed while packing, and each finished chunk is counted whole and shrunk if the sum was optimistic, so the
budget holds exactly; the overlap is approximate (whole words).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from haina.core.errors import HainaError

TokenCounter = Callable[[str], int]
SECTION_SEP = " > "  # joins the heading path into the one string a vector store's metadata can hold

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
ADORNMENT = re.compile(r"^([=\-~^\"'`#*+_:.])\1{2,}[ \t]*$")
_PYDOC = re.compile(r"^[A-Z][A-Z0-9]{2,}(?: [A-Z0-9]+){0,3}[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_WORD = re.compile(r"\S+")


def whitespace_tokens(text: str) -> int:
    """Tokens of `text` as whitespace-separated words: the counter that needs no model."""
    return len(text.split())


def tokenizer_counter(tokenizer: Any) -> TokenCounter:
    """A counter from anything with `encode(text) -> ids`, such as a haina `Tokenizer`."""
    return lambda text: len(tokenizer.encode(text))


@dataclass(frozen=True, kw_only=True)
class ChunkConfig:
    """How documents are cut.

    Args:
        max_tokens: the most tokens in one chunk (an embedder's context, or less: short chunks retrieve sharper).
        overlap: about how many tokens of a chunk's end begin the next chunk of the same section.
    """

    max_tokens: int = 256
    overlap: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise HainaError(f"chunk max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.overlap < self.max_tokens:
            raise HainaError(f"chunk overlap must be at least 0 and less than max_tokens ({self.max_tokens}), "
                             f"got {self.overlap}")


@dataclass(frozen=True)
class Chunk:
    """One retrieval unit: a stable id, the text, and its metadata (source, section, start, end, chunk, hash,
    tokens)."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.metadata["hash"]


@dataclass(frozen=True)
class Section:
    """A heading's span of a document (the heading lines included) and the path of headings above it."""

    headings: tuple[str, ...]
    start: int
    end: int


class ReindexPlan(NamedTuple):
    """Chunk ids by what re-indexing must do with them."""

    added: list[str]
    updated: list[str]
    unchanged: list[str]
    deleted: list[str]

    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self._asdict().items()}


# ---------------------------------------------------------------------------------------- structure
def _lines(text: str) -> list[tuple[int, str]]:
    """(offset, line without its end) for each line; `splitlines(keepends=True)` re-joins to the text exactly."""
    out, at = [], 0
    for line in text.splitlines(keepends=True):
        out.append((at, line.rstrip("\r\n")))
        at += len(line)
    return out


def _blank(line: str) -> bool:
    return not line.strip()


def _heading(lines: list[tuple[int, str]], i: int, styles: list[tuple[str, bool]]) -> tuple[int, int, str, int] | None:
    """A heading at line i: (level, first line, title, lines it spans), else None. `styles` learns underline kinds."""
    line = lines[i][1]
    before = lines[i - 1][1] if i > 0 else ""
    after = lines[i + 1][1] if i + 1 < len(lines) else ""
    if _blank(line) or ADORNMENT.match(line):
        return None
    if m := _ATX.match(line):
        return (len(m.group(1)), i, m.group(2).strip(), 1) if _blank(before) or _ATX.match(before) else None
    if under := ADORNMENT.match(after):
        # An overline is a line of its own: not the underline of the title just above (i - 2 blank or absent).
        over = ADORNMENT.match(before) is not None and before.rstrip() == after.rstrip() and \
            (i < 2 or _blank(lines[i - 2][1]))
        if over or (_blank(before) and not line[:1].isspace()):
            style = (under.group(1), over)
            if style not in styles:
                styles.append(style)
            first = i - 1 if over else i
            return styles.index(style) + 1, first, line.strip(), (3 if over else 2)
    if _PYDOC.match(line) and _blank(before) and after[:1] in (" ", "\t") and not _blank(after):
        return 1, i, line.strip(), 1
    return None


def _fence(line: str, open_: str | None) -> str | None:
    """The code fence open after `line`, given the one open before it (None: outside any)."""
    m = _FENCE.match(line)
    if m is None:
        return open_
    mark = m.group(1)
    if open_ is None:
        return mark
    closes = mark[0] == open_[0] and len(mark) >= len(open_) and not line.strip().strip(mark[0])
    return None if closes else open_


def split_sections(text: str) -> list[Section]:
    """The sections of `text`: spans from each heading to the next (the text before the first has no heading).

    A heading with nothing under it before the next heading joins the next section, so that it does not
    become a chunk of its own.
    """
    lines = _lines(text)
    styles: list[tuple[str, bool]] = []
    cuts: list[tuple[int, int, tuple[str, ...]]] = [(0, 0, ())]  # (start, where the body starts, heading path)
    stack: list[tuple[int, str]] = []  # (level, title) of the open headings
    fence = None
    i = 0
    while i < len(lines):
        found = None if fence is not None else _heading(lines, i, styles)
        if found is None:
            fence = _fence(lines[i][1], fence)
            i += 1
            continue
        level, first, title, span = found
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        i = first + span
        cuts.append((lines[first][0], lines[i][0] if i < len(lines) else len(text), tuple(t for _, t in stack)))
    sections: list[Section] = []
    carry = None  # the start of heading lines with no body, handed to the next section
    for (start, body, path), (end, _, _) in zip(cuts, [*cuts[1:], (len(text), 0, ())], strict=True):
        start = start if carry is None else carry
        if not text[body:end].strip() and end < len(text):
            carry = start if text[start:end].strip() else carry
            continue
        carry = None
        if text[start:end].strip():
            sections.append(Section(path, start, end))
    return sections


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of the paragraphs in text[start:end]: runs of non-blank lines (blank lines inside a code fence do
    not end one), trimmed of surrounding whitespace."""
    spans, first, last, fence = [], None, None, None
    for at, line in _lines(text[start:end]):
        at += start
        fence = _fence(line, fence)
        if _blank(line) and fence is None:
            if first is not None:
                spans.append((first, last))
            first = None
            continue
        if first is None:
            first = at + len(line) - len(line.lstrip())
        if line.strip():
            last = at + len(line.rstrip())
    if first is not None:
        spans.append((first, last))
    return spans


# ---------------------------------------------------------------------------------------- packing
class _Counter:
    """A token counter with a cache for words, which repeat."""

    def __init__(self, count: TokenCounter):
        self.count = count
        self.words: dict[str, int] = {}

    def word(self, w: str) -> int:
        n = self.words.get(w)
        if n is None:
            n = self.words[w] = self.count(w)
        return n


def _pieces(text: str, span: tuple[int, int], budget: int, counter: _Counter) -> list[tuple[int, int, int]]:
    """A paragraph as (start, end, tokens) pieces of at most `budget` tokens: itself, its words, or parts of a word."""
    start, end = span
    n = counter.count(text[start:end])
    if n <= budget:
        return [(start, end, n)]
    out = []
    for m in _WORD.finditer(text, start, end):
        a, b = m.span()
        n = counter.word(m.group())
        while n > budget and b - a > 1:  # a word over the budget: its longest prefix that fits, by bisection
            lo, hi = 1, b - a - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if counter.count(text[a:a + mid]) <= budget else (lo, mid - 1)
            out.append((a, a + lo, counter.count(text[a:a + lo])))
            a += lo
            n = counter.count(text[a:b])
        out.append((a, b, n))
    return out


def _tail(text: str, start: int, end: int, want: int, counter: _Counter) -> tuple[int, int, int] | None:
    """The last whole words of text[start:end] with at most `want` tokens, as a piece; None when none fit."""
    words = [(m.start(), counter.word(m.group())) for m in _WORD.finditer(text, start, end)]
    at, total = None, 0
    for pos, n in reversed(words[1:]):  # never the whole chunk again
        if total + n > want:
            break
        at, total = pos, total + n
    return None if at is None or total == 0 else (at, end, total)


def _pack(text: str, pieces: list[tuple[int, int, int]], cfg: ChunkConfig, counter: _Counter) -> list[tuple[int, int]]:
    """Spans of chunks over a section's pieces: greedy, each chunk within the budget, overlap carried over."""
    spans: list[tuple[int, int]] = []
    carry = None
    i = 0
    while i < len(pieces):
        total = carry[2] if carry else 0
        j = i
        while j < len(pieces) and total + pieces[j][2] <= cfg.max_tokens:
            total += pieces[j][2]
            j += 1
        if j == i and carry is not None:  # the carried tokens leave no room for the next piece: carry less
            room = cfg.max_tokens - pieces[i][2]
            carry = _tail(text, carry[0], carry[1], room, counter) if room > 0 else None
            continue
        j = max(j, i + 1)  # a single character over the budget (a tiny budget) cannot be cut: it goes alone
        start = carry[0] if carry else pieces[i][0]
        # Word counts summed may undercount the joined text (separators, merges across words): count it whole.
        while counter.count(text[start:pieces[j - 1][1]]) > cfg.max_tokens and j - i > 1:
            j -= 1
        if carry is not None and counter.count(text[start:pieces[j - 1][1]]) > cfg.max_tokens:
            carry = None  # one piece and the carry: drop the carry
            continue
        end = pieces[j - 1][1]
        spans.append((start, end))
        i = j
        carry = _tail(text, start, end, cfg.overlap, counter) if cfg.overlap and i < len(pieces) else None
    return spans


def content_hash(text: str, section: str) -> str:
    """The hash of what retrieval sees of a chunk: its heading path and its text."""
    return hashlib.sha256(f"{section}\n\0{text}".encode()).hexdigest()


def chunk_text(text: str, source: str, *, source_id: str | None = None, config: ChunkConfig | None = None,
               count_tokens: TokenCounter = whitespace_tokens,
               metadata: Mapping[str, Any] | None = None) -> list[Chunk]:
    """Cut one document into chunks (see the module docstring); a blank document has none.

    Args:
        text: the document.
        source: where it came from (a path), recorded as metadata["source"].
        source_id: the prefix of the chunk ids (default: `source`); ids are `<source_id>:<n>`.
        config: the token budget and overlap.
        count_tokens: tokens of a string (`tokenizer_counter(tok)`, or `whitespace_tokens`).
        metadata: more fields for every chunk's metadata (the document's own, such as a title).
    """
    cfg = config or ChunkConfig()
    counter = _Counter(count_tokens)
    prefix = source if source_id is None else source_id
    chunks: list[Chunk] = []
    for sec in split_sections(text):
        pieces = [p for para in _paragraphs(text, sec.start, sec.end)
                  for p in _pieces(text, para, cfg.max_tokens, counter)]
        section = SECTION_SEP.join(sec.headings)
        for start, end in _pack(text, pieces, cfg, counter):
            body = text[start:end]
            n = len(chunks)
            meta = {**(metadata or {}), "source": source, "section": section, "start": start, "end": end,
                    "chunk": n, "tokens": counter.count(body), "hash": content_hash(body, section)}
            chunks.append(Chunk(f"{prefix}:{n}", body, meta))
    return chunks


def plan_reindex(old: Mapping[str, str], new_chunks: Iterable[Chunk]) -> ReindexPlan:
    """What re-indexing must do: chunk ids to add, update (the hash changed), keep, and delete.

    Args:
        old: id -> hash of what the collection holds for the sources being re-indexed (only those: an id of
            another source missing from `new_chunks` would be deleted).
        new_chunks: the chunks of those sources now.

    Raises:
        HainaError: two new chunks share an id (two sources given the same source id).
    """
    added, updated, unchanged, seen = [], [], [], set()
    for c in new_chunks:
        if c.id in seen:
            raise HainaError(f"chunk id '{c.id}' occurs twice; give each source its own source id")
        seen.add(c.id)
        if c.id not in old:
            added.append(c.id)
        elif old[c.id] != c.hash:
            updated.append(c.id)
        else:
            unchanged.append(c.id)
    return ReindexPlan(added, updated, unchanged, [i for i in old if i not in seen])


__all__ = ["ADORNMENT", "SECTION_SEP", "Chunk", "ChunkConfig", "ReindexPlan", "Section", "TokenCounter", "chunk_text",
           "content_hash", "plan_reindex", "split_sections", "tokenizer_counter", "whitespace_tokens"]
