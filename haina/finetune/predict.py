"""`haina classify`: label texts with a classifier checkpoint, one JSON object per input, in input order.

The input is one --text or a file (JSONL, CSV, TSV, Parquet, .jsonl.zst, or .txt with one text per line),
read and classified a chunk at a time, so memory stays flat however large the file: each chunk is encoded,
run through the model in batches of similar length, and written out before the next is read. Each output
line is {"label", "probabilities": {label: p}} (with the record's "id" first when it has one); `label` is
the most probable class, or for a multi-label head the list of labels with p >= 0.5. A record without a
text in --text-field still gets its line, with "error" saying why, so that lines and inputs stay aligned.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from haina.core.errors import HainaError
from haina.core.log import info, progress
from haina.data.records import iter_records

CHUNK = 1024  # records read, encoded and classified at a time


def _chunks(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def result_line(proba: np.ndarray, labels: tuple[str, ...], multi_label: bool, record_id: Any = None) -> dict:
    """One output object: the predicted label (or labels) and every label's probability."""
    label: Any = [labels[c] for c in np.flatnonzero(proba >= 0.5)] if multi_label else labels[int(proba.argmax())]
    head = {} if record_id is None else {"id": record_id}
    return {**head, "label": label, "probabilities": {name: float(p) for name, p in zip(labels, proba, strict=True)}}


def classify_records(model, tokenizer, records: Iterable[dict[str, Any]], sink: IO[str], *, text_field: str,
                     batch_size: int, chunk: int = CHUNK, on_chunk=None) -> dict[str, int]:
    """Classify `records` a chunk at a time, writing one JSON line per record to `sink`; returns counts.

    Raises:
        HainaError: when no record of the first chunk has a text in `text_field` (the wrong field, most likely).
    """
    labels, multi = model.cfg.labels, model.cfg.multi_label
    counts = {"texts": 0, "errors": 0}
    for n, rows in enumerate(_chunks(records, chunk)):
        texts = {i: r.get(text_field) for i, r in enumerate(rows)}
        good = [i for i, t in texts.items() if isinstance(t, str)]
        if n == 0 and not good:
            fields = ", ".join(sorted(map(str, rows[0]))[:8])
            raise HainaError(f"no record has a text in '{text_field}' (the first has {fields or 'no fields'}); "
                             "name the text field with --text-field")
        ids, _ = model.encode([texts[i] for i in good], tokenizer)
        proba = model.predict_ids(ids, batch_size, tokenizer.eos_id) if ids else np.zeros((0, len(labels)))
        at = dict(zip(good, proba, strict=True))
        lines = []
        for i, r in enumerate(rows):
            rid = r.get("id")
            if i in at:
                lines.append(result_line(at[i], labels, multi, rid))
                continue
            t = texts[i]
            why = f"no '{text_field}' field" if t is None else f"'{text_field}' is a {type(t).__name__}, not text"
            lines.append({**({} if rid is None else {"id": rid}), "label": None, "probabilities": None, "error": why})
            counts["errors"] += 1
        sink.write("".join(json.dumps(line, ensure_ascii=False, default=str) + "\n" for line in lines))
        sink.flush()
        counts["texts"] += len(rows)
        if on_chunk is not None:
            on_chunk(len(rows))
    return counts


def predict_command(checkpoint: str, text: str | None = None, input: str | None = None, text_field: str = "text",
                    out: str | None = None, batch_size: int = 32, device: str = "auto") -> None:
    """Label texts with a classifier checkpoint: one JSON object per input, with its label and probabilities.

    Prints, or writes to --out, one line per input in input order: {"label": ..., "probabilities": {label: p}}
    (with the record's "id" when it has one). Files are streamed a chunk at a time, so their size does not matter.

    Args:
        checkpoint: a classifier checkpoint or run directory (trained by `haina finetune classify`).
        text: one text to classify.
        input: a file of texts: .jsonl, .csv, .tsv, .parquet, .jsonl.zst, or .txt with one text per line.
        text_field: the records' text field (JSONL, CSV, TSV, Parquet).
        out: write the JSON lines to this file instead of printing them.
        batch_size: texts per forward pass.
        device: auto, cpu, cuda, cuda:1 or mps.
    """
    from haina.core.device import resolve_device
    from haina.core.io import atomic_path
    from haina.model.classifier import head_dir, load_classifier, read_head

    if (text is None) == (input is None):
        raise HainaError("give one of --text TEXT or --input FILE")
    if batch_size < 1:
        raise HainaError(f"--batch-size {batch_size} must be at least 1")
    read_head(head_dir(checkpoint))  # no head: one line before the model or the input is read
    records: Iterable[dict[str, Any]] = [{text_field: text}]
    if input is not None:
        records = iter_records(input, what="--input", text_field=text_field, text_lines=True)
        if out is not None and Path(out).resolve() == Path(input).resolve():
            raise HainaError(f"--out {out} is the --input file; write the predictions elsewhere")
    if out is not None and Path(out).is_dir():
        raise HainaError(f"--out {out} is a directory; give a file name")
    model, tokenizer = load_classifier(checkpoint, resolve_device(device))
    if tokenizer is None:
        raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; classifying text needs one")
    if out is None:
        classify_records(model, tokenizer, records, sys.stdout, text_field=text_field, batch_size=batch_size)
        return
    bar = progress(desc="classify", unit="text")
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        counts = classify_records(model, tokenizer, records, f, text_field=text_field, batch_size=batch_size,
                                  on_chunk=bar.update)
    bar.close()
    errors = f" ({counts['errors']:,} without a text: their lines say why)" if counts["errors"] else ""
    info(f"classified {counts['texts']:,} inputs{errors}: {out}")


__all__ = ["classify_records", "predict_command", "result_line"]
