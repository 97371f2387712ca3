"""Retrieval over a collection: dense vectors, BM25 keywords, or both fused; optionally reranked by a generator.

`Retriever(store, collection).search(text, top_k, where, mode)` returns `Hit`s, best first. The score of a hit
depends on the mode, and is comparable only within one result list:

    dense    the store's similarity to the query's embedding: cosine similarity, inner product, or minus the
             squared L2 distance (by the collection's metric); `distance` is the store's distance
    bm25     the BM25 score (Lucene variant, > 0; only chunks sharing a term with the query are hits)
    hybrid   the reciprocal rank fusion of the dense and BM25 candidate lists: the sum of w / (60 + rank) over
             the lists that hold the chunk, w = 1 for BM25 and `dense_weight` (0.5) for dense; ranks alone count,
             so the two scales need no calibration
    rerank   (with a reranker) the generator's mean log-probability per token of the query given the chunk (<= 0)

For bm25, hybrid and reranked hits `distance` is minus the score. `where` (Chroma's filter syntax,
`haina.rag.filters`) restricts every mode: the dense side passes it to the store, the BM25 side keeps the ids
the store says match it.

Why BM25 counts twice the dense list: on the docs assistant's questions (`haina rag qa`, the training split's,
500 of them) the answer chunk was among the 5 fused hits for 94.4% at equal weights, 96.0% at dense 0.5 and
96.6% at 0.35 (BM25 alone: 96.8%, MiniLM alone: 79%); questions that name what they ask about favour the
keywords, while the dense side still finds paraphrases BM25 misses. `dense_weight` changes it per retriever
(`--dense-weight`).

A collection indexed without an embedder is BM25-only: there hybrid is BM25 and dense is refused. The query
embedder is the one the collection recorded at index time unless another is given.

Reranking (`LoglikReranker`) scores each of the first `rerank_depth` fused candidates by log p(query | chunk)
under a haina checkpoint, with the eval stage's log-likelihood scorer (`haina.eval.loglik`): a chunk that makes
the question likely is one that answers it, judged by the model that will answer. It costs one forward pass
over chunk + query per candidate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from haina.core.errors import HainaError
from haina.rag.fuse import RRF_K, reciprocal_rank_fusion
from haina.rag.index import BM25Side, is_bm25_only, load_embedder, rag_settings
from haina.rag.store import Hit, Record, VectorStore

DENSE_WEIGHT = 0.5  # the dense list's weight in hybrid fusion, BM25's being 1 (see the module docstring)

__all__ = ["DENSE_WEIGHT", "MODES", "LoglikReranker", "Retriever"]

MODES = ("hybrid", "dense", "bm25")
RERANK_PROMPT = "{text}\n\nA question this passage answers:"


class LoglikReranker:
    """Reorders hits by the mean log-probability of the query given each chunk under a haina checkpoint.

    Args:
        checkpoint: a haina checkpoint or run directory (the generator).
        device: auto, cpu, cuda, cuda:1 or mps.
        batch_size: sequences per forward pass.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", batch_size: int = 8):
        from haina.core.device import resolve_device
        from haina.model.checkpoint import load_model

        self.model, self.tokenizer = load_model(checkpoint, device=resolve_device(device))
        if self.tokenizer is None:
            raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; reranking reads text with it")
        self.batch_size = batch_size
        self.context = self.model.cfg.block_size

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """log p(query | prompt(text)) / query tokens, for each text."""
        from haina.eval.loglik import encode_pair, loglikelihood

        pairs = [encode_pair(self.tokenizer, RERANK_PROMPT.format(text=t), " " + query) for t in texts]
        longest = max((len(cont) for _, cont in pairs), default=0)
        if longest >= self.context - 1:
            raise HainaError(f"the query is {longest} tokens, too long for the reranker's {self.context}-token "
                             "context; shorten it or rerank with a model of a longer context")
        # Left truncation keeps the query and the end of a chunk that does not fit whole.
        results = loglikelihood(self.model, pairs, max_length=self.context, batch_size=self.batch_size)
        return [ll / max(1, len(cont)) for (ll, _), (_, cont) in zip(results, pairs, strict=True)]

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """The hits by their rerank score, best first (ties keep the retrieval order)."""
        scores = self.scores(query, [h.text for h in hits])
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
        return [Hit(id=hits[i].id, score=scores[i], distance=-scores[i], text=hits[i].text,
                    metadata=hits[i].metadata) for i in order]


class Retriever:
    """Search one collection (see the module docstring).

    Args:
        store: the vector store.
        collection: the collection's name.
        embedder: the query embedder (a spec, a recorded description or an `Embedder`); None: the collection's.
        bm25_dir: where the collection's BM25 index lives (None: beside the store, see `haina.rag.index`).
        reranker: a `LoglikReranker`, or a haina checkpoint to load one from; None: no reranking.
        device: where the embedder and reranker run.
        dense_weight: the dense list's weight in hybrid fusion (BM25's is 1).
    """

    def __init__(self, store: VectorStore, collection: str, *, embedder: Any = None,
                 bm25_dir: str | os.PathLike | None = None, reranker: LoglikReranker | str | None = None,
                 device: str = "auto", dense_weight: float = DENSE_WEIGHT):
        if not 0 <= dense_weight:
            raise HainaError(f"--dense-weight must be 0 or more (the dense list's weight in hybrid fusion, BM25's "
                             f"being 1), got {dense_weight}")
        self.dense_weight = dense_weight
        self.store = store
        self.collection = collection
        self.info = store.get_collection(collection)
        self.bm25_only = is_bm25_only(self.info)
        settings = rag_settings(self.info) or {}
        self._embedder_spec = embedder if embedder is not None else settings.get("embedder")
        self._embedder = None
        self._bm25 = None
        self._bm25_dir = bm25_dir
        self.device = device
        self.reranker = LoglikReranker(reranker, device=device) if isinstance(reranker, str | os.PathLike) \
            else reranker

    @property
    def embedder(self):
        """The query embedder, loaded on first use."""
        if self._embedder is None:
            if self._embedder_spec is None:
                raise HainaError(f"collection {self.collection!r} names no embedder for dense retrieval; pass "
                                 "--embedder (the model its vectors came from) or use --mode bm25")
            self._embedder = load_embedder(self._embedder_spec, self.device)
            if self._embedder.dim != self.info.dim:
                raise HainaError(f"the embedder gives {self._embedder.dim}-dimensional vectors but collection "
                                 f"{self.collection!r} holds {self.info.dim}; query with the model it was indexed with")
        return self._embedder

    def bm25(self):
        """The collection's BM25 index, loaded (and rebuilt if stale) on first use."""
        if self._bm25 is None:
            self._bm25 = BM25Side(self.store, self.collection, self._bm25_dir).load()
        return self._bm25

    def search(self, text: str, top_k: int = 5, where: Mapping[str, Any] | None = None, mode: str = "hybrid",
               candidates: int = 50, rerank_depth: int = 20) -> list[Hit]:
        """The best `top_k` chunks for `text`, best first.

        Args:
            text: the query.
            top_k: how many hits.
            where: a metadata filter (Chroma's syntax), e.g. {"source": "guide.md"}.
            mode: hybrid, dense or bm25.
            candidates: how many each side contributes to the fusion (at least top_k).
            rerank_depth: with a reranker, how many fused hits it reorders (at least top_k).
        """
        if mode not in MODES:
            raise HainaError(f"unknown retrieval mode {mode!r}: use hybrid, dense or bm25")
        if not isinstance(text, str) or not text.strip():
            raise HainaError("the query is empty; give the text to search for")
        for name, value in (("top_k", top_k), ("candidates", candidates), ("rerank_depth", rerank_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HainaError(f"{name} must be a positive integer, got {value!r}")
        if self.bm25_only:
            if mode == "dense":
                raise HainaError(f"collection {self.collection!r} is BM25-only (indexed without an embedder); use "
                                 "--mode bm25 or hybrid, or index it again with --embedder into a new collection")
            mode = "bm25"
        want = max(top_k, rerank_depth) if self.reranker is not None else top_k
        pool = max(candidates, want)
        if mode == "dense":
            hits = self._dense(text, want, where)
        elif mode == "bm25":
            hits = self._keyword_hits(self._keyword(text, want, where))
        else:
            dense = self._dense(text, pool, where)
            fused = reciprocal_rank_fusion([[h.id for h in dense], self._keyword(text, pool, where)], k=RRF_K,
                                           weights=(self.dense_weight, 1.0), top_k=want)
            known = {h.id: h for h in dense}
            records = self._records([i for i, _ in fused if i not in known])
            hits = []
            for i, score in fused:
                src = known.get(i) or records.get(i)
                if src is not None:  # deleted between the two lookups: dropped rather than shown empty
                    hits.append(Hit(id=i, score=score, distance=-score, text=src.text, metadata=src.metadata))
        if self.reranker is not None and hits:
            hits = self.reranker.rerank(text, hits)
        return hits[:top_k]

    def _dense(self, text: str, k: int, where: Mapping[str, Any] | None) -> list[Hit]:
        vector = self.embedder.embed([text])
        return self.store.query(self.collection, vector, top_k=k, where=where)[0]

    def _keyword(self, text: str, k: int, where: Mapping[str, Any] | None) -> list[tuple[str, float]]:
        allowed = None
        if where:  # the store validates the filter (unknown fields, bad operators) and says which ids pass
            allowed = [r.id for r in self.store.get(self.collection, where=where)]
            if not allowed:
                return []
        return self.bm25().query(text, top_k=k, allowed=allowed)

    def _records(self, ids: list[str]) -> dict[str, Record]:
        return {r.id: r for r in self.store.get(self.collection, ids=ids)} if ids else {}

    def _keyword_hits(self, ranked: list[tuple[str, float]]) -> list[Hit]:
        records = self._records([i for i, _ in ranked])
        return [Hit(id=i, score=s, distance=-s, text=records[i].text, metadata=records[i].metadata)
                for i, s in ranked if i in records]
