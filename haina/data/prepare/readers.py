"""Read & decode: files, directories and globs → documents, with nothing lost silently.

Each input file (or Hugging Face dataset directory) is one *unit* of work: the parallel workers
take units, and `--resume` skips the units already done. A unit yields documents as dicts
`{id, text, source, [label], meta}`; a record that cannot be parsed is yielded too, with
`reason='malformed_record'` and its file and line in `meta`, so it reaches the rejects. Invalid
UTF-8 is decoded with U+FFFD replacement and counted in `stats['invalid_utf8']`.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import lzma
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from haina.core.errors import HainaError
from haina.core.io import match_input
from haina.core.output import MANIFEST
from haina.data.prepare.config import PrepareConfig

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
EXTENSIONS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
              ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
MAX_REJECT_CHARS = 100_000  # a malformed record is kept in rejects, truncated to this many characters
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark Windows tools (Excel, Notepad) put at the start of a file
# JSON's \uXXXX escapes can spell a lone surrogate (a cut emoji in scraped text): not encodable as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Unit:
    """One input file (or one Hugging Face dataset directory) and its format."""

    path: str
    format: str  # txt | jsonl | json | csv | tsv | parquet | hf
    name: str  # path relative to the input it was found under: the prefix of document ids


def discover_units(inputs: list[str], fmt: str = "auto", exclude: str | None = None) -> tuple[list[Unit], list[str]]:
    """Expand files, directories (recursively) and globs into units, in a deterministic order.

    Returns (units, skipped) where `skipped` lists files found in directories whose format is
    unknown. A named file or pattern that matches nothing is an error. Directories walked are
    never entered at `exclude` (the output directory, which may sit inside an input directory).
    """
    skip_dir = os.path.realpath(exclude) if exclude else None
    units: list[Unit] = []
    skipped: list[str] = []
    for raw in inputs:
        for m in match_input(raw):
            if m.is_dir():
                _walk(m, m, fmt, units, skipped, skip_dir)
            else:
                f = _format_of(m, fmt)
                if f is None:
                    raise HainaError(f"cannot tell the format of {m}; pass --format (txt, jsonl, json, csv, tsv, "
                                     "parquet or hf)")
                units.append(Unit(str(m), f, m.name))
    seen: set[str] = set()
    unique = []
    for u in units:  # the same file named twice (a dir and a glob inside it) is read once
        key = os.path.realpath(u.path)
        if key not in seen:
            seen.add(key)
            unique.append(u)
    # Names prefix document ids: two files of one name (`--input 'shards/*/train.jsonl'`) would give two
    # documents the id 'train.jsonl:1', so those are named by their full path instead.
    names = Counter(u.name for u in unique)
    unique = [dataclasses.replace(u, name=u.path) if names[u.name] > 1 else u for u in unique]
    return unique, skipped


def _is_hf_dataset(d: Path) -> bool:
    return (d / "state.json").is_file() and any(d.glob("*.arrow"))


def _walk(root: Path, d: Path, fmt: str, units: list[Unit], skipped: list[str], skip_dir: str | None = None) -> None:
    if fmt in ("auto", "hf") and _is_hf_dataset(d):
        units.append(Unit(str(d), "hf", str(d.relative_to(root)) if d != root else d.name))
        return
    # A DatasetDict saved to disk: dataset_dict.json names the splits, each a dataset directory.
    hf_dict = fmt in ("auto", "hf") and (d / "dataset_dict.json").is_file()
    for child in sorted(d.iterdir()):
        # Hidden files and directories (haina's own working directories among them) and the manifest
        # that marks a haina output are not corpus.
        if child.name.startswith(".") or child.name == MANIFEST:
            continue
        if child.is_dir():
            if skip_dir is None or os.path.realpath(child) != skip_dir:
                _walk(root, child, fmt, units, skipped, skip_dir)
            continue
        f = None if hf_dict else _format_of(child, fmt)
        if f is None:
            skipped.append(str(child))
        else:
            units.append(Unit(str(child), f, str(child.relative_to(root))))


def _format_of(path: Path, fmt: str) -> str | None:
    if fmt not in ("auto", "hf"):
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def open_binary(path: str) -> io.BufferedIOBase:
    """Open `path` for binary reading, decompressing .gz, .zst, .bz2 and .xz transparently."""
    kind = COMPRESSIONS.get(Path(path).suffix.lower())
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        return io.BufferedReader(_ZstdFrames(path), 1 << 20)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """A .zst file decompressed frame after frame, raising on a truncated last frame.

    zstandard's own stream_reader returns a short read without an error when the file ends mid-frame,
    which would silently lose the rest of a truncated file; here the end of the file inside a frame is
    a `ZstdError`, which the reader turns into a counted reject.
    """

    def __init__(self, path: str) -> None:
        import zstandard

        self._zstd = zstandard
        self._raw = open(path, "rb")  # noqa: SIM115 -- closed in close()
        self._obj = None  # the decompressor of the frame in progress
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            chunk = self._obj.unused_data if self._obj is not None and self._obj.eof else b""
            if self._obj is None or self._obj.eof:
                self._obj = None
            if not chunk:
                chunk = self._raw.read(1 << 20)
                if not chunk:
                    if self._obj is not None:
                        raise self._zstd.ZstdError("truncated .zst file: it ends inside a frame")
                    return 0
            if self._obj is None:
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
            self._pending = self._obj.decompress(chunk)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _strip_bom(raw: bytes, first: bool) -> bytes:
    """The first line or block of a file without its UTF-8 byte order mark, which is not text."""
    return raw[3:] if first and raw.startswith(BOM) else raw


def _decode(raw: bytes, stats: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + 1
        return raw.decode("utf-8", errors="replace")


def _malformed(unit: Unit, line: int, raw: str, error: str) -> dict:
    if len(raw) > MAX_REJECT_CHARS:
        # Cut at whitespace, never inside a word: half an e-mail address or key would slip past the PII scrubber.
        cut = max(raw.rfind(c, 0, MAX_REJECT_CHARS) for c in " \t\n\r")
        raw = raw[:cut] if cut > 0 else ""
    return {"id": f"{unit.name}:{line}", "text": raw, "source": unit.path,
            "reason": "malformed_record", "meta": {"file": unit.path, "line": line, "error": error}}


def read_unit(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    """Yield the documents (and malformed records) of one unit, in file order."""
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv,
              "parquet": _read_parquet, "hf": _read_hf}.get(unit.format)
    if reader is None:
        raise HainaError(f"unknown format '{unit.format}' for {unit.path}")
    import zstandard

    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
    if unit.format in ("parquet", "hf"):
        import pyarrow as pa

        errors += (pa.ArrowException,)  # a corrupt or not-really-Parquet file
    try:
        yield from reader(unit, cfg, stats)
    except errors as e:
        # A truncated .gz or .zst ends the unit, but never silently: the rest of the file becomes one reject.
        yield _malformed(unit, -1, "", f"cannot read the rest of the file: {e}")


def _doc(unit: Unit, n: int, text: str, label=None, doc_id=None, meta: dict | None = None) -> dict:
    doc = {"id": str(doc_id) if doc_id is not None else f"{unit.name}:{n}", "text": text, "source": unit.path,
           "meta": meta or {}}
    if label is not None:
        doc["label"] = label
    return doc


def _read_txt(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    with open_binary(unit.path) as f:
        if cfg.split_lines:
            for n, raw in enumerate(f, 1):
                yield _doc(unit, n, _decode(_strip_bom(raw, n == 1), stats).rstrip("\r\n"))
        elif cfg.split_paragraphs:
            para: list[str] = []
            start = n = 0
            for n, raw in enumerate(f, 1):
                line = _decode(_strip_bom(raw, n == 1), stats).rstrip("\r\n")
                if line.strip():
                    if not para:
                        start = n
                    para.append(line)
                elif para:
                    yield _doc(unit, start, "\n".join(para))
                    para = []
            if para:
                yield _doc(unit, start, "\n".join(para))
        else:
            raw = _strip_bom(f.read(), True)
            if raw:  # a zero-byte file holds no document at all (a whitespace-only one is an empty document)
                yield _doc(unit, 1, _decode(raw, stats))


def _has_surrogate(value) -> bool:
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(map(_has_surrogate, value))


def _scrub_surrogates(value):
    """`value` with every lone surrogate replaced by U+FFFD, as invalid UTF-8 bytes are."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrub_surrogates(k): _scrub_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_surrogates(v) for v in value]
    return value


def _record_to_doc(unit: Unit, n: int, rec, raw: str, cfg: PrepareConfig, stats: dict) -> dict:
    if not isinstance(rec, dict):
        return _malformed(unit, n, raw, "the record is not a JSON object")
    if ("\\u" in raw or not raw.isascii()) and _has_surrogate(rec):  # only an escape or a literal can hold one
        stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + 1
        rec = _scrub_surrogates(rec)
    if cfg.text_field not in rec:
        return _malformed(unit, n, raw, f"no '{cfg.text_field}' field (set --text-field)")
    text = rec[cfg.text_field]
    if text is None:
        text = ""
    if not isinstance(text, str):
        return _malformed(unit, n, raw, f"'{cfg.text_field}' is a {type(text).__name__}, not a string")
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    doc = _doc(unit, n, text, rec.get(cfg.label_field), rec.get("id"), dict(meta))
    if isinstance(rec.get("source"), str):  # re-reading prepared shards keeps the original provenance
        doc["source"] = rec["source"]
    return doc


def _read_jsonl(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    with open_binary(unit.path) as f:
        for n, raw in enumerate(f, 1):
            line = _decode(_strip_bom(raw, n == 1), stats).strip()
            if not line:
                continue  # blank lines separate nothing in JSONL; they are not documents
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield _malformed(unit, n, line, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield _record_to_doc(unit, n, rec, line, cfg, stats)


def _read_json(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    with open_binary(unit.path) as f:
        head = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if not _strip_bom(head, True).lstrip().startswith(b"["):
            # A .json file that is not an array is read as JSON lines (a very common mislabeling).
            f.close()
            yield from _read_jsonl(unit, cfg, stats)
            return
        yield from _stream_json_array(unit, f, cfg, stats)


JSON_CHUNK_BYTES = 1 << 20  # a JSON array is read this much at a time, never whole
MAX_JSON_RECORD_CHARS = 64 << 20  # one array element larger than this is malformed (it would hold memory)


def _utf8_tail(raw: bytes) -> int:
    """How many bytes at the end of `raw` begin a UTF-8 character that the next chunk completes."""
    for i in range(1, min(4, len(raw)) + 1):
        c = raw[-i]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII): does its character fit in the i bytes left?
            need = 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4 if c >> 3 == 0b11110 else 1
            return i if need > i else 0
    return 0


def _stream_json_array(unit: Unit, f, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    """The elements of a top-level JSON array one by one, with memory bounded by the largest element.

    A syntax error ends the unit, never silently: what is left of the file from there becomes one reject.
    """
    decoder = json.JSONDecoder()
    buf, pos, carry, eof = "", 0, b"", False

    def more() -> None:
        nonlocal buf, pos, carry, eof
        raw = f.read(JSON_CHUNK_BYTES)
        if not raw:
            eof, raw, carry = True, carry, b""
        else:
            raw = carry + raw
            cut = _utf8_tail(raw)
            raw, carry = (raw[:-cut], raw[-cut:]) if cut else (raw, b"")
        buf, pos = buf[pos:] + _decode(raw, stats), 0

    def skip_space() -> str:  # the next non-space character ("" at the end of the file)
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            more()

    def fail(n: int, why: str) -> dict:
        return _malformed(unit, n, buf[pos:pos + MAX_REJECT_CHARS], f"invalid JSON array at record {n}: {why}")

    while not buf and not eof:
        more()
    pos = 1 if buf.startswith("\ufeff") else 0  # a byte order mark is not text
    skip_space()
    pos += 1  # the "[" that _read_json saw
    n = 0
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            n += 1
            skip_space()  # raw_decode takes no leading space
            while True:
                try:
                    rec, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number cut at the chunk's end would parse, but short
                        break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > MAX_JSON_RECORD_CHARS:
                        yield fail(n, e.msg if eof else f"an element over {MAX_JSON_RECORD_CHARS:,} characters")
                        return
                # Double what is buffered before parsing again: a large element is re-parsed a few times, not
                # once per chunk.
                want = 2 * (len(buf) - pos)
                more()
                while not eof and len(buf) - pos < want:
                    more()
            raw = buf[pos:end]
            pos = end
            yield _record_to_doc(unit, n, rec, raw, cfg, stats)
            sep = skip_space()
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                yield fail(n + 1, f"expected ',' or ']' after record {n}" if sep else "the array is not closed")
                return
            pos += 1
    if skip_space():
        yield fail(n + 1, "text after the closing ']'")


def _read_csv(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    csv.field_size_limit(1 << 30)
    delimiter = "\t" if unit.format == "tsv" else ","
    with open_binary(unit.path) as f:
        lines = (_decode(_strip_bom(raw, n == 1), stats) for n, raw in enumerate(f, 1))
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _malformed(unit, 1, "", f"unreadable header: {e}")
            return
        if cfg.text_field not in header:
            raise HainaError(f"{unit.path} has no column '{cfg.text_field}' (columns: {', '.join(header)}); "
                             "set --text-field")
        ti = header.index(cfg.text_field)
        li = header.index(cfg.label_field) if cfg.label_field in header else None
        ii = header.index("id") if "id" in header else None
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield _malformed(unit, start, "", f"CSV error: {e}")
                continue
            if not row:
                continue
            if len(row) != len(header):
                yield _malformed(unit, start, delimiter.join(row),
                                 f"{len(row)} fields where the header has {len(header)}")
                continue
            # An empty cell is no label (as a Parquet null is), not a class named "".
            yield _doc(unit, start, row[ti], row[li] if li is not None and row[li] else None,
                       row[ii] if ii is not None and row[ii] else None)


def _table_batches(unit: Unit, cfg: PrepareConfig, batches, names: list[str]) -> Iterator[dict]:
    if cfg.text_field not in names:
        raise HainaError(f"{unit.path} has no column '{cfg.text_field}' (columns: {', '.join(names)}); "
                         "set --text-field")
    n = 0
    for batch in batches:
        cols = batch.to_pydict()
        texts = cols[cfg.text_field]
        labels = cols.get(cfg.label_field)
        ids = cols.get("id")
        for i, text in enumerate(texts):
            n += 1
            if text is not None and not isinstance(text, str):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                else:
                    yield _malformed(unit, n, str(text), f"'{cfg.text_field}' is not a string")
                    continue
            yield _doc(unit, n, text or "", labels[i] if labels else None, ids[i] if ids else None)


def _read_parquet(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    cols = [c for c in (cfg.text_field, cfg.label_field, "id") if c in names]
    yield from _table_batches(unit, cfg, pf.iter_batches(batch_size=cfg.batch_size, columns=cols or None), names)


def _read_hf(unit: Unit, cfg: PrepareConfig, stats: dict) -> Iterator[dict]:
    """A dataset written by `datasets.Dataset.save_to_disk`: Arrow IPC stream files named in state.json."""
    import pyarrow as pa

    d = Path(unit.path)
    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    files = [d / f["filename"] for f in state.get("_data_files", [])] or sorted(d.glob("data-*.arrow"))

    def batches():
        for path in files:
            with pa.memory_map(str(path)) as src:
                yield from pa.ipc.open_stream(src)

    with pa.memory_map(str(files[0])) as src:
        names = pa.ipc.open_stream(src).schema.names
    yield from _table_batches(unit, cfg, batches(), names)
