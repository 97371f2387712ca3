"""Reciprocal rank fusion: one ranking from several (BM25 and dense retrieval), by rank alone.

Each list gives a document `weight / (k + rank)`, rank counting from 1, and a document's fused score is the
sum over the lists that hold it (Cormack, Clarke and Büttcher, SIGIR 2009). Only ranks count, so scores on
different scales (BM25's unbounded ones, cosine similarities) need no calibration; k = 60 damps the gap
between the first few ranks, as in the paper.

Ties are broken deterministically: by fused score, then by the best rank the document has in any list, then by
id. A document's contributions are summed in a fixed order (smallest first), so two documents with the same
ranks in different lists get bit-identical scores and fall to the tie-break rather than to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from haina.core.errors import HainaError

RRF_K = 60


def _id(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Any]], k: float = RRF_K,
                           weights: Sequence[float] | None = None,
                           top_k: int | None = None) -> list[tuple[str, float]]:
    """Fuse ranked lists of ids into one, best first, as (id, fused score).

    Args:
        rankings: the lists, each best first: ids, or (id, score) pairs whose scores are ignored. An id repeated
            within one list counts at its best rank.
        k: the rank offset (60 by default; smaller trusts the top ranks more).
        weights: one weight per list (default 1 each).
        top_k: keep this many (None: all).
    """
    if k < 0:
        raise HainaError(f"the fusion constant k must be at least 0, got {k}")
    if weights is not None and len(weights) != len(rankings):
        raise HainaError(f"{len(weights)} fusion weights for {len(rankings)} rankings; give one per ranking")
    parts: dict[str, list[float]] = {}
    best: dict[str, int] = {}
    for n, ranking in enumerate(rankings):
        w = 1.0 if weights is None else float(weights[n])
        seen: set[str] = set()
        for rank, entry in enumerate(ranking, start=1):
            doc = _id(entry)
            if doc in seen:
                continue
            seen.add(doc)
            parts.setdefault(doc, []).append(w / (k + rank))
            best[doc] = min(best.get(doc, rank), rank)
    fused = {doc: sum(sorted(p)) for doc, p in parts.items()}
    order = sorted(fused, key=lambda doc: (-fused[doc], best[doc], doc))
    return [(doc, fused[doc]) for doc in (order if top_k is None else order[:top_k])]


__all__ = ["RRF_K", "reciprocal_rank_fusion"]
