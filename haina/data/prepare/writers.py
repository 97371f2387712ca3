"""Shard writers: compressed JSON lines (zstd) or Parquet, each shard renamed into place when complete."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import zstandard

FIELDS = ("id", "text", "source", "label", "meta")


class JsonlZstWriter:
    """One zstd-compressed JSON-lines file, written under a temporary name and renamed on `close`."""

    def __init__(self, path: str | os.PathLike, level: int = 3):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 -- closed in close() or abort()
        self._z = zstandard.ZstdCompressor(level=level).stream_writer(self._raw, closefd=False)
        self._text = io.TextIOWrapper(self._z, encoding="utf-8", write_through=False)
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self._text.write(line)
        except UnicodeEncodeError:  # a lone surrogate (from a JSON escape) in an id, label or meta: escape it
            self._text.write(json.dumps(record) + "\n")
        self.count += 1

    def close(self) -> None:
        self._text.flush()
        self._text.detach()
        self._z.close()
        self._raw.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._raw.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_jsonl_zst(path: str | os.PathLike):
    """Yield the records of a zstd-compressed JSON-lines file."""
    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            if line.strip():
                yield json.loads(line)


class ParquetShardWriter:
    """One Parquet file of {id, text, source, label, meta}; `meta` is stored as a JSON string."""

    def __init__(self, path: str | os.PathLike, rows_per_group: int = 2048):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                                 ("label", pa.string()), ("meta", pa.string())])
        self._writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")
        self._rows: list[dict] = []
        self._group = rows_per_group
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        label = record.get("label")
        self._rows.append({"id": record["id"], "text": record["text"], "source": record.get("source"),
                           "label": None if label is None else str(label),
                           "meta": json.dumps(record.get("meta") or {}, ensure_ascii=False)})
        self.count += 1
        if len(self._rows) >= self._group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardedWriter:
    """Rolls `DIR/part-00000.<ext>`, `part-00001` … every `shard_docs` documents."""

    def __init__(self, directory: str | os.PathLike, fmt: str = "jsonl", shard_docs: int = 100_000,
                 prefix: str = "part"):
        self.dir = Path(directory)
        self.fmt = fmt
        self.shard_docs = shard_docs
        self.prefix = prefix
        self._current = None
        self.shards: list[str] = []
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._current is None or self._current.count >= self.shard_docs:
            self._roll()
        self._current.write(record)
        self.count += 1

    def _roll(self) -> None:
        if self._current is not None:
            self._current.close()
        ext = "jsonl.zst" if self.fmt == "jsonl" else "parquet"
        name = f"{self.prefix}-{len(self.shards):05d}.{ext}"
        path = self.dir / name
        self._current = JsonlZstWriter(path) if self.fmt == "jsonl" else ParquetShardWriter(path)
        self.shards.append(name)

    def close(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._current is not None:
            self._current.close()
            self._current = None

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
