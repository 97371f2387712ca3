"""Retriever data: JSONL query/passage pairs → token ids → batches of distinct passages; the retrieval metrics.

A record pairs a query with the passage that answers it, under any of these names (extra keys are ignored):

    {"query", "passage"}   {"question", "answer"}   {"prompt", "response"}   {"anchor", "positive"}

`haina data instruct --from-stdlib` writes the third. `embed.query_field` and `embed.passage_field` name
another pair instead. A record may add a hard negative (`"negative"`, `embed.negative_field`): a passage that
looks like the answer and is not. Nothing is dropped silently: a record that is not an object, lacks a field,
holds something other than text, or whose negative is its own passage, is kept with its file, line and
reason for OUT/rejects.jsonl.

In-batch negatives assume that every other passage of a batch is wrong for a query. The same passage twice in
one batch would break that (the stdlib's docstrings repeat: two questions, one answer), so `PairBatches`
draws a batch from distinct passages: B passages without replacement, then one of each passage's queries.
What can still coincide, a hard negative that is another row's passage or two rows asking the same question,
is masked in the loss (`haina.finetune.embed.info_nce`) by the text ids every batch carries.

Validation holds out whole passages (all the queries of a held-out passage), so no validation passage is
seen in training; its metrics rank each query's own passage among every distinct validation passage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from haina.core.errors import HainaError
from haina.finetune.sft_data import RecordError, json_type, message_text, nothing_usable, parse_records

PAIRS: tuple[tuple[str, str], ...] = (("query", "passage"), ("question", "answer"), ("prompt", "response"),
                                      ("anchor", "positive"))
SHAPES = "'query' + 'passage' (or 'question' + 'answer', 'prompt' + 'response', 'anchor' + 'positive')"
MIN_HELD_OUT = 20  # fewer pairs than this: nothing is held out for validation (as for SFT and classification)


class Pair(NamedTuple):
    """One usable record: the query, its passage, an optional hard negative, and where it came from."""

    query: str
    passage: str
    negative: str | None
    source: str
    line: int


@dataclass
class PairRecords:
    """The usable pairs of some files, and every record that was not usable, with its reason."""

    pairs: list[Pair] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # {"source", "line", "reason", "record"}
    read: int = 0


# ---------------------------------------------------------------------------------------------- records
def record_to_pair(obj: object, *, fields: tuple[str, str] | None = None,
                   negative_field: str = "negative") -> tuple[str, str, str | None]:
    """(query, passage, negative or None) of a record; RecordError(reason) when it is unusable.

    Args:
        obj: the parsed JSON record.
        fields: the (query, passage) field names; None finds one of `PAIRS` in the record.
        negative_field: the optional hard negative's field.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"not a JSON object ({json_type(obj)})")
    if fields is None:
        fields = next((f for f in PAIRS if f[0] in obj and f[1] in obj), None)
        if fields is None:
            half = next(((a, b) if a in obj else (b, a) for a, b in PAIRS if a in obj or b in obj), None)
            if half is not None:
                raise RecordError(f"'{half[0]}' without '{half[1]}'")
            raise RecordError(f"no query/passage pair: records need {SHAPES}")
    for name in fields:
        if name not in obj:
            raise RecordError(f"no '{name}' field")
    query, passage = message_text(obj[fields[0]], fields[0]), message_text(obj[fields[1]], fields[1])
    negative = obj.get(negative_field)
    if negative is not None:
        negative = message_text(negative, negative_field)
        if negative == passage:
            raise RecordError(f"'{negative_field}' is the passage itself: a hard negative must be another text")
    return query, passage, negative


def read_pairs(paths: str | Path | Sequence[str | Path], *, fields: tuple[str, str] | None = None,
               negative_field: str = "negative", what: str = "--data") -> PairRecords:
    """The pairs of JSONL files (see the module docstring), and the rejected records.

    Raises:
        HainaError: no record at all is usable (one line naming the commonest reasons).
    """
    def parse(rec) -> Pair:
        return Pair(*record_to_pair(rec.obj, fields=fields, negative_field=negative_field), rec.source, rec.line)

    pairs, rejects, read = parse_records(paths, parse)
    if not pairs:
        e = nothing_usable(paths, rejects, "pair", f"'{fields[0]}' + '{fields[1]}'" if fields else SHAPES)
        raise HainaError(f"{what}: {e}")
    return PairRecords(pairs=pairs, rejects=rejects, read=read)


def hold_out(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val): a seeded `fraction` of the distinct passages held out, with every query of each.

    Nothing is held out from fewer than MIN_HELD_OUT pairs, and training keeps at least one passage.
    """
    passages = list(dict.fromkeys(p.passage for p in pairs))
    if fraction <= 0 or len(pairs) < MIN_HELD_OUT or len(passages) < 2:
        return pairs, []
    order = torch.randperm(len(passages), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {passages[i] for i in order[:min(max(1, round(fraction * len(passages))), len(passages) - 1)]}
    return [p for p in pairs if p.passage not in held], [p for p in pairs if p.passage in held]


# ---------------------------------------------------------------------------------------------- tokens
@dataclass
class EncodedPairs:
    """Pairs as token ids, with the id of each text: equal ids mean equal texts (`text_ids`)."""

    queries: list[list[int]]
    passages: list[list[int]]
    negatives: list[list[int] | None]
    qid: list[int]  # the query's text id (queries have their own id space)
    pid: list[int]  # the passage's text id, shared with negatives: a negative that is some passage gets its id
    nid: list[int]  # the negative's text id, -1 without one
    truncated: int = 0  # texts cut to the training block


def text_ids(texts: Sequence[str | None], space: dict[str, int]) -> list[int]:
    """An id per text, equal for equal texts (new texts added to `space`); -1 for None."""
    return [-1 if t is None else space.setdefault(t, len(space)) for t in texts]


def encode_pairs(pairs: Sequence[Pair], encode) -> EncodedPairs:
    """Token ids of every text of `pairs`; `encode(texts)` -> (ids, how many were cut) reads texts as the
    embedder will (`haina.finetune.classify_data.encode_texts` with the pooling reader)."""
    q, cut_q = encode([p.query for p in pairs])
    p, cut_p = encode([p.passage for p in pairs])
    with_neg = [i for i, pair in enumerate(pairs) if pair.negative is not None]
    n_ids, cut_n = encode([pairs[i].negative for i in with_neg]) if with_neg else ([], 0)
    negatives: list[list[int] | None] = [None] * len(pairs)
    for i, ids in zip(with_neg, n_ids, strict=True):
        negatives[i] = ids
    passages: dict[str, int] = {}
    pid = text_ids([x.passage for x in pairs], passages)
    return EncodedPairs(queries=q, passages=p, negatives=negatives, qid=text_ids([x.query for x in pairs], {}),
                        pid=pid, nid=text_ids([x.negative for x in pairs], passages), truncated=cut_q + cut_p + cut_n)


def _padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and lengths (B,); an empty sequence (no negative) is a row of padding, length 0."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    idx = torch.full((len(seqs), max(1, int(lengths.max()) if len(seqs) else 1)), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        idx[r, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx, lengths


def stack_padded(parts: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Row blocks of right-padded ids, each padded on the right to the widest and stacked: (ΣB, T)."""
    T = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, T - p.shape[1]), value=pad_id) for p in parts])


class PairBatches:
    """Encoded pairs, drawn as batches of distinct passages for the one loop.

    A batch of B pairs is a dict of row tensors (so `RankRows` gives each rank its rows): `q_idx` (B, Tq) and
    `q_len` (B,) the queries, `p_idx`/`p_len` their passages, `n_idx`/`n_len` the hard negatives (length 0 for a
    row without one), `qid`/`pid`/`nid` (B,) the texts' ids (`EncodedPairs`), and `tokens` the real tokens in it.
    All randomness comes from the generator given to `get_batch`, so a resumed run draws the same batches.

    Args:
        data: the encoded pairs (none empty).
        pad_id: the id put in padding positions (never read: pooling looks at real tokens only).
    """

    def __init__(self, data: EncodedPairs, pad_id: int):
        if not data.queries:
            raise HainaError("no pairs to batch; check the data's rejects")
        self.data, self.pad_id = data, pad_id
        rows: dict[int, list[int]] = {}
        for i, p in enumerate(data.pid):
            rows.setdefault(p, []).append(i)
        self.groups = [torch.tensor(r, dtype=torch.long) for r in rows.values()]  # the rows of each distinct passage
        self.sizes = torch.tensor([len(g) for g in self.groups], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.data.queries)

    @property
    def passages(self) -> int:
        """How many distinct passages there are: the most pairs one batch can hold."""
        return len(self.groups)

    def batch(self, rows: Sequence[int]) -> dict:
        d = self.data
        q_idx, q_len = _padded([d.queries[i] for i in rows], self.pad_id)
        p_idx, p_len = _padded([d.passages[i] for i in rows], self.pad_id)
        n_idx, n_len = _padded([d.negatives[i] or [] for i in rows], self.pad_id)
        ids = {k: torch.tensor([getattr(d, k)[i] for i in rows], dtype=torch.long) for k in ("qid", "pid", "nid")}
        return {"q_idx": q_idx, "q_len": q_len, "p_idx": p_idx, "p_len": p_len, "n_idx": n_idx, "n_len": n_len,
                **ids, "tokens": int(q_len.sum() + p_len.sum() + n_len.sum())}

    def draw(self, batch_size: int, generator: torch.Generator) -> list[int]:
        """The rows of one training batch: `batch_size` distinct passages, then one query of each, at random."""
        if batch_size > len(self.groups):
            raise HainaError(f"a batch of {batch_size} pairs needs as many distinct passages, and the training data "
                             f"has {len(self.groups)}; lower train.batch_size (under --nproc: per process × processes)")
        groups = torch.randperm(len(self.groups), generator=generator)[:batch_size]
        picks = (torch.rand(batch_size, generator=generator) * self.sizes[groups]).long()
        return [int(self.groups[g][k]) for g, k in zip(groups.tolist(), picks.tolist(), strict=True)]

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
        return self.batch(self.draw(batch_size, generator))  # block_size: texts were cut when encoded


@dataclass
class RetrievalSet:
    """Validation as retrieval: each query's own passage (`gold`) among every distinct passage of the set."""

    queries: list[list[int]]
    passages: list[list[int]]  # distinct
    gold: torch.Tensor  # (Nq,) index into passages

    @classmethod
    def of(cls, data: EncodedPairs, limit: int | None = None) -> RetrievalSet:
        """The first `limit` pairs' queries (all without one) against the distinct passages of those pairs."""
        n = len(data.queries) if limit is None else min(limit, len(data.queries))
        first: dict[int, int] = {}  # passage text id -> its index among the distinct passages
        for i in range(n):
            first.setdefault(data.pid[i], len(first))
        order = {pid: i for i, pid in enumerate(data.pid[:n])}  # a row holding each passage (any: same text)
        passages = [data.passages[order[pid]] for pid in first]
        return cls(queries=data.queries[:n], passages=passages,
                   gold=torch.tensor([first[data.pid[i]] for i in range(n)], dtype=torch.long))


def retrieval_metrics(q: torch.Tensor, p: torch.Tensor, gold: torch.Tensor, temperature: float) -> dict[str, float]:
    """Recall@1, recall@5, MRR and the InfoNCE loss of ranking `p` for each query of `q`.

    Args:
        q: (N, C) unit-length query embeddings.
        p: (M, C) unit-length embeddings of the distinct candidate passages.
        gold: (N,) each query's own passage, an index into `p`.
        temperature: the loss's: cross-entropy of cos(q, p) / temperature to the gold passage.

    A query's rank counts every candidate scoring at least as high as its own passage (ties count against it,
    so a model that embeds everything alike ranks nothing first).
    """
    sims = q.float() @ p.float().T  # (N, M)
    own = sims.gather(1, gold[:, None])  # (N, 1)
    rank = (sims >= own).sum(1).float()  # 1 = first
    loss = F.cross_entropy(sims / temperature, gold)
    return {"val_loss": float(loss), "recall@1": float((rank <= 1).float().mean()),
            "recall@5": float((rank <= 5).float().mean()), "mrr": float((1.0 / rank).mean())}


__all__ = ["PAIRS", "EncodedPairs", "Pair", "PairBatches", "PairRecords", "RetrievalSet", "encode_pairs", "hold_out",
           "read_pairs", "record_to_pair", "retrieval_metrics", "stack_padded", "text_ids"]
