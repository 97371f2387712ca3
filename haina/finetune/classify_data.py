"""Classification data: labeled records → a label map, train/val/test examples, batches, and the metrics.

Records come from JSONL, CSV, TSV or Parquet files (`haina.data.records`) or from the labeled splits of a
`haina data prepare` output, which are used as they are. Nothing is dropped silently: a record without a
text, with a text that is not a string, without a label, or with a list of labels for a single-label run,
is kept with its file, row and reason for OUT/rejects.jsonl. The label map is the sorted set of the
training labels (numbers in numeric order, then names); a validation or test label outside it is counted
per split and left out (multi-label: that name is dropped from its record), never a crash.

Without validation or test files, a seeded share of the training records is held out for each,
stratified by label so that every class keeps at least one training example.

`ClassBatches` draws training batches from the trainer's generator alone (so a resumed run draws the
same batches), uniformly, or class-balanced: `over` draws every class equally often from all its
examples, `under` draws uniformly from a seeded class-balanced subset (every class cut to the
smallest one's size).

The metrics (`scores`) follow `haina.eval.metrics`' conventions (scikit-learn's, zero_division=0, classes
absent from both truth and predictions left out of the averages); they are here because fine-tuning sits
below eval.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.data.records import iter_records, label_list, label_name, prepare_splits
from haina.finetune.sft_data import clip_record
from haina.train.metrics import THRESHOLD, classification_report

MIN_HELD_OUT = 20  # fewer training records than this: nothing is held out for validation or test


# ---------------------------------------------------------------------------------------- records
@dataclass
class Parsed:
    """The usable records of one split: text and label names each, and what was left out of it."""

    texts: list[str] = field(default_factory=list)
    names: list[list[str]] = field(default_factory=list)  # one name (single-label) or several per record
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    fields: list[str] = field(default_factory=list)  # the first record's, named when no record is usable

    def subset(self, rows: Sequence[int]) -> Parsed:
        return Parsed(texts=[self.texts[i] for i in rows], names=[self.names[i] for i in rows])


def _reject(source: str, line: int, reason: str, record: dict) -> dict[str, Any]:
    return {"source": source, "line": line, "reason": reason,
            "record": clip_record(json.dumps(record, ensure_ascii=False, default=str))}


def parse_records(paths: Sequence[str | Path], *, text_field: str, label_field: str, multi_label: bool,
                  what: str) -> Parsed:
    """Read `paths` (in order) into texts and label names, rejecting what cannot be trained on."""
    out = Parsed()
    for path in paths:
        for n, record in enumerate(iter_records(path, what=what), 1):
            out.read += 1
            if out.read == 1:
                out.fields = sorted(map(str, record))
            reason = _check(record, text_field, label_field, multi_label)
            if reason is not None:
                out.rejects.append(_reject(str(path), n, reason, record))
                continue
            raw = record[label_field]
            names = [x for x in (label_name(v) for v in label_list(raw)) if x is not None] if multi_label \
                else [label_name(raw)]
            out.texts.append(record[text_field])
            out.names.append(list(dict.fromkeys(names)))
    return out


def _check(record: dict, text_field: str, label_field: str, multi_label: bool) -> str | None:
    """Why `record` cannot be used (None when it can)."""
    text = record.get(text_field)
    if text is None:
        return f"no '{text_field}' field"
    if not isinstance(text, str):
        return f"'{text_field}' is a {type(text).__name__}, not text"
    raw = record.get(label_field)
    if multi_label:
        return f"no '{label_field}' field" if raw is None else None
    if isinstance(raw, (list, tuple, dict, np.ndarray)):
        return f"'{label_field}' is a {type(raw).__name__}; several labels per text need --multi-label"
    return f"no label in '{label_field}'" if label_name(raw) is None else None


def check_fields(parsed: Parsed, *, text_field: str, label_field: str, what: str) -> None:
    """A one-line error when no record of a split could be used, naming the reason most records had."""
    if parsed.texts or not parsed.read:
        return
    reasons = Counter(r["reason"] for r in parsed.rejects)
    top, count = reasons.most_common(1)[0]
    shown = f"; the first record has {', '.join(parsed.fields[:8])}" if parsed.fields else ""
    raise HainaError(f"{what}: none of the {parsed.read:,} records is usable ({count:,}× {top}){shown}; "
                     f"check --text-field ({text_field}) and --label-field ({label_field})")


def read_splits(train: Sequence[str], val: Sequence[str], test: Sequence[str], *, text_field: str, label_field: str,
                multi_label: bool) -> tuple[dict[str, Parsed], str]:
    """The train/val/test records (val and test may be empty) and where they came from (files or prepare).

    The shards of a prepare output are read with its own field names, text and label.
    """
    source, files = "files", {}
    splits: dict[str, list] = {"train": list(train), "val": list(val), "test": list(test)}
    prepared = [prepare_splits(p) for p in train]
    if any(prepared):
        if len(train) != 1:
            raise HainaError("--data: give a `haina data prepare` or `data tasks` output directory alone, not with other "
                             "inputs")
        # Its splits as prepare made them (stratified by label); --val/--test files given too replace its own.
        source, files = "prepare", prepared[0]
        splits = {"train": files["train"], "val": splits["val"] or files["val"], "test": splits["test"] or files["test"]}
        if not splits["train"]:
            raise HainaError(f"--data {train[0]}: the output has no training records")
    parsed = {}
    for name, paths in splits.items():
        what = "--data" if name == "train" else f"--{name}"
        # prepare writes every document as {id, text, source, label, meta}, whatever its input called them
        fields = ("text", "label") if source == "prepare" and paths and paths[0] in files[name] else \
            (text_field, label_field)
        parsed[name] = parse_records(paths, text_field=fields[0], label_field=fields[1], multi_label=multi_label,
                                     what=what)
        check_fields(parsed[name], text_field=text_field, label_field=label_field, what=what)
    if not parsed["train"].read:
        raise HainaError(f"--data {', '.join(map(str, train))} holds no records")
    return parsed, source


def hold_out(parsed: Parsed, fraction: float, seed: int, multi_label: bool) -> tuple[Parsed, Parsed]:
    """(kept, held out): a seeded `fraction` of each class held out (of all records for multi-label data).

    Each class keeps at least one record; nothing is held out from fewer than MIN_HELD_OUT records.
    """
    n = len(parsed.texts)
    if fraction <= 0 or n < MIN_HELD_OUT:
        return parsed, Parsed()
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, names in enumerate(parsed.names):
        groups.setdefault("" if multi_label else names[0], []).append(i)
    held: set[int] = set()
    for key in sorted(groups):
        rows = groups[key]
        rng.shuffle(rows)
        held.update(rows[:min(round(fraction * len(rows)), len(rows) - 1)])
    kept = parsed.subset([i for i in range(n) if i not in held])
    kept.rejects, kept.read = parsed.rejects, parsed.read
    return kept, parsed.subset(sorted(held))


def label_map(parsed: Parsed, multi_label: bool, label_field: str) -> tuple[str, ...]:
    """The sorted label names of the training records; refused when they cannot make a classifier."""
    names = {x for row in parsed.names for x in row}

    def key(name: str) -> tuple:
        try:
            return (0, int(name), "")
        except ValueError:
            return (1, 0, name)

    labels = tuple(sorted(names, key=key))
    if not multi_label and len(labels) < 2:
        only = f" ('{labels[0]}')" if labels else ""
        raise HainaError(f"the training data has {len(labels)} class{only}; a classifier needs at least two "
                         f"(check --label-field {label_field})")
    if multi_label and not labels:
        raise HainaError(f"no training record has a label in '{label_field}'; check --label-field")
    return labels


@dataclass
class Targets:
    """Texts and targets of one split under the label map, and the labels it had outside the map."""

    texts: list[str]
    targets: list[Any]  # class index, or a 0/1 list per label
    unseen: dict[str, int] = field(default_factory=dict)
    unseen_rejects: list[dict[str, Any]] = field(default_factory=list)


def to_targets(parsed: Parsed, labels: tuple[str, ...], multi_label: bool, split: str) -> Targets:
    """Map a split's label names onto indices; unseen names are counted (and the record left out, single-label)."""
    index = {name: i for i, name in enumerate(labels)}
    out = Targets(texts=[], targets=[])
    for text, names in zip(parsed.texts, parsed.names, strict=True):
        unseen = [x for x in names if x not in index]
        for x in unseen:
            out.unseen[x] = out.unseen.get(x, 0) + 1
        if multi_label:
            row = [0] * len(labels)
            for x in names:
                if x in index:
                    row[index[x]] = 1
            out.texts.append(text)
            out.targets.append(row)
        elif unseen:
            out.unseen_rejects.append({"source": split, "line": None, "reason": "label never seen in training",
                                       "record": clip_record(json.dumps({"text": text, "label": names[0]},
                                                                        ensure_ascii=False))})
        else:
            out.texts.append(text)
            out.targets.append(index[names[0]])
    return out


def class_counts(targets: Sequence[Any], labels: tuple[str, ...], multi_label: bool) -> dict[str, int]:
    """How many training examples each label has (multi-label: how many have it on)."""
    if multi_label:
        sums = np.asarray(targets, dtype=np.int64).reshape(-1, len(labels)).sum(0)
        return {name: int(c) for name, c in zip(labels, sums, strict=True)}
    counts = Counter(targets)
    return {name: int(counts.get(i, 0)) for i, name in enumerate(labels)}


def class_weights(counts: dict[str, int], n: int, multi_label: bool) -> list[float]:
    """Weights from frequencies: N / (K · n_c) per class (scikit-learn's "balanced"); multi-label n_neg / n_pos."""
    k = len(counts)
    if multi_label:
        return [(n - c) / c if c else 1.0 for c in counts.values()]
    return [n / (k * c) if c else 0.0 for c in counts.values()]


# ---------------------------------------------------------------------------------------- batches
def encode_texts(classifier, texts: Sequence[str], block: int) -> tuple[list[list[int]], int]:
    """Token ids as the classifier reads them, cut to `block` tokens (end-of-text kept last); and how many were cut."""
    ids, cut = classifier.encode(texts)
    eos = classifier.cfg.append_eos
    out = []
    for seq in ids:
        if len(seq) > block:
            seq, cut = ([*seq[:block - 1], seq[-1]] if eos else seq[:block]), cut + 1
        out.append(seq)
    return out, cut


class ClassBatches:
    """Encoded examples and their targets, batched for the one loop.

    A batch is a dict: `idx` (B, T) right-padded ids, `lengths` (B,), `y` (B,) class indices or (B, K) 0/1
    floats, `tokens` (the real tokens in it).

    Args:
        ids: token ids of each example (none empty).
        targets: class index or 0/1 list per example.
        pad_id: the id put in padding positions (never read: pooling looks at real tokens only).
        multi_label: targets are 0/1 lists.
        sampling: none, over or under (see the module docstring).
        seed: picks `under`'s subset.
    """

    def __init__(self, ids: Sequence[Sequence[int]], targets: Sequence[Any], pad_id: int, *, multi_label: bool = False,
                 sampling: str = "none", seed: int = 0):
        if not ids:
            raise HainaError("no examples to batch")
        self.ids = [list(s) for s in ids]
        self.pad_id, self.multi_label, self.sampling = pad_id, multi_label, sampling
        self.y = torch.tensor(targets, dtype=torch.float32 if multi_label else torch.long)
        self.pool = torch.arange(len(self.ids))
        self.probs: torch.Tensor | None = None
        if sampling != "none" and not multi_label:
            by_class = [torch.nonzero(self.y == c).flatten() for c in range(int(self.y.max()) + 1)]
            by_class = [rows for rows in by_class if len(rows)]
            if sampling == "over":
                counts = torch.bincount(self.y).float()
                self.probs = 1.0 / counts[self.y]  # each class drawn equally often
            else:
                g = torch.Generator().manual_seed(seed)
                smallest = min(len(rows) for rows in by_class)
                self.pool = torch.cat([rows[torch.randperm(len(rows), generator=g)[:smallest]] for rows in by_class])
        elif sampling != "none":
            raise HainaError(f"sampling '{sampling}' needs single-label data")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Sequence[int], block_size: int) -> dict[str, Any]:
        seqs = [self.ids[i] for i in rows]  # already cut to the training block (`encode_texts`)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        idx = torch.full((len(seqs), int(lengths.max())), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            idx[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        return {"idx": idx, "lengths": lengths, "y": self.y[list(rows)], "tokens": int(lengths.sum())}

    def draw(self, batch_size: int, generator: torch.Generator) -> list[int]:
        """The example indices of one training batch (with replacement)."""
        if self.probs is not None:
            return torch.multinomial(self.probs, batch_size, replacement=True, generator=generator).tolist()
        return self.pool[torch.randint(len(self.pool), (batch_size,), generator=generator)].tolist()

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict[str, Any]:
        return self.batch(self.draw(batch_size, generator), block_size)

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Every example once, in order, batch_size at a time (up to max_batches batches)."""
        for b, start in enumerate(range(0, len(self.ids), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.batch(range(start, min(start + batch_size, len(self.ids))), block_size)


# ---------------------------------------------------------------------------------------- metrics
def predictions(proba: np.ndarray, multi_label: bool) -> np.ndarray:
    """Argmax classes, or the 0/1 labels at or above THRESHOLD."""
    return (proba >= THRESHOLD).astype(np.int64) if multi_label else proba.argmax(1)


def scores(y_true: np.ndarray, proba: np.ndarray, labels: Sequence[str], multi_label: bool) -> dict[str, Any]:
    """Every classification metric of these probabilities (`haina.train.metrics`, the module `eval classify`
    uses too): accuracy, macro/micro/weighted precision, recall and F1, ROC-AUC and PR-AUC, per class, confusion.

    Args:
        y_true: (N,) class indices, or (N, K) 0/1 rows.
        proba: (N, K) probabilities (softmax rows, or a sigmoid per label).
        labels: the K names.
        multi_label: y_true is 0/1 rows and a label is predicted at probability >= 0.5.
    """
    return classification_report(np.asarray(y_true, dtype=np.int64), None, np.asarray(proba), labels,
                                 multi_label=multi_label)


__all__ = ["ClassBatches", "Parsed", "Targets", "class_counts", "class_weights", "encode_texts", "hold_out",
           "label_map", "parse_records", "predictions", "read_splits", "scores", "to_targets"]
