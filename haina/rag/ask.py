"""Answers with citations: retrieve, keep what is relevant, prompt with numbered sources, generate, map [n] back.

`answer(question, retriever, generator)` (and `answer_batch` for many questions, generated together):

1. Retrieve the `top_k` chunks (`Retriever.search`, in any mode).
2. Keep the relevant ones. A hit is relevant when its text holds at least `min_overlap` (default 60%) of the
   question's content terms: its words as the collection's BM25 index analyses them (lower-cased, stopwords
   out, stemmed when the index stems), less question words ("what", "does", "explain", ...). With
   `min_similarity`, a hit of a collection with an embedder is also relevant when the cosine (or the
   collection's metric's) similarity of its vector to the question's is at least that. Scores alone cannot
   decide it: BM25 hits share at least one word with the query, dense search always returns its nearest
   chunks however far they are, and a hybrid score is only a fused rank. When no hit is relevant the answer
   says so (`refused`) and nothing is generated: a small model asked without sources invents.
3. Build the prompt: an instruction, the relevant chunks as numbered sources (`[1] path: section`, then the
   text), the question. Chunks that introduce what is asked about (an unindented line, a heading or a
   definition's header, naming all the question's content terms) are numbered first: in a context that holds
   two or three sources, the one defining `json.dumps` matters more than three that call it. On the stdlib
   questions of `haina rag qa` this put the answer chunk among the sources shown for 90% of questions rather
   than 76%, and first for 87% rather than 63% (hybrid retrieval, a 256-token context). Before them come the
   chunks whose unindented line spells out the exact name the question quotes or dots ("async with",
   `_pydecimal.Decimal.normalize`): "introduces" matches `async for` to 'the "async with" statement' as well,
   the terms of both being async and statement. First of all come the chunks that `defines` what is asked:
   a definition's header of exactly that name (`class datetime.tzinfo`, not `datetime.tzinfo.dst`; `module
   locale` for "the locale module"), or a heading naming it, with text after it in the chunk. Chunks overlap,
   so the header of `is_normal` may end one chunk while the next holds it with its documentation; and a
   section's continuation mentions its subject in prose. The answer chunk became source [1] for 98% of the
   answered test questions of the docs assistant rather than 93% (for 97% rather than 89% of the training
   questions, on which the rule was worked out). The prompt must
   leave room for the answer (min(max_new_tokens, context / 4) tokens), so sources are cut to fit: each gets
   a fair share of what is left, lines longer than a third of a share are shortened, and of a source longer
   than its share the window of lines holding the most question terms is shown (it starts at a line holding
   some, preferably an unindented one naming them, so that a definition's header and the sentence after it
   stay together). A source that would get under `MIN_SOURCE_TOKENS` is dropped, the last numbered first.
   With a chat template (the checkpoint's) the prompt is one user turn; without one, the prompt ends in
   "Answer:" and the answer stops at a blank line.
4. Generate greedily through the engine, then read the answer's [n] markers (also "[1, 2]"): a marker naming
   a source becomes a citation {n, id, source, score}; one naming no source is removed from the text and
   counted in `dropped_markers`. The instruction asks for the source's number first ("[2] Return ..."),
   which is the form the fine-tuning data of `haina rag qa --sft-out` teaches, so the answer is conditioned
   on the source it names. An answer without any marker gets the source whose text holds the largest share
   of the answer's content terms as its citation (`attached`), when that share is at least `ATTACH_OVERLAP`;
   otherwise it has none. No citation is ever made up.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from haina.core.errors import HainaError
from haina.rag.chunk import ADORNMENT
from haina.rag.store import Hit

__all__ = [
    "ATTACH_OVERLAP",
    "MIN_OVERLAP",
    "Answer",
    "Prompt",
    "answer",
    "answer_batch",
    "ask_command",
    "build_prompt",
    "defines",
    "exact_names",
    "introduces",
    "load_generator",
    "names_exactly",
    "parse_citations",
    "relevant_hits",
    "render_message",
    "strip_markers",
    "terms_for",
]

MIN_OVERLAP = 0.6  # share of the question's content terms a relevant chunk holds: 2 of 2, 2 of 3, 3 of 4
ATTACH_OVERLAP = 0.5  # share of the answer's content terms a source must hold to be cited for an unmarked answer
MIN_SOURCE_TOKENS = 48  # a source cut shorter says too little to be worth its room (a header and a sentence)
# Short: in a small model's context every token of instruction is a token less of the sources.
INSTRUCTION = "Answer from the sources, starting with the [n] of the one used."
PLAIN_STOPS = ("\n\n", "\nQuestion:")
# Words that say what kind of question it is, not what it is about: they cannot make a chunk relevant.
QUESTION_WORDS = ("what which who whom whose when where why how do does did doing done explain describe tell me "
                  "about use used using mean means meaning purpose can could should would shall will may might i "
                  "you we my your our please say says said give show list way ways documentation docs")
# [1], [2, 3]; not an index such as a[0] or f(x)[1], which follows a name or a bracket.
_MARKER = re.compile(r"(?<![\w\])])\[\s*(\d{1,3}(?:\s*,\s*\d{1,3})*)\s*\]")
_WORDS = re.compile(r"(?u)\b\w\w+\b")


@dataclass
class Answer:
    """One question's answer. `sources` are the chunks the prompt showed ({n, id, source, label, score, text}: the
    source path, the name the prompt gave it, the text as shown); `citations` are those the answer cites ({n, id, source, score, attached}); `retrieved` are all
    hits, relevant or not; `reason` says why an answer was refused."""

    question: str
    text: str
    citations: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    retrieved: list[Hit] = field(default_factory=list)
    refused: bool = False
    reason: str = ""
    dropped_markers: int = 0
    attached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "refused": self.refused, "reason": self.reason,
                "citations": self.citations, "dropped_markers": self.dropped_markers, "attached": self.attached,
                "sources": self.sources,
                "retrieved": [{"id": h.id, "score": h.score, "source": h.metadata.get("source")}
                              for h in self.retrieved]}


@dataclass
class Prompt:
    """A built prompt: its token ids, the user message (what fine-tuning data holds as "prompt"), whether it
    went through a chat template, and the sources it shows."""

    ids: list[int]
    message: str
    chat: bool
    sources: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------- terms and relevance
class Terms:
    """Content terms of texts as a collection's BM25 index sees them, less question words."""

    def __init__(self, analyze: Callable[[str], list[str]]):
        self.analyze = analyze
        self.ignored = frozenset(analyze(QUESTION_WORDS))

    def __call__(self, text: str) -> set[str]:
        return {t for t in self.analyze(text) if t not in self.ignored}


def terms_for(retriever: Any) -> Terms:
    """The analyser of the retriever's BM25 index (so "relevant" means what the keyword side matches on)."""
    bm25 = getattr(retriever, "bm25", None)
    if callable(bm25):
        return Terms(bm25().tokenize)
    return Terms(lambda text: _WORDS.findall(text.lower()))


def coverage(wanted: set[str], have: set[str]) -> float:
    """The share of `wanted` found in `have` (0 when nothing is wanted)."""
    return len(wanted & have) / len(wanted) if wanted else 0.0


def _similarities(retriever: Any, question: str, hits: Sequence[Hit]) -> list[float]:
    """The similarity of each hit's stored vector to the question's embedding, by the collection's metric."""
    vq = np.asarray(retriever.embedder.embed([question])[0], dtype=np.float64)
    records = {r.id: r for r in retriever.store.get(retriever.collection, ids=[h.id for h in hits],
                                                    include_vectors=True)}
    metric = retriever.info.metric
    out = []
    for h in hits:
        record = records.get(h.id)
        if record is None or record.vector is None:
            out.append(float("-inf"))
            continue
        v = np.asarray(record.vector, dtype=np.float64)
        if metric == "cosine":
            out.append(float(vq @ v / max(np.linalg.norm(vq) * np.linalg.norm(v), 1e-12)))
        elif metric == "ip":
            out.append(float(vq @ v))
        else:
            out.append(-float(((vq - v) ** 2).sum()))
    return out


def relevant_hits(question: str, hits: Sequence[Hit], terms: Terms, *, min_overlap: float = MIN_OVERLAP,
                  similarities: Sequence[float] | None = None, min_similarity: float | None = None
                  ) -> tuple[list[Hit], str]:
    """The hits that pass the relevance rule (see the module docstring), in their order, and if none, why."""
    if not hits:
        return [], "no chunk matched the question"
    wanted = terms(question)
    kept = []
    for i, h in enumerate(hits):
        lexical = bool(wanted) and coverage(wanted, terms(h.text)) >= min_overlap
        dense = similarities is not None and min_similarity is not None and similarities[i] >= min_similarity
        if lexical or dense:
            kept.append(h)
    if kept:
        return kept, ""
    if not wanted and min_similarity is None:
        return [], "the question has no content words to look for"
    return [], f"no retrieved chunk holds at least {min_overlap:.0%} of the question's content words" + (
        f" or is within similarity {min_similarity}" if min_similarity is not None else "")


# ---------------------------------------------------------------------------------------- the prompt
def _path(hit: Hit) -> str:
    meta = hit.metadata or {}
    return str(meta.get("source") or meta.get("doc") or hit.id)


def source_label(hit: Hit) -> str:
    """`path: section` of a chunk, as the prompt names it."""
    meta = hit.metadata or {}
    label = _path(hit)
    section = str(meta.get("section") or "").split(" > ")[-1].strip()
    return f"{label}: {section}" if section else label


def render_message(question: str, sources: Sequence[tuple[str, str]]) -> str:
    """The user message: the instruction, the numbered sources (label, text), the question."""
    parts = [INSTRUCTION, ""]
    for n, (label, text) in enumerate(sources, start=1):
        parts += [f"[{n}] {label}", text.strip("\n"), ""]
    parts.append(f"Question: {question.strip()}")
    return "\n".join(parts)


def _encode(tokenizer: Any, message: str, chat: bool) -> list[int]:
    if chat:
        from haina.generate.chat import encode_chat

        return encode_chat(tokenizer, [{"role": "user", "content": message}])
    return tokenizer.encode(message + "\n\nAnswer:")


def _shorten(line: str, limit: int, count: Callable[[str], int]) -> str:
    """`line` cut between words to at most `limit` tokens, ending in an ellipsis when cut."""
    if count(line) <= limit:
        return line
    words = line.split(" ")
    lo, hi = 0, len(words)  # the most words whose text (plus " …") fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid]) + " …") <= limit:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " …" if lo else ""


def focus(text: str, wanted: set[str], limit: int, count: Callable[[str], int], terms: Terms) -> str:
    """At most `limit` tokens of `text`: all of it if it fits, else the window of lines holding the most of
    `wanted` (see the module docstring)."""
    if count(text) <= limit:
        return text
    cap = max(8, limit // 3)
    lines = [_shorten(line, cap, count) for line in text.strip("\n").split("\n")]
    sizes = [count(line) + 1 for line in lines]  # + the newline
    found = [terms(line) & wanted for line in lines]
    best: tuple[tuple[int, bool, int, int], int, int] | None = None
    for i, line in enumerate(lines):
        if not line.strip() or (best is not None and not found[i]):
            continue  # a window starts at the text's first line, or at a line holding a question term
        total, covered, j = 0, set(), i
        while j < len(lines) and total + sizes[j] <= limit:
            total += sizes[j]
            covered |= found[j]
            j += 1
        # A window opening on an unindented line that names a question term (a heading, a definition's header)
        # is the one that introduces the thing asked about.
        opens = not line[:1].isspace() and bool(terms(line.split("(")[0]) & wanted)
        score = (len(covered), opens, len(found[i]), -i)
        if best is None or score > best[0]:
            best = (score, i, j)
    if best is None or best[2] == best[1]:
        return _shorten(" ".join(text.split()), limit, count)
    _, i, j = best

    def window(j: int) -> str:
        return ("… " if i else "") + "\n".join(lines[i:j]).rstrip() + (" …" if j < len(lines) else "")

    while j > i + 1 and count(window(j)) > limit:  # line counts are estimates, the ellipses cost tokens too
        j -= 1
    return window(j) if count(window(j)) <= limit else _shorten(" ".join(window(j).split()), limit, count)


def _shares(needs: list[int], available: int) -> list[int]:
    """Split `available` tokens among sources needing `needs`: fair shares, what a short one leaves passed on."""
    out, left, todo = [0] * len(needs), available, sorted(range(len(needs)), key=lambda i: needs[i])
    for k, i in enumerate(todo):
        out[i] = min(needs[i], left // (len(todo) - k))
        left -= out[i]
    return out


# What a question names exactly: a quoted phrase ("async with") or a dotted name (json.dumps, _pydecimal.Decimal.abs).
_EXACT = re.compile(r'"([^"\n]{2,60})"|([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)')


def exact_names(question: str) -> list[str]:
    """The phrases a question quotes and the dotted names it spells, verbatim."""
    return [a or b for a, b in _EXACT.findall(question)]


def names_exactly(hit: Hit, names: Sequence[str]) -> bool:
    """Whether `hit` has an unindented line (a heading, a definition's header) holding one of `names` verbatim."""
    return bool(names) and any(line.strip() and not line[:1].isspace() and any(n in line for n in names)
                               for line in hit.text.split("\n"))


# A definition's header as pydoc (and `haina.data.stdlib_corpus`) lays it out: `module json`,
# `class json.JSONDecoder(object)`, `json.dumps(obj, *, ...)`; group 2 is the name defined.
_HEADER = re.compile(r"^(module |class |(?:async )?def )?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*(?:\(.*)?$")
_QUESTION_WORD = re.compile(r"[A-Za-z_]\w*")


def _is_heading(lines: list[str], i: int, section: str) -> bool:
    """Whether line i is a heading: Markdown's `#`, underlined (reStructuredText, pydoc topics), or the chunk's
    own section title."""
    line = lines[i].strip()
    # An underline is unindented and as long as its title (reStructuredText's rule): a doctest's `...` is not one.
    under = lines[i + 1] if i + 1 < len(lines) else ""
    underlined = bool(ADORNMENT.match(under)) and len(under.rstrip()) >= len(line)
    return line.startswith("#") or underlined or (bool(section) and line == section)


def defines(hit: Hit, question: str, names: Sequence[str], wanted: set[str], terms: Terms) -> bool:
    """Whether `hit` holds the heading or the definition of what `question` asks about, with text under it.

    A definition's header counts when the name it defines is one the question spells exactly (`names`), or a
    single word of the question after `module`/`class` ("the locale module": `module locale`, not
    `module _strptime` that mentions locales); a heading counts when it holds an exact name or every content
    term. Either must be followed by text in the chunk: a chunk whose last line is the header (the overlap
    that the next chunk repeats, with the documentation) does not define it, and its neighbour is numbered
    before it.
    """
    lines = hit.text.split("\n")
    section = str((hit.metadata or {}).get("section") or "").split(" > ")[-1].strip()
    words = set(_QUESTION_WORD.findall(_EXACT.sub(" ", question)))  # not the parts of a dotted name
    body = [i for i, line in enumerate(lines) if line.strip() and not ADORNMENT.match(line.strip())]
    for i in body[:-1]:  # a line with text after it
        line = lines[i]
        if line[:1].isspace():
            continue
        m = _HEADER.match(line.strip())
        if m and (m.group(2) in names or (m.group(1) in ("module ", "class ") and m.group(2) in words)):
            return True
        names_it = any(n in line for n in names) or (bool(wanted) and wanted <= terms(line))
        if names_it and _is_heading(lines, i, section):
            return True
    return False


def introduces(hit: Hit, wanted: set[str], terms: Terms) -> bool:
    """Whether `hit` has an unindented line (a heading, a definition's header up to its "(") that names every
    content term of the question: the chunk that introduces what is asked about."""
    return bool(wanted) and any(line.strip() and not line[:1].isspace() and wanted <= terms(line.split("(")[0])
                                for line in hit.text.split("\n"))


def build_prompt(question: str, hits: Sequence[Hit], tokenizer: Any, *, context: int, max_new_tokens: int,
                 terms: Terms, chat: bool | None = None, introductions_first: bool = True) -> Prompt:
    """The prompt for `question` with `hits` as numbered sources, cut to leave room for the answer.

    Args:
        question: the question.
        hits: the relevant hits, best first.
        tokenizer: the generator's tokenizer (its chat template decides the format unless `chat` is given).
        context: the model's context in tokens.
        max_new_tokens: the answer's length; min(it, context / 4) tokens are kept free for it.
        terms: the content-term analyser (`terms_for(retriever)`).
        chat: render through the chat template (None: when the tokenizer has one).
        introductions_first: number the hits that introduce what is asked about (`introduces`) first, each group
            in retrieval order.

    Raises:
        HainaError: the question alone leaves no room for a source.
    """
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    budget = context - min(max_new_tokens, context // 4)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    wanted = terms(question)
    hits = list(hits)
    if introductions_first:
        names = exact_names(question)
        # Stable: retrieval order within each group.
        hits.sort(key=lambda h: (not defines(h, question, names, wanted, terms), not names_exactly(h, names),
                                 not introduces(h, wanted, terms)))
    while hits:
        labels = [source_label(h) for h in hits]
        overhead = len(_encode(tokenizer, render_message(question, [(lab, "") for lab in labels]), chat))
        needs = [count(h.text) for h in hits]
        available = budget - overhead
        for _ in range(4):  # the shares are estimates from line counts; the exact length is checked
            shares = _shares(needs, available)
            if min(shares) < min(MIN_SOURCE_TOKENS, min(needs)):
                break
            shown = [focus(h.text, wanted, s, count, terms) for h, s in zip(hits, shares, strict=True)]
            message = render_message(question, list(zip(labels, shown, strict=True)))
            ids = _encode(tokenizer, message, chat)
            if len(ids) <= budget:
                sources = [{"n": n, "id": h.id, "source": _path(h), "label": labels[n - 1], "score": h.score,
                            "text": t}
                           for n, (h, t) in enumerate(zip(hits, shown, strict=True), start=1)]
                return Prompt(ids=ids, message=message, chat=chat, sources=sources)
            available -= max(len(ids) - budget, 2 * len(hits))  # the template and joins differ by a few
        hits = hits[:-1]  # the lowest-ranked source makes room for the others
    raise HainaError(f"the question is too long for the model's {context}-token context with any source; shorten "
                     "it, or lower --max-new-tokens")


# ---------------------------------------------------------------------------------------- citations
def parse_citations(text: str, n_sources: int) -> tuple[str, list[int], int]:
    """The answer with markers naming no source removed, the source numbers cited (first-mention order), and
    how many markers were dropped."""
    cited: list[int] = []
    dropped = 0

    def keep(m: re.Match) -> str:
        nonlocal dropped
        nums = [int(x) for x in m.group(1).split(",")]
        good = [n for n in nums if 1 <= n <= n_sources]
        dropped += len(nums) - len(good)
        cited.extend(n for n in good if n not in cited)
        return f"[{', '.join(map(str, dict.fromkeys(good)))}]" if good else ""

    cleaned = _MARKER.sub(keep, text)
    if dropped:
        cleaned = re.sub(r"[ \t]{2,}", " ", cleaned).strip()
    return cleaned, cited, dropped


def strip_markers(text: str) -> str:
    """The answer's words alone: its [n] markers removed (what is compared with a reference answer)."""
    return " ".join(_MARKER.sub(" ", text).split())


def _attach(text: str, sources: Sequence[dict[str, Any]], terms: Terms) -> int | None:
    """The number of the source holding the largest share (>= ATTACH_OVERLAP) of the answer's terms, or None."""
    said = terms(text)
    if not said:
        return None
    shares = [coverage(said, terms(s["text"])) for s in sources]
    best = max(range(len(shares)), key=lambda i: (shares[i], -i))
    return sources[best]["n"] if shares[best] >= ATTACH_OVERLAP else None


def _finish(answer: Answer, text: str, terms: Terms) -> Answer:
    text, cited, dropped = parse_citations(text.strip(), len(answer.sources))
    answer.dropped_markers = dropped
    if not cited and text:
        n = _attach(text, answer.sources, terms)
        if n is not None:
            cited, answer.attached = [n], True
            text = f"{text} [{n}]"
    answer.text = text
    by_n = {s["n"]: s for s in answer.sources}
    answer.citations = [{"n": n, "id": by_n[n]["id"], "source": by_n[n]["source"], "score": by_n[n]["score"],
                         "attached": answer.attached} for n in cited]
    return answer


# ---------------------------------------------------------------------------------------- answering
def answer_batch(questions: Sequence[str], retriever: Any, generator: Any, *, top_k: int = 8,
                 mode: str = "hybrid", where: Mapping[str, Any] | None = None, max_new_tokens: int = 128,
                 min_overlap: float = MIN_OVERLAP, min_similarity: float | None = None,
                 batch_size: int = 16) -> list[Answer]:
    """Answer each question from the collection (see the module docstring); the answers in question order.

    Args:
        questions: the questions.
        retriever: a `haina.rag.retrieve.Retriever` (anything with its `search`).
        generator: a `haina.generate.text.TextGenerator` (engine and tokenizer).
        top_k: chunks retrieved per question.
        mode: hybrid, dense or bm25.
        where: a metadata filter for retrieval.
        max_new_tokens: the longest answer.
        min_overlap: the share of the question's content terms a relevant chunk holds.
        min_similarity: also relevant: chunks this similar to the question (collections with an embedder).
        batch_size: questions generated together.
    """
    from haina.generate.chat import chat_stop_strings, chat_stop_token_ids
    from haina.generate.sampling import SamplingParams

    if not 0 < min_overlap <= 1:
        raise HainaError(f"min_overlap must be in (0, 1], got {min_overlap}")
    tok = generator.tokenizer
    chat = bool(tok.chat_template)
    terms = terms_for(retriever)
    dense = min_similarity is not None and not getattr(retriever, "bm25_only", True)
    answers: list[Answer] = []
    pending: list[tuple[Answer, Prompt]] = []
    for q in questions:
        hits = retriever.search(q, top_k=top_k, where=where, mode=mode)
        sims = _similarities(retriever, q, hits) if dense and hits else None
        kept, reason = relevant_hits(q, hits, terms, min_overlap=min_overlap, similarities=sims,
                                     min_similarity=min_similarity if dense else None)
        a = Answer(question=q, text="", retrieved=list(hits))
        answers.append(a)
        if not kept:
            a.refused, a.reason = True, reason
            a.text = "Nothing relevant to this question was found in the collection, so there is no answer."
            continue
        prompt = build_prompt(q, kept, tok, context=generator.engine.max_seq_len, max_new_tokens=max_new_tokens,
                              terms=terms, chat=chat)
        a.sources = prompt.sources
        pending.append((a, prompt))
    stop_ids = tuple(chat_stop_token_ids(tok)) if chat else ()
    stops = chat_stop_strings(tok) if chat else list(PLAIN_STOPS)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids)
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        results = generator.generate([p.ids for _, p in batch], params, stop=stops)
        for (a, _), rs in zip(batch, results, strict=True):
            _finish(a, rs[0].text, terms)
    return answers


def answer(question: str, retriever: Any, generator: Any, **options: Any) -> Answer:
    """Answer one question; options as for `answer_batch`."""
    return answer_batch([question], retriever, generator, **options)[0]


def load_generator(checkpoint: str, device: str = "auto", batch_size: int = 16) -> Any:
    """A `TextGenerator` over a haina checkpoint (its engine and tokenizer)."""
    from haina.core.device import resolve_device
    from haina.generate.engine import Engine
    from haina.generate.text import TextGenerator
    from haina.model.checkpoint import load_model

    model, tokenizer = load_model(checkpoint, device=resolve_device(device))
    if tokenizer is None:
        raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; answering needs one to read text")
    return TextGenerator(Engine(model, max_batch_size=batch_size, eos_token_id=tokenizer.eos_id), tokenizer)


def ask_command(question: str, /, collection: str, checkpoint: str, top_k: int = 8, mode: str = "hybrid",
                where: str | None = None, max_new_tokens: int = 128, min_overlap: float = MIN_OVERLAP,
                min_similarity: float | None = None, json: bool = False, device: str = "auto",
                store: str = "runs/rag", server: str | None = None, backend: str = "chroma",
                bm25_dir: str | None = None, dense_weight: float = 0.5) -> int:
    """Answer a question from a collection, citing the chunks the answer comes from.

    Retrieves the best chunks, keeps those that hold at least --min-overlap of the question's content words
    (or, with --min-similarity, are that similar to it), shows them to the model as numbered sources, and
    prints the answer with a "Sources:" list ([n] path#chunk id). When nothing relevant is found it says so
    instead of generating. Markers naming no source are removed; an answer without markers cites the source
    it overlaps most, if it overlaps one by at least half its words.

    Args:
        question: the question.
        collection: the collection to answer from.
        checkpoint: the generator: a haina checkpoint or run directory with a tokenizer (its chat template is
            used when it has one).
        top_k: chunks retrieved (those that do not fit the model's context are left out, lowest ranked first).
        mode: retrieval: hybrid (dense + BM25), dense or bm25.
        where: a JSON metadata filter, e.g. '{"source": "json/__init__.py"}'.
        max_new_tokens: the longest answer, in tokens.
        min_overlap: the share of the question's content words a chunk must hold to count as relevant.
        min_similarity: also count a chunk relevant when its vector is this similar to the question's (e.g. 0.5
            for minilm's cosine); off by default.
        json: print one JSON object: answer, citations, sources, retrieved hits, refusal.
        device: where the model and the embedder run: auto, cpu, cuda, cuda:1 or mps.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        dense_weight: hybrid fusion's weight of the dense list, BM25's being 1 (measured: haina.rag.retrieve).
    """
    import json as jsonlib

    from haina.rag.command import open_for_command, parse_where
    from haina.rag.retrieve import Retriever

    if not question.strip():
        raise HainaError("the question is empty; give the question to answer")
    flt = parse_where(where)
    generator = load_generator(checkpoint, device, batch_size=1)
    with open_for_command(store, server, backend) as s:
        retriever = Retriever(s, collection, bm25_dir=bm25_dir, device=device, dense_weight=dense_weight)
        a = answer(question, retriever, generator, top_k=top_k, mode=mode, where=flt, max_new_tokens=max_new_tokens,
                   min_overlap=min_overlap, min_similarity=min_similarity)
    if json:
        sys.stdout.write(jsonlib.dumps(a.as_dict(), ensure_ascii=False) + "\n")
        return 0
    if a.refused:
        print(f"{a.text} ({a.reason}; {len(a.retrieved)} chunk(s) retrieved from collection {collection!r})")
        return 0
    print(a.text or "(the model gave no answer)")
    print()
    print("Sources:")
    by_n = {s["n"]: s for s in a.sources}
    for c in a.citations:
        print(f"[{c['n']}] {by_n[c['n']]['source']}#{c['id']}")
    if not a.citations:
        print("  (the answer cites none of the sources shown: " +
              ", ".join(f"[{s['n']}] {s['id']}" for s in a.sources) + ")")
    if a.dropped_markers:
        print(f"({a.dropped_markers} marker(s) naming no source were removed)")
    return 0
