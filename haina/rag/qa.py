"""`haina rag qa`: question sets whose answer chunk is known, built from a collection's own chunks.

Questions come from what a chunk says about a name, the way `haina data instruct` asks about the standard
library (its question wordings and its docstring summary rule are reused from `haina.data.instruct`):

    definition   a line `module NAME`, `class NAME(...)` or `NAME(...)` with a dotted NAME at the start of a
                 line, followed by its documentation (the layout of `haina.data.stdlib_corpus`, i.e. of pydoc):
                 "What does json.dumps do?", answered by the summary of the documentation under it
    section      a chunk that begins with its section's heading (Markdown, reStructuredText, pydoc topics):
                 "Explain the "assert" statement.", answered by the summary of the text under the heading

A question is kept only when its answer is inside the chunk (whitespace aside) and its documentation's first
paragraph ends inside it, so the chunk does hold the answer. A question asked twice (one name defined in two
branches of an `if`) keeps its first chunk. Items are {"question", "answer", "chunk_id", "source", "span",
"doc", "kind"}: `span` is the text a chunk must contain to answer it (the answer itself), so that a chunk
repeating it (the overlap of the next chunk) also counts as finding it in `haina rag eval`.

Everything is deterministic: chunks are read in id order, wordings and the sample are drawn from the seed,
and `--split train|test` divides by a seeded hash of each chunk's document (its `doc` metadata), so the
questions of a test set are about documents no fine-tuning question was about.

With `--sft-out DIR` (and the `--checkpoint` to be fine-tuned), the command also writes fine-tuning records
{"prompt", "response"} (`haina finetune sft` reads them): the prompt is exactly what `haina rag ask` builds for
the question (`haina.rag.ask.build_prompt`, for that checkpoint's tokenizer and context, with its retrieved
sources), the response is `[n] answer`, n numbering the source that holds the answer. Where retrieval missed
that chunk it is put in at a seeded position, so the model learns to pick the source by its content, not by
its rank. A model tuned so cites by itself.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from haina.core.errors import HainaError
from haina.core.log import info
from haina.rag.chunk import ADORNMENT
from haina.rag.store import Hit, Record

__all__ = ["build_qa", "chunk_questions", "normalize", "qa_command", "read_qa", "sft_records", "split_of_doc"]

COMMAND = "rag qa"
SFT_VAL_FRACTION = 0.05
# `module json`, `class json.JSONDecoder(object)`, `json.dumps(obj, *, ...)`, `async def asyncio.sleep(...)`
_DEFINITION = re.compile(r"^(?:(module|class|async def) )?((?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*|(?<=module )[A-Za-z_]\w*)"
                         r"(?:\(.*\))?\s*$")
SECTION_TEMPLATES = ("Explain {name}.", "What does the documentation say about {name}?",
                     "What should I know about {name}?")


def normalize(text: str) -> str:
    """`text` with every run of whitespace one space: how spans are compared with chunks."""
    return " ".join(text.split())


def split_of_doc(doc: str, seed: int = 0, test_fraction: float = 0.2) -> str:
    """"test" or "train" for every question about document `doc`: a seeded hash, the same in every process."""
    digest = hashlib.blake2b(f"qa-split:{seed}:{doc}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2**64 < test_fraction else "train"


def _wording(kind: str, name: str, seed: int) -> str:
    from haina.data.instruct import TEMPLATES

    templates = SECTION_TEMPLATES if kind == "section" else TEMPLATES[kind]
    return random.Random(f"{seed}:{kind}:{name}").choice(templates).format(name=name)


def _definitions(lines: list[str]) -> Iterable[tuple[str, str, str, bool]]:
    """(kind, name, documentation, whether its first paragraph ends in the chunk) per definition line."""
    heads = [(i, m) for i, line in enumerate(lines) if (m := _DEFINITION.match(line))]
    for k, (i, m) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        body = lines[i + 1:end]
        if m.group(1) != "module":  # a docstring is indented under its header; the first unindented line ends it
            stop = next((j for j, line in enumerate(body) if line.strip() and not line[:1].isspace()), len(body))
            body, end = body[:stop], i + 1 + stop
        doc = textwrap.dedent("\n".join(body)).strip("\n")
        first_break = doc.find("\n\n")
        ends_inside = end < len(lines) or first_break != -1
        kind = {"module": "module", "class": "class"}.get(m.group(1) or "", "function")
        yield kind, m.group(2), doc, ends_inside


def _section(record: Record) -> tuple[str, str, bool] | None:
    """(heading, text under it, whether its first paragraph ends in the chunk) for a chunk opening its section."""
    heading = str(record.metadata.get("section") or "").split(" > ")[-1].strip()
    lines = record.text.strip("\n").split("\n")
    while lines and (not lines[0].strip() or ADORNMENT.match(lines[0])):
        lines = lines[1:]
    if not heading or not lines or lines[0].strip().lstrip("#").strip() != heading:
        return None
    body = lines[1:]
    while body and (not body[0].strip() or ADORNMENT.match(body[0])):
        body = body[1:]
    text = "\n".join(body)
    return heading, text, "\n\n" in text.strip("\n")


def chunk_questions(record: Record, seed: int = 0) -> list[dict[str, Any]]:
    """The questions one chunk answers (see the module docstring), in the order its text has them."""
    from haina.data.instruct import summarize

    found: list[tuple[str, str, str, bool]] = []
    section = _section(record)
    if section is not None:
        heading, body, ends = section
        found.append(("section", heading, body, ends))
    found += _definitions(record.text.split("\n"))
    flat = normalize(record.text)
    out = []
    for kind, name, doc, ends_inside in found:
        summary, _ = summarize(doc)
        if summary is None or not ends_inside or normalize(summary) not in flat:
            continue
        subject = name[0].lower() + name[1:] if kind == "section" and name.startswith("The ") else name
        meta = record.metadata or {}
        out.append({"question": _wording(kind, subject, seed), "answer": summary, "chunk_id": record.id,
                    "source": meta.get("source"), "span": normalize(summary), "doc": meta.get("doc"), "kind": kind})
    return out


def _order(record: Record) -> tuple[str, int, str]:
    meta = record.metadata or {}
    return str(meta.get("doc", record.id)), int(meta.get("chunk", 0)) if str(meta.get("chunk", "")).isdigit() else 0, \
        record.id


def build_qa(records: Iterable[Record], n: int | None = 500, seed: int = 0,
             split: Literal["all", "train", "test"] = "all", test_fraction: float = 0.2) -> tuple[list[dict], Counter]:
    """A question set from a collection's records: at most `n` items (a seeded sample), and counts by outcome.

    Args:
        records: the collection's records (any order).
        n: how many questions at most (None: all).
        seed: the seed of the wordings, the split and the sample.
        split: all documents, or only the train or test share of them (by a seeded hash of `doc`).
        test_fraction: the share of documents in the test split.
    """
    counts: Counter = Counter()
    items, seen = [], set()
    for record in sorted(records, key=_order):
        doc = str((record.metadata or {}).get("doc") or record.id.rsplit(":", 1)[0])
        if split != "all" and split_of_doc(doc, seed, test_fraction) != split:
            continue
        counts["chunks"] += 1
        for item in chunk_questions(record, seed):
            if item["question"] in seen:
                counts["duplicate_question"] += 1
                continue
            seen.add(item["question"])
            items.append(item)
    counts["candidates"] = len(items)
    if n is not None and n < len(items):
        keep = set(random.Random(f"qa-sample:{seed}").sample(range(len(items)), n))
        items = [it for i, it in enumerate(items) if i in keep]
    return items, counts


def read_qa(path: str | Path) -> list[dict[str, Any]]:
    """A question set (JSONL): each item a "question" and "chunk_id", or "span" (with an optional "source")."""
    from haina.data.records import iter_records

    items = []
    for n, rec in enumerate(iter_records(str(path), what="--qa"), start=1):
        if not isinstance(rec.get("question"), str) or not rec["question"].strip():
            raise HainaError(f"--qa {path}: item {n} has no \"question\" string")
        if not isinstance(rec.get("chunk_id"), str) and not isinstance(rec.get("span"), str):
            raise HainaError(f"--qa {path}: item {n} names neither \"chunk_id\" nor a \"span\" of text; each "
                             "question needs the chunk (or the text) that answers it")
        items.append(rec)
    if not items:
        raise HainaError(f"--qa {path} holds no questions; build a set with `haina rag qa`")
    return items


# ---------------------------------------------------------------------------------------- fine-tuning data
def sft_records(items: Sequence[dict[str, Any]], retriever: Any, tokenizer: Any, *, context: int, top_k: int = 8,
                mode: str = "hybrid", max_new_tokens: int = 128, seed: int = 0) -> tuple[list[dict], Counter]:
    """{"prompt", "response", "doc"} records that teach citing (see the module docstring), and counts."""
    from haina.rag.ask import build_prompt, relevant_hits, terms_for

    terms = terms_for(retriever)
    rng = random.Random(f"sft:{seed}")
    out, counts = [], Counter()
    by_id = {r.id: r for r in retriever.store.get(retriever.collection, ids=sorted({it["chunk_id"] for it in items}))}
    for item in items:
        gold = by_id.get(item["chunk_id"])
        if gold is None:
            counts["chunk_gone"] += 1
            continue
        hits, _ = relevant_hits(item["question"], retriever.search(item["question"], top_k=top_k, mode=mode), terms)
        if not any(h.id == gold.id for h in hits):
            counts["answer_chunk_inserted"] += 1
            hits = hits[:top_k - 1]
            hits.insert(rng.randint(0, len(hits)), Hit(id=gold.id, score=0.0, distance=0.0, text=gold.text,
                                                        metadata=gold.metadata))
        prompt = build_prompt(item["question"], hits, tokenizer, context=context, max_new_tokens=max_new_tokens,
                              terms=terms, chat=True)
        n = next((s["n"] for s in prompt.sources if s["id"] == gold.id), None)
        if n is None or normalize(item["span"]) not in normalize(prompt.sources[n - 1]["text"]):
            counts["answer_cut_for_context"] += 1  # the model would be taught to cite what it cannot see
            continue
        out.append({"prompt": prompt.message, "response": f"[{n}] {item['answer']}", "doc": item.get("doc")})
        counts["records"] += 1
    return out, counts


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def qa_command(collection: str, out: str, n: int = 500, seed: int = 0,
               split: Literal["all", "train", "test"] = "all", test_fraction: float = 0.2,
               sft_out: str | None = None, checkpoint: str | None = None, top_k: int = 8, mode: str = "hybrid",
               max_new_tokens: int = 128, device: str = "auto", store: str = "runs/rag", server: str | None = None,
               backend: str = "chroma", bm25_dir: str | None = None, overwrite: bool = False,
               dense_weight: float = 0.5) -> int:
    """Build a question set from a collection's chunks, each question with the chunk that answers it.

    Questions ask about the names a chunk documents ("What does json.dumps do?") and the sections it opens, and
    are answered by the summary of the text under them (the rule of `haina data instruct`). The same
    collection and seed give the same file. `haina rag eval --qa OUT` measures retrieval and answers with it.

    Args:
        collection: the collection to ask about.
        out: the JSONL file to write: {"question", "answer", "chunk_id", "source", "span", "doc", "kind"} a line.
        n: at most this many questions (a seeded sample over all documents).
        seed: the seed of the wordings, the split and the sample.
        split: all documents, or the train or test share of them (test: documents a fine-tuning set built
            with --split train never asks about).
        test_fraction: the share of documents in the test split.
        sft_out: also write fine-tuning records that teach citing into this directory (train.jsonl, val.jsonl,
            report.json), for `haina finetune sft`; needs --checkpoint.
        checkpoint: the model to be fine-tuned (its tokenizer and context shape the prompts).
        top_k: sources retrieved per fine-tuning prompt (as `haina rag ask --top-k`).
        mode: retrieval for the fine-tuning prompts: hybrid, dense or bm25.
        max_new_tokens: the room left for the answer (as `haina rag ask --max-new-tokens`).
        device: where the embedder runs.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        overwrite: replace an existing --sft-out directory that is not a `haina rag qa` output.
        dense_weight: hybrid fusion's weight of the dense list, BM25's being 1 (measured: haina.rag.retrieve).
    """
    from haina.core.io import atomic_path, write_json
    from haina.core.output import output_dir
    from haina.rag.command import open_for_command

    if n < 1:
        raise HainaError(f"--n must be at least 1, got {n}")
    if not 0 < test_fraction < 1:
        raise HainaError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if sft_out is not None and checkpoint is None:
        raise HainaError("--sft-out needs --checkpoint: the model to fine-tune, whose tokenizer and context "
                         "shape the prompts")
    with open_for_command(store, server, backend) as s:
        items, counts = build_qa(s.get(collection), n=n, seed=seed, split=split, test_fraction=test_fraction)
        if not items:
            raise HainaError(f"collection {collection!r} gave no questions ({counts['chunks']} chunks in split "
                             f"{split!r}); questions come from documented names and section headings")
        if sft_out is not None:
            from haina.finetune.sft_data import prepare_chat_tokenizer
            from haina.model.checkpoint import load_model
            from haina.rag.retrieve import Retriever

            model, tok = load_model(checkpoint)
            if tok is None:
                raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; the prompts need it")
            tokenizer = prepare_chat_tokenizer(tok, model.cfg.vocab_size)  # as `finetune sft` will render them
            retriever = Retriever(s, collection, bm25_dir=bm25_dir, device=device, dense_weight=dense_weight)
            records, sft_counts = sft_records(items, retriever, tokenizer, context=model.cfg.block_size,
                                              top_k=top_k, mode=mode, max_new_tokens=max_new_tokens, seed=seed)
            with output_dir(sft_out, COMMAND, inputs=[checkpoint], overwrite=overwrite,
                            extra={"seed": seed}) as tmp:
                val = [r for r in records if split_of_doc(str(r["doc"]), seed + 1, SFT_VAL_FRACTION) == "test"]
                train = [r for r in records if split_of_doc(str(r["doc"]), seed + 1, SFT_VAL_FRACTION) != "test"]
                _write_jsonl(tmp / "train.jsonl", ({"prompt": r["prompt"], "response": r["response"]} for r in train))
                _write_jsonl(tmp / "val.jsonl", ({"prompt": r["prompt"], "response": r["response"]} for r in val))
                write_json(tmp / "report.json", {"collection": collection, "checkpoint": checkpoint, "seed": seed,
                                                 "split": split, "train": len(train), "val": len(val),
                                                 "context": model.cfg.block_size, **dict(sft_counts)})
            info(f"wrote {len(train):,} + {len(val):,} fine-tuning records to {sft_out} "
                 f"({sft_counts['answer_chunk_inserted']:,} with the answer chunk put in, "
                 f"{sft_counts['answer_cut_for_context']:,} left out: answer cut for the context)")
    with atomic_path(out) as tmp_file:
        _write_jsonl(tmp_file, items)
    kinds = Counter(it["kind"] for it in items)
    info(f"wrote {len(items):,} questions to {out} from {counts['chunks']:,} chunks "
         f"({', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))}; {counts['candidates']:,} candidates)")
    return 0
