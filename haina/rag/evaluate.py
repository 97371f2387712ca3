"""`haina rag eval`: retrieval quality on questions whose answer chunk is known, and the answers' citations.

Retrieval, per mode (bm25, and dense and hybrid for a collection with an embedder), over the `top_k` hits of
each question. A hit answers an item when it is the item's `chunk_id`, or holds its `span` (whitespace aside;
with a `source`, in a chunk of that source or document): the chunk after the answer's may repeat it in its
overlap. Each question has one answer passage, so only the first hit that answers counts:

    recall@k    the share of questions answered within the first k hits (k = 1, 5, 10, up to top_k)
    mrr         the mean of 1 / rank of the first answering hit (0 when none is in the top_k)
    ndcg@10     the mean of 1 / log2(rank + 1) for a first answering hit within 10 (binary gain, one relevant
                passage, so the ideal DCG is 1); it equals scikit-learn's `ndcg_score` for such rankings

With `--checkpoint`, each question is also answered (`haina.rag.ask`, greedy, in the first mode: hybrid when
the collection has an embedder), and:

    citation_validity   among answers given (not refused): the share whose citations all point at a source
                        that answers the item, and that cite at least one
    cited_rate          answers given that cite anything (a marker, or a source attached by overlap)
    attached_rate       answers given whose citation was attached by overlap (no marker in the text)
    refusal_rate        questions answered "nothing relevant" (every question of a generated set has an answer)
    answer_shown_rate   questions whose answering chunk was among the sources shown (the ceiling of validity)
    dropped_markers     markers naming no source, removed from the answers (a total)
    answer_rouge_l      among answers given to items with a reference "answer": the mean ROUGE-L F1 (rouge-score,
                        stemmed) of the answer, its [n] markers removed, against the reference: whether what
                        the answer says is right, which a valid citation alone does not tell

`report.json`, `report.md` (with a table per mode and sample answers) and `recall.png` (recall@k against k per
mode) are written as every `haina eval` report is (`haina.eval.report`), so `haina eval compare` lines runs up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.rag.store import Hit

__all__ = ["KS", "first_relevant_rank", "is_relevant", "rag_eval_command", "recall_png", "retrieval_metrics"]

KS = (1, 5, 10)
NDCG_K = 10
KIND = "rag"
SAMPLE_ANSWERS = 20


def is_relevant(item: dict[str, Any], hit: Hit) -> bool:
    """Whether `hit` answers `item` (see the module docstring)."""
    if item.get("chunk_id") is not None and hit.id == item["chunk_id"]:
        return True
    span = item.get("span")
    if not isinstance(span, str) or not span.strip():
        return False
    source = item.get("source")
    meta = hit.metadata or {}
    if source is not None and source not in (meta.get("source"), meta.get("doc")):
        return False
    return " ".join(span.split()) in " ".join(hit.text.split())


def first_relevant_rank(item: dict[str, Any], hits: Sequence[Hit]) -> int | None:
    """The rank (from 1) of the first hit that answers `item`, or None."""
    return next((r for r, h in enumerate(hits, start=1) if is_relevant(item, h)), None)


def retrieval_metrics(ranks: Sequence[int | None], ks: Sequence[int] = KS, ndcg_k: int = NDCG_K) -> dict[str, float]:
    """recall@k for each k, MRR and nDCG@ndcg_k from the first relevant rank of each question (None: not found)."""
    if not ranks:
        raise HainaError("no questions to score")
    n = len(ranks)
    out = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in ks}
    out["mrr"] = sum(1 / r for r in ranks if r is not None) / n
    out[f"ndcg@{ndcg_k}"] = sum(1 / math.log2(r + 1) for r in ranks if r is not None and r <= ndcg_k) / n
    return out


def recall_png(path: str | Path, curves: dict[str, list[float]], title: str) -> None:
    """recall@k against k (1..len), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for mode, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=mode)
    ax.set_xlabel("k (hits)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _citation_valid(item: dict[str, Any], a: Any) -> bool:
    if not a.citations:
        return False
    hits = {h.id: h for h in a.retrieved}
    return all(c["id"] in hits and is_relevant(item, hits[c["id"]]) for c in a.citations)


def _rouge_l(given: Sequence[tuple[dict[str, Any], Any]]) -> float | None:
    """The mean ROUGE-L F1 of the answers (markers removed) against their items' reference answers, or None."""
    from haina.eval.textmetrics import sentence_scores
    from haina.rag.ask import strip_markers

    scores = [sentence_scores(strip_markers(a.text), [it["answer"]], ["rouge"])["rougeL"] for it, a in given
              if isinstance(it.get("answer"), str) and it["answer"].strip()]
    return sum(scores) / len(scores) if scores else None


def _answer_metrics(items: Sequence[dict[str, Any]], answers: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
    given = [(it, a) for it, a in zip(items, answers, strict=True) if not a.refused]
    n_given = len(given)

    def share(count: int, total: int) -> float | None:
        return count / total if total else None

    metrics = {
        "citation_validity": share(sum(_citation_valid(it, a) for it, a in given), n_given),
        "cited_rate": share(sum(bool(a.citations) for _, a in given), n_given),
        "attached_rate": share(sum(a.attached for _, a in given), n_given),
        "refusal_rate": share(sum(a.refused for a in answers), len(answers)),
        "answer_shown_rate": share(sum(any(is_relevant(it, h) for h in a.retrieved
                                           if h.id in {s["id"] for s in a.sources}) for it, a in given),
                                   len(answers)),
        "dropped_markers": sum(a.dropped_markers for a in answers),
        "answer_rouge_l": _rouge_l(given),
    }
    rows = [{"question": it["question"], "reference": it.get("answer"), "answer": a.text, "refused": a.refused,
             "citations": [c["id"] for c in a.citations], "valid": None if a.refused else _citation_valid(it, a),
             "answer_chunk": it.get("chunk_id")} for it, a in zip(items, answers, strict=True)]
    return metrics, rows


def rag_eval_command(collection: str, qa: str, out: str, checkpoint: str | None = None, top_k: int = 10,
                     mode: str | None = None, answer_top_k: int = 8, max_new_tokens: int = 128,
                     min_overlap: float = 0.6, min_similarity: float | None = None, limit: int | None = None,
                     batch_size: int = 16, device: str = "auto", store: str = "runs/rag", server: str | None = None,
                     backend: str = "chroma", bm25_dir: str | None = None, overwrite: bool = False,
                     dense_weight: float = 0.5) -> int:
    """Evaluate retrieval (recall@k, MRR, nDCG@10 per mode) and, with --checkpoint, the answers' citations.

    Reads a question set whose answer chunks are known (`haina rag qa` writes one) and writes OUT/report.json,
    OUT/report.md and OUT/recall.png; `haina eval compare` reads the report beside other eval reports. With
    --checkpoint every question is answered as `haina rag ask` answers it, and the report adds the share of
    answers whose citations point at a retrieved chunk holding the answer, and the refusal rate.

    Args:
        collection: the collection the questions are about.
        qa: the question set: JSONL of {"question", "chunk_id"} or {"question", "span", "source"?} (and "answer").
        out: the report directory (an earlier `rag eval` report there is replaced).
        checkpoint: also answer each question with this haina checkpoint and score its citations.
        top_k: hits retrieved per question for the retrieval metrics (recall@k is reported for k <= top_k).
        mode: evaluate this retrieval mode only: hybrid, dense or bm25 (default: every mode the collection has).
        answer_top_k: chunks retrieved for each answer (as `haina rag ask --top-k`).
        max_new_tokens: the longest answer, in tokens.
        min_overlap: the relevance rule of the answers (as `haina rag ask --min-overlap`).
        min_similarity: the dense relevance rule of the answers (as `haina rag ask --min-similarity`).
        limit: use only the first N questions.
        batch_size: answers generated together.
        device: where the embedder and the model run.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        overwrite: replace an existing OUT that is not an eval report.
        dense_weight: hybrid fusion's weight of the dense list, BM25's being 1 (measured: haina.rag.retrieve).
    """
    from haina.core.log import progress
    from haina.eval.report import Report, eval_output, markdown_table, print_summary, write_report
    from haina.rag.command import open_for_command
    from haina.rag.qa import read_qa
    from haina.rag.retrieve import MODES, Retriever

    if top_k < 1:
        raise HainaError(f"--top-k must be at least 1, got {top_k}")
    if mode is not None and mode not in MODES:
        raise HainaError(f"unknown retrieval mode {mode!r}: use hybrid, dense or bm25")
    if limit is not None and limit < 1:
        raise HainaError(f"--limit must be at least 1, got {limit}")
    items = read_qa(qa)[:limit]
    ks = [k for k in KS if k <= top_k]
    with eval_output(out, KIND, inputs=[qa, checkpoint], overwrite=overwrite) as tmp, \
            open_for_command(store, server, backend) as s:
        retriever = Retriever(s, collection, bm25_dir=bm25_dir, device=device, dense_weight=dense_weight)
        modes = [mode] if mode is not None else (["bm25"] if retriever.bm25_only else ["hybrid", "dense", "bm25"])
        if retriever.bm25_only and mode == "dense":
            raise HainaError(f"collection {collection!r} is BM25-only: it has no dense mode to evaluate")
        metrics: dict[str, Any] = {"questions": len(items)}
        per_mode: dict[str, dict[str, float]] = {}
        curves: dict[str, list[float]] = {}
        misses: dict[str, list[dict]] = {}
        for m in modes:
            ranks = []
            with progress(total=len(items), desc=f"retrieve ({m})", unit="question") as bar:
                for it in items:
                    ranks.append(first_relevant_rank(it, retriever.search(it["question"], top_k=top_k, mode=m)))
                    bar.update(1)
            per_mode[m] = retrieval_metrics(ranks, ks=ks, ndcg_k=NDCG_K)
            curves[m] = [sum(1 for r in ranks if r is not None and r <= k) / len(ranks) for k in range(1, top_k + 1)]
            misses[m] = [{"question": it["question"], "chunk_id": it.get("chunk_id")}
                         for it, r in zip(items, ranks, strict=True) if r is None][:50]
            metrics.update({f"{m}_{name}": value for name, value in per_mode[m].items()})
        details: dict[str, Any] = {"collection": collection, "store": s.location, "top_k": top_k, "modes": modes,
                                   "retrieval": per_mode, "recall_curve": curves, "misses": misses}
        names = list(next(iter(per_mode.values())))
        sections = [("Retrieval", markdown_table(["mode", *names], [[m, *per_mode[m].values()] for m in modes]))]
        if checkpoint is not None:
            from haina.rag.ask import answer_batch, load_generator

            generator = load_generator(checkpoint, device, batch_size=batch_size)
            answer_mode = modes[0]
            answers = answer_batch([it["question"] for it in items], retriever, generator, top_k=answer_top_k,
                                   mode=answer_mode, max_new_tokens=max_new_tokens, min_overlap=min_overlap,
                                   min_similarity=min_similarity, batch_size=batch_size)
            answer_metrics, rows = _answer_metrics(items, answers)
            metrics.update(answer_metrics)
            details.update({"answer_mode": answer_mode, "answer_top_k": answer_top_k, "answers": rows})
            sample = [[r["question"], (r["answer"] or "")[:120].replace("|", "\\|").replace("\n", " "),
                       ", ".join(r["citations"]) or "–", {True: "yes", False: "no", None: "refused"}[r["valid"]]]
                      for r in rows[:SAMPLE_ANSWERS]]
            sections.append(("Answers", markdown_table(["question", "answer", "cites", "valid"], sample)))
        recall_png(tmp / "recall.png", curves, f"{collection}: recall@k ({len(items)} questions)")
        obj = write_report(tmp, Report(kind=KIND, metrics=metrics, details=details, sections=sections,
                                       images=["recall.png"], checkpoint=checkpoint, data=[qa]))
    headline = [f"{modes[0]}_recall@{k}" for k in ks] + [f"{modes[0]}_mrr"]
    print_summary(obj, headline + (["citation_validity", "refusal_rate", "answer_rouge_l"] if checkpoint else []), out)
    return 0
