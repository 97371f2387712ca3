"""Labeled records for classification: read from JSONL, CSV, TSV or Parquet, and mapped onto a label map.

Shared by `haina finetune classify` (training), `haina classify` (prediction) and `haina eval classify`,
so it sits in `data`, below all three. Files are read whole (`read_records`) or one record at a time
(`iter_records`, which never holds more than a Parquet row group); `prepare_splits` finds the labeled
train/val/test shards of a `haina data prepare` output.

A label as data holds it becomes a label-map key through `label_name`: strings as they are (without
surrounding whitespace), integers and whole floats as digits, booleans as true/false. A multi-label record's
labels are a list, a JSON list in a string (CSV/TSV cells), or names separated by commas (`label_list`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import HainaError

READERS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
           ".jsonl.zst": "jsonl.zst", ".txt": "txt"}
PARQUET_ROWS = 1024  # rows per batch when a Parquet file is streamed


# ---------------------------------------------------------------------------------------- reading
def record_format(path: str | Path, *, text_lines: bool = False) -> str | None:
    """The reader of `path` by its name: jsonl, jsonl.zst, csv, tsv, parquet (or txt when `text_lines`); else None."""
    name = Path(path).name.lower()
    kind = READERS.get(".jsonl.zst") if name.endswith(".jsonl.zst") else READERS.get(Path(name).suffix)
    return None if kind == "txt" and not text_lines else kind


def iter_records(path: str | Path, *, what: str = "--data", text_field: str = "text",
                 text_lines: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a file, one at a time; the file is checked before this returns.

    Args:
        path: a .jsonl (.ndjson), .jsonl.zst, .csv, .tsv or .parquet file.
        what: the option that named the file, for messages.
        text_field: with `text_lines`, the field each line of a .txt file is put under.
        text_lines: also read .txt files, one text per line (a blank line is an empty text).

    Raises:
        HainaError: an unknown kind of file, a missing one, or (while iterating) a malformed one, in one line.
    """
    p = Path(path)
    kind = record_format(p, text_lines=text_lines)
    if kind is None:
        also = ", .txt" if text_lines else ""
        raise HainaError(f"{what} {path}: cannot read '{p.suffix or p.name}' files; give a .jsonl, .csv, .tsv{also} or "
                         ".parquet file")
    if not p.is_file():
        raise HainaError(f"{what} {path} " + ("is a directory; give a file" if p.is_dir() else "not found"))
    return _records(p, kind, path, text_field)


def _records(p: Path, kind: str, shown: str | Path, text_field: str) -> Iterator[dict[str, Any]]:
    if kind == "parquet":
        yield from _parquet(p, shown)
        return
    try:
        if kind == "jsonl.zst":
            import zstandard

            from haina.data.prepare.writers import read_jsonl_zst

            try:
                yield from read_jsonl_zst(p)
            except json.JSONDecodeError as e:
                raise HainaError(f"{shown}: not valid JSON lines ({e.msg})") from None
            except zstandard.ZstdError as e:
                raise HainaError(f"cannot read {shown}: not a readable .jsonl.zst file ({e})") from None
            return
        with open(p, encoding="utf-8-sig", newline="") as f:
            if kind == "txt":
                for line in f:
                    yield {text_field: line.rstrip("\r\n")}
            elif kind != "jsonl":
                yield from csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise HainaError(f"{shown}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise HainaError(f"{shown}:{n}: expected a JSON object, got {type(obj).__name__}")
                    yield obj
    except UnicodeDecodeError:
        raise HainaError(f"cannot read {shown}: not UTF-8 text") from None
    except csv.Error as e:
        raise HainaError(f"cannot read {shown}: malformed {kind.upper()} ({e})") from None


def _parquet(p: Path, shown: str | Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=PARQUET_ROWS)
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise HainaError(f"cannot read {shown}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def read_records(path: str | Path, what: str = "--data") -> list[dict[str, Any]]:
    """The records of a JSONL, CSV, TSV or Parquet file, as dicts; a malformed file is a one-line error."""
    return list(iter_records(path, what=what))


def prepare_splits(path: str | Path) -> dict[str, list[Path]] | None:
    """The train/val/test files of a `haina data prepare` or `haina data tasks` output; None for anything else.

    A split that the command left empty has no files (an empty list).
    """
    from haina.core.output import is_output_of

    p = Path(path)
    if not p.is_dir():
        return None
    if is_output_of(p, "data prepare"):
        return {split: sorted(f for f in (p / split).glob("part-*") if record_format(f) is not None)
                for split in ("train", "val", "test")}
    if is_output_of(p, "data tasks"):
        return {split: [p / f"{split}.jsonl"] if (p / f"{split}.jsonl").is_file() else []
                for split in ("train", "val", "test")}
    return None


# ---------------------------------------------------------------------------------------- labels
def label_name(value: object) -> str | None:
    """The label-map key of a label as data holds it; None for a missing one (None or an empty string).

    Strings are kept without surrounding whitespace (CSV cells often have some); integers, and floats that
    are whole numbers (JSON and Parquet may store 1 as 1.0), become their digits; booleans true/false.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def label_list(value: Any) -> list[Any]:
    """A multi-label record's labels: a list, a JSON list in a string, or comma-separated names."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):  # Parquet list columns may come back as arrays
        return value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return parsed
        return [x for x in text.split(",") if x.strip()]
    return [value]


@dataclass
class Labeled:
    """The records as the classifier scores them.

    `targets` holds a class index (single-label) or a 0/1 row (multi-label) per record, None where it cannot be
    scored; `unseen` counts the label names the model does not know, `unlabeled` the records without a label.
    """

    records: list[dict[str, Any]]
    texts: list[str]
    targets: list[Any]
    unseen: dict[str, int] = field(default_factory=dict)
    unlabeled: int = 0

    @property
    def scored(self) -> list[int]:
        return [i for i, t in enumerate(self.targets) if t is not None]


def label_records(records: list[dict[str, Any]], labels: tuple[str, ...], multi_label: bool, text_field: str,
                  label_field: str, where: str) -> Labeled:
    """Texts and targets of `records` under the label map `labels`.

    What cannot be scored is counted, never a crash: a record without a label, and a label outside the map (for
    multi-label data, that name is dropped from its record). A record without a text in `text_field`, or with a
    list of labels for a single-label map, is a one-line error naming `where`.
    """
    index = {name: i for i, name in enumerate(labels)}
    out = Labeled(records=records, texts=[], targets=[])
    for n, r in enumerate(records, 1):
        text = r.get(text_field)
        if not isinstance(text, str):
            what = "no" if text is None else f"a {type(text).__name__} in its"
            raise HainaError(f"{where}: record {n} has {what} '{text_field}' field; every record needs its text "
                             "there (--text-field)")
        out.texts.append(text)
        raw = r.get(label_field)
        if multi_label:
            if raw is None:  # an empty list (or CSV cell) is a record with no label on, which is scored
                out.unlabeled += 1
                out.targets.append(None)
                continue
            row = np.zeros(len(labels), dtype=np.int64)
            for value in label_list(raw):
                name = label_name(value)
                if name is None:
                    continue
                if name in index:
                    row[index[name]] = 1
                else:
                    out.unseen[name] = out.unseen.get(name, 0) + 1
            out.targets.append(row)
            continue
        if isinstance(raw, (list, tuple, dict)):
            raise HainaError(f"{where}: record {n}'s '{label_field}' is a {type(raw).__name__}, but this classifier "
                             "predicts one label per text (it is not multi-label)")
        name = label_name(raw)
        if name is None:
            out.unlabeled += 1
            out.targets.append(None)
        elif name in index:
            out.targets.append(index[name])
        else:
            out.unseen[name] = out.unseen.get(name, 0) + 1
            out.targets.append(None)
    return out


__all__ = ["READERS", "Labeled", "iter_records", "label_list", "label_name", "label_records", "prepare_splits",
           "read_records", "record_format"]
