"""Indexing: documents read, chunked, compared with what a collection holds, and only the changes embedded.

`index_documents` reads what `haina data prepare` reads (text and Markdown files, JSONL/JSON/CSV/TSV/Parquet
records with a text field, directories and globs of them, and a `data prepare` output directory, whose
train/val/test shards are read and whose rejects are not), cuts each document into chunks (`haina.rag.chunk`)
and compares them with the collection:

    added       a chunk id the collection does not hold: embedded and upserted
    updated     an id it holds with another content hash: embedded again and upserted
    unchanged   the same id and hash: not embedded (its metadata is rewritten if only offsets or paths moved)
    deleted     an id the collection holds for a file read now (or one gone from an input directory) that the
                file no longer yields

Chunk ids are `<source id>:<n>`: the source id of a whole-file document (text, Markdown) is its path (relative
to the working directory when inside it, else absolute), and that of a record its own `id` field, else
`<path>:<line>`. Index from the same directory and re-indexing finds the same ids. Chunks are embedded and
upserted a batch at a time, so an interrupted run keeps what it finished; since ids are stable and upsert
replaces, running it again embeds only what is still missing and duplicates nothing.

Every chunk's metadata has `source` (the document's path, or the provenance a prepared record kept), `file`
(the file read, the key of the comparison), `doc` (the source id), `section` (its heading path), `start`/`end`
(character offsets), `chunk`, `tokens` and `hash`.

What a collection remembers, in its metadata under "rag": the embedder (`Embedder.describe()`, or null) and
the chunk settings. Indexing again takes them from there; another embedder or other chunk settings are a
one-line error (drop the collection first).

BM25-only collections (indexed without an embedder) live in the vector store like the others, so that get,
delete, metadata filters and stats work the same: their "vectors" are the constant 1-dimensional [1.0]
(`BM25_ONLY_DIM`), and `stats` reports the mode. A dense query on one is refused.

Each collection's BM25 index (`BM25Side`) is kept beside the store: in a hidden `.bm25/<collection>/` folder
of an embedded store's directory (the stores ignore hidden entries), or for a Chroma server under
`runs/rag-bm25/<host>_<port>/` unless `--bm25-dir` says where. A write marks it stale before touching the
store and clears the mark after saving it; a reader that finds the mark (an interrupted write), no index, or
an index whose size disagrees with the collection rebuilds it from the collection's texts first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import HainaError
from haina.core.log import info, progress
from haina.rag.chunk import Chunk, ChunkConfig, chunk_text, plan_reindex, whitespace_tokens
from haina.rag.store import HNSW, CollectionInfo, VectorStore

__all__ = ["BM25_ONLY_DIM", "BM25Side", "IndexCounts", "index_documents", "load_embedder", "placeholder_vectors",
           "rag_settings"]

RAG_KEY = "rag"  # the key of haina's settings in a collection's metadata
BM25_ONLY_DIM = 1
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_OVERLAP = 32
SERVER_BM25_ROOT = Path("runs/rag-bm25")
_IDENTITY = ("kind", "dim", "pooling", "normalize")  # with the model itself (name or path): what must match


# ---------------------------------------------------------------------------------------- settings
def rag_settings(info_: CollectionInfo) -> dict[str, Any] | None:
    """What `index_documents` recorded in a collection (embedder, chunking), or None for one it never indexed."""
    settings = info_.metadata.get(RAG_KEY)
    return settings if isinstance(settings, dict) else None


def is_bm25_only(info_: CollectionInfo) -> bool:
    """A collection without an embedder: indexed so, or made with dimension 1 and never given one."""
    settings = rag_settings(info_)
    return settings.get("embedder") is None if settings is not None else info_.dim == BM25_ONLY_DIM


def placeholder_vectors(n: int) -> np.ndarray:
    """The vectors of n records of a BM25-only collection (see the module docstring)."""
    return np.ones((n, BM25_ONLY_DIM), dtype=np.float32)


def _same_embedder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if any(a.get(k) != b.get(k) for k in _IDENTITY):
        return False
    if a.get("name") == "minilm" or b.get("name") == "minilm":
        return a.get("name") == b.get("name")
    return a.get("path") == b.get("path")


def _show_embedder(desc: dict[str, Any]) -> str:
    model = desc.get("name") if desc.get("name") == "minilm" else desc.get("path")
    return f"{model} ({desc.get('dim')} dimensions, {desc.get('pooling')} pooling)"


def load_embedder(spec: Any, device: str = "auto"):
    """An `Embedder` from a spec (a path or `minilm`), a recorded description (a dict), or one already loaded
    (anything with `embed` and `describe`)."""
    from haina.generate.embed import MINILM, Embedder

    if spec is None or (hasattr(spec, "embed") and hasattr(spec, "describe")):
        return spec
    if isinstance(spec, dict):
        # The recorded absolute path, not the name as typed, so that queries work from any directory.
        where = MINILM if spec.get("name") == MINILM else spec.get("path")
        try:
            return Embedder.load(str(where), device=device, pooling=spec.get("pooling"),
                                 normalize=bool(spec.get("normalize", True)))
        except HainaError as e:
            raise HainaError(f"cannot load the collection's embedder {where}: {e}") from None
    return Embedder.load(str(spec), device=device)


# ---------------------------------------------------------------------------------------- the BM25 side
class BM25Side:
    """A collection's BM25 index on disk, kept in step with the collection (see the module docstring)."""

    def __init__(self, store: VectorStore, collection: str, bm25_dir: str | os.PathLike | None = None):
        self.store = store
        self.collection = collection
        self.root = bm25_root(store, bm25_dir)
        self.path = self.root / collection
        self.marker = self.root / f"{collection}.stale"

    @property
    def stale(self) -> bool:
        return self.marker.exists()

    @contextlib.contextmanager
    def writing(self) -> Iterator[list]:
        """Mark the index stale around a write to the collection; yields a list to append the write's changes to,
        as ("put", [(id, text)...]) and ("remove", [ids]), which are applied to the index when the write ends."""
        was_stale = self.stale
        self.root.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        changes: list = []
        yield changes
        index = None if was_stale else self._load_quietly()
        if index is None:
            self.rebuild()
            return
        for kind, items in changes:
            if kind == "put":
                index.add(items)
            else:
                index.remove(items)
        if len(index) != self.store.count(self.collection):  # another writer meanwhile: trust the collection
            self.rebuild()
            return
        index.save(self.path)
        self.marker.unlink(missing_ok=True)

    def _load_quietly(self):
        from haina.rag.bm25 import BM25Index

        if not (self.path / "bm25.json").is_file():
            return None
        try:
            return BM25Index.load(self.path)
        except HainaError:
            return None

    def rebuild(self):
        """Build the index again from every text the collection holds, and save it."""
        from haina.rag.bm25 import BM25Index

        index = BM25Index()
        index.add((r.id, r.text) for r in self.store.get(self.collection))
        self.root.mkdir(parents=True, exist_ok=True)
        index.save(self.path)
        self.marker.unlink(missing_ok=True)
        return index

    def load(self):
        """The index for queries; rebuilt first when stale, missing, damaged or of another size than the collection."""
        index = None if self.stale else self._load_quietly()
        if index is None or len(index) != self.store.count(self.collection):
            info(f"rebuilding the BM25 index of collection {self.collection!r} from its texts")
            index = self.rebuild()
        return index

    def drop(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.marker.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        from haina.rag.store import dir_bytes

        index = self._load_quietly()
        return {"path": str(self.path), "documents": None if index is None else len(index),
                "disk_bytes": dir_bytes(self.path), "stale": self.stale or index is None}


def bm25_root(store: VectorStore, bm25_dir: str | os.PathLike | None = None) -> Path:
    """Where a store's BM25 indexes live: `bm25_dir`, else `<store>/.bm25`, else (a server) under runs/rag-bm25."""
    if bm25_dir is not None:
        return Path(bm25_dir)
    root = getattr(store, "root", None)
    if root is not None:
        return Path(root) / ".bm25"
    from urllib.parse import urlsplit

    parts = urlsplit(store.location)
    return SERVER_BM25_ROOT / f"{parts.hostname or 'server'}_{parts.port or 8000}"


# ---------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Document:
    source_id: str  # the prefix of its chunk ids
    text: str
    file: str  # the file it was read from (the key re-indexing compares by)
    source: str  # its path, or the provenance a prepared record kept


def file_key(path: str | os.PathLike) -> str:
    """A file's name in chunk ids and metadata: relative to the working directory when inside it, else absolute."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full)
    return Path(full if rel == ".." or rel.startswith(".." + os.sep) else rel).as_posix()


def _expand(inputs: Sequence[str]) -> list[str]:
    """A `data prepare` output becomes its split directories (never rejects/ or the report); the rest as given."""
    from haina.data.prepare.readers import COMPRESSIONS, EXTENSIONS
    from haina.data.text_input import find_split_dirs

    out = []
    for raw in inputs:
        splits = find_split_dirs([raw])
        if splits is not None:
            out += [d for dirs in splits.values() for d in dirs]
            continue
        p = Path(raw)
        suffixes = [s.lower() for s in p.suffixes]
        if suffixes and suffixes[-1] in COMPRESSIONS:
            suffixes = suffixes[:-1]
        if p.is_file() and not (suffixes and suffixes[-1] in EXTENSIONS):
            raise HainaError(f"cannot index {raw}: read are {', '.join(sorted(EXTENSIONS))} files (optionally "
                             "compressed), directories of them and `haina data prepare` outputs")
        out.append(raw)
    return out


def read_documents(inputs: Sequence[str], text_field: str = "text") -> tuple[list[str], list[str], Iterator[Document]]:
    """The files an index run reads, the input directories among them, and their documents (lazily).

    Raises:
        HainaError: a missing input, a file of unknown kind, or (while iterating) a malformed record, in one line.
    """
    from haina.data.prepare.config import PrepareConfig
    from haina.data.prepare.readers import discover_units, read_unit

    paths = _expand(inputs)
    units, skipped = discover_units(paths)
    if skipped:
        info(f"skipped {len(skipped)} file(s) of other kinds in the input directories (first: {skipped[0]})")
    files = [file_key(u.path) for u in units]
    dirs = [file_key(p) for p in paths if Path(p).is_dir()]
    cfg = PrepareConfig(text_field=text_field)

    def documents() -> Iterator[Document]:
        for unit, key in zip(units, files, strict=True):
            for doc in read_unit(unit, cfg, {}):
                if doc.get("reason") == "malformed_record":
                    meta = doc.get("meta", {})
                    where = f"{meta.get('file')}:{meta.get('line')}" if meta.get("line", -1) > 0 else meta.get("file")
                    raise HainaError(f"{where}: {meta.get('error')}; fix it, or clean the input with "
                                     "`haina data prepare` and index its output")
                if unit.format == "txt":
                    source_id = key
                elif doc["id"].startswith(unit.name + ":"):  # a record without an id: named by its line
                    source_id = key + doc["id"][len(unit.name):]
                else:
                    source_id = doc["id"]
                yield Document(source_id, doc["text"], key, str(doc.get("source") or unit.path))

    return files, dirs, documents()


# ---------------------------------------------------------------------------------------- indexing
@dataclass(kw_only=True)
class IndexCounts:
    """What an index run did: chunk counts overall and per file read (or pruned)."""

    collection: str
    mode: str  # "hybrid" (dense + BM25) or "bm25"
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    documents: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, source: str, what: str, n: int = 1) -> None:
        setattr(self, what, getattr(self, what) + n)
        per = self.sources.setdefault(source, {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0})
        per[what] += n

    def as_dict(self) -> dict[str, Any]:
        return {"collection": self.collection, "mode": self.mode, "added": self.added, "updated": self.updated,
                "unchanged": self.unchanged, "deleted": self.deleted, "documents": self.documents,
                "sources": self.sources}


def _chunk_settings(settings: dict | None, chunk_tokens: int | None, overlap: int | None, embedder: Any,
                    collection: str) -> ChunkConfig:
    if settings is not None and settings.get("chunk"):
        had = settings["chunk"]
        asked = {"max_tokens": chunk_tokens, "overlap": overlap}
        for key, value in asked.items():
            if value is not None and value != had.get(key):
                raise HainaError(f"collection {collection!r} was chunked with {had.get('max_tokens')} tokens and "
                                 f"{had.get('overlap')} of overlap; to re-chunk, drop it first "
                                 f"(`haina rag collection drop {collection}`) or indexing into another collection")
        return ChunkConfig(max_tokens=int(had["max_tokens"]), overlap=int(had["overlap"]))
    limit = embedder.max_tokens if embedder is not None else None
    if chunk_tokens is None:
        chunk_tokens = DEFAULT_CHUNK_TOKENS if limit is None else min(DEFAULT_CHUNK_TOKENS, limit)
    elif limit is not None and chunk_tokens > limit:
        raise HainaError(f"--chunk-tokens {chunk_tokens} is more than the embedder reads ({limit} tokens); "
                         f"give at most {limit}, or the ends of chunks would not be embedded")
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, chunk_tokens // 4)
    return ChunkConfig(max_tokens=chunk_tokens, overlap=overlap)


def _check_embedder(info_: CollectionInfo, settings: dict | None, embedder: Any) -> None:
    name = info_.name
    drop = f"drop it first (`haina rag collection drop {name}`) or index into another collection"
    if settings is not None:
        had = settings.get("embedder")
        if had is None and embedder is not None:
            raise HainaError(f"collection {name!r} is BM25-only (indexed without an embedder); to add dense "
                             f"vectors, {drop}")
        if had is not None and embedder is not None and not _same_embedder(had, embedder.describe()):
            raise HainaError(f"collection {name!r} was indexed with embedder {_show_embedder(had)}, not "
                             f"{_show_embedder(embedder.describe())}; {drop}")
        return
    if embedder is None and info_.dim != BM25_ONLY_DIM:
        raise HainaError(f"collection {name!r} holds {info_.dim}-dimensional vectors and names no embedder; pass "
                         f"--embedder with a model of dimension {info_.dim}")
    if embedder is not None and embedder.dim != info_.dim:
        raise HainaError(f"collection {name!r} has dimension {info_.dim} but the embedder gives {embedder.dim}; "
                         f"use an embedder of dimension {info_.dim}, or {drop}")


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def index_documents(store: VectorStore, collection: str, inputs: Sequence[str], *, embedder: Any = None,
                    chunk_tokens: int | None = None, overlap: int | None = None, text_field: str = "text",
                    metric: str = "cosine", hnsw: HNSW | None = None, batch_size: int = 64,
                    bm25_dir: str | os.PathLike | None = None, device: str = "auto") -> IndexCounts:
    """Index files into `collection` (created when missing), embedding only what changed; returns the counts.

    Args:
        store: the vector store.
        collection: the collection's name.
        inputs: files, directories, globs, or a `haina data prepare` output directory.
        embedder: a haina checkpoint, a sentence-transformers directory, `minilm`, or a loaded `Embedder`. None:
            the one the collection remembers, or (a new collection) BM25-only.
        chunk_tokens: the most tokens in a chunk (the embedder's tokens, else words). None: the collection's,
            else 256 (at most what the embedder reads).
        overlap: tokens repeated between chunks of a section. None: the collection's, else min(32, chunk/4).
        text_field: the text field of JSONL, CSV and Parquet records.
        metric: a new collection's metric (cosine, l2, ip).
        hnsw: a new collection's HNSW settings.
        batch_size: chunks embedded and upserted together (a finished batch survives an interruption).
        bm25_dir: where the BM25 index lives (see the module docstring).
        device: where the embedder runs.
    """
    if not inputs:
        raise HainaError("no input given; pass --input FILE/DIR [...]")
    if batch_size < 1:
        raise HainaError(f"batch size must be at least 1, got {batch_size}")
    existing = next((c for c in store.list_collections() if c.name == collection), None)
    settings = rag_settings(existing) if existing is not None else None
    if embedder is None and settings is not None and settings.get("embedder") is not None:
        embedder = settings["embedder"]
    embedder = load_embedder(embedder, device)
    if existing is not None:
        _check_embedder(existing, settings, embedder)
    cfg = _chunk_settings(settings, chunk_tokens, overlap, embedder, collection)
    count_tokens = embedder.count_tokens if embedder is not None else whitespace_tokens

    files, dirs, documents = read_documents(inputs, text_field)
    counts = IndexCounts(collection=collection, mode="bm25" if embedder is None else "hybrid")
    chunks: list[Chunk] = []
    for doc in documents:
        counts.documents += 1
        chunks += chunk_text(doc.text, doc.source, source_id=doc.source_id, config=cfg, count_tokens=count_tokens,
                             metadata={"file": doc.file, "doc": doc.source_id})
    held = {r.id: r for r in store.get(collection)} if existing is not None and existing.count else {}
    run_files = set(files)
    ids_now = {c.id for c in chunks}

    def ours(record: Any) -> bool:
        # A record is this run's to keep or delete: from a file read now, from a file gone from an input
        # directory, or holding an id a chunk now has (a record moved between files, or upserted by hand).
        f = record.metadata.get("file")
        if record.id in ids_now or f in run_files:
            return True
        return isinstance(f, str) and any(f.startswith(d.rstrip("/") + "/") for d in dirs) and not Path(f).exists()

    old = {i: str(r.metadata.get("hash", "")) for i, r in held.items() if ours(r)}
    if not chunks and not old:
        raise HainaError(f"no text to index in {', '.join(map(str, inputs))}: the input is empty (or only "
                         f"blank documents); check --input and --text-field")
    plan = plan_reindex(old, chunks)  # raises on two chunks with one id (two records sharing an id)
    new = {c.id: c for c in chunks}

    if existing is None:
        dim = embedder.dim if embedder is not None else BM25_ONLY_DIM
        existing = store.create_collection(collection, dim=dim, metric=metric, hnsw=hnsw)
    if settings is None:
        settings = {"embedder": None if embedder is None else embedder.describe(),
                    "chunk": {"max_tokens": cfg.max_tokens, "overlap": cfg.overlap,
                              "counter": "whitespace" if embedder is None else "embedder"}}
        # Recorded before the first chunk goes in, so that a resumed run finds the same settings.
        store.set_collection_metadata(collection, {**existing.metadata, RAG_KEY: settings})

    side = BM25Side(store, collection, bm25_dir)
    with side.writing() as changes:
        todo = [new[i] for i in plan.added + plan.updated]
        added = set(plan.added)
        bar = progress(total=len(todo), desc="embed" if embedder is not None else "index", unit="chunk")
        for batch in _batches(todo, batch_size):
            texts = [c.text for c in batch]
            vectors = embedder.embed(texts) if embedder is not None else placeholder_vectors(len(batch))
            store.upsert(collection, [c.id for c in batch], vectors, texts, [c.metadata for c in batch])
            changes.append(("put", [(c.id, c.text) for c in batch]))
            for c in batch:
                counts.count(c.metadata["file"], "added" if c.id in added else "updated")
            bar.update(len(batch))
        bar.close()
        moved = [new[i] for i in plan.unchanged if held[i].metadata != new[i].metadata]
        for batch in _batches(moved, max(batch_size, 256)):  # offsets or paths moved: no embedding needed
            store.update(collection, [c.id for c in batch], metadatas=[c.metadata for c in batch])
        for i in plan.unchanged:
            counts.count(new[i].metadata["file"], "unchanged")
        if plan.deleted:
            store.delete(collection, ids=plan.deleted)
            changes.append(("remove", plan.deleted))
            for i in plan.deleted:
                counts.count(str(held[i].metadata.get("file", "")), "deleted")
    return counts
