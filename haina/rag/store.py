"""The vector store interface: collections of records (id, text, metadata, vector) searched by similarity.

Two backends implement it, chosen by `open_store`:

- `chroma` (`haina.rag.chroma`): Chroma with an HNSW index, embedded in a directory or a `chroma run` server;
- `exact` (`haina.rag.exact`): brute-force search with numpy, persistent in a directory; exact by
  construction, so it is the recall reference for the HNSW index and the simplest store for small collections.

`VectorStore` checks every input once, here, and hands the backends only valid requests, so both give
the same one-line errors and the same answers. Scores are "higher is better" for every metric:

    metric   distance (as Chroma reports it)   score
    cosine   1 - cos(q, x)                      cos(q, x)
    ip       1 - q.x                            q.x
    l2       |q - x|^2 (squared)                -|q - x|^2

A collection keeps free-form JSON `metadata` beside it (the RAG indexer records there which embedder
built it and how it chunked), and the set of record metadata fields it has seen, so a filter on a field
that no record ever had is reported (a typo) instead of silently matching nothing.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from haina.core.errors import HainaError
from haina.rag.filters import Filter, fields_of, normalize, value_kind

__all__ = ["HNSW", "METRICS", "CollectionInfo", "Hit", "Record", "VectorStore", "open_store"]

Metric = Literal["cosine", "l2", "ip"]
METRICS = ("cosine", "l2", "ip")
# Chroma's rule for collection names; the exact index uses the same so a collection can move between them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]")


@dataclass(frozen=True, kw_only=True)
class HNSW:
    """HNSW index parameters (used by Chroma; the exact index keeps them but searches exhaustively).

    Args:
        m: neighbours per node (Chroma's `max_neighbors`): more is better recall, more memory.
        ef_construction: candidate list while building: more is a better graph, slower inserts.
        ef_search: candidate list while searching: more is better recall, slower queries.
    """

    m: int = 16
    ef_construction: int = 100
    ef_search: int = 50

    def __post_init__(self) -> None:
        for name, low in (("m", 2), ("ef_construction", 1), ("ef_search", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise HainaError(f"HNSW {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CollectionInfo:
    """A collection's settings: its vector dimension and metric are fixed at creation."""

    name: str
    dim: int
    metric: Metric
    hnsw: HNSW
    count: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Record:
    """One stored record; `vector` is None unless asked for."""

    id: str
    text: str
    metadata: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class Hit:
    """One query result: `score` is higher-is-better, `distance` lower-is-better (see the module docstring)."""

    id: str
    score: float
    distance: float
    text: str
    metadata: dict[str, Any]


class VectorStore(ABC):
    """Collections of vectors with text and metadata; `open_store` returns one.

    Public methods validate their input and raise `HainaError` with one line on a mistake; subclasses
    implement the underscored primitives, which receive only valid, normalized requests.
    """

    backend: str = ""
    location: str = ""  # the directory or server URL, for messages

    # ---- collections -------------------------------------------------------------------------------------

    def create_collection(self, name: str, dim: int, metric: str = "cosine", hnsw: HNSW | None = None,
                          metadata: Mapping[str, Any] | None = None, exist_ok: bool = False) -> CollectionInfo:
        """Create a collection of `dim`-dimensional vectors compared by `metric` (cosine, l2 or ip).

        With `exist_ok`, an existing collection of the same dimension and metric is returned as it is
        (its own HNSW parameters and metadata kept); one of another dimension or metric is an error.
        """
        _check_name(name)
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise HainaError(f"collection dimension must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise HainaError(f"unknown metric {metric!r}: use cosine, l2 or ip (inner product)")
        hnsw = HNSW() if hnsw is None else hnsw
        if not isinstance(hnsw, HNSW):
            raise HainaError(f"hnsw must be an HNSW(m=..., ef_construction=..., ef_search=...), got {hnsw!r}")
        metadata = _json_object(metadata, f"metadata of collection {name!r}")
        existing = self._info(name, fresh=True)
        if existing is not None:
            if not exist_ok:
                raise HainaError(f"collection {name!r} already exists in {self.location}; "
                                 "drop it first or choose another name")
            if (existing.dim, existing.metric) != (int(dim), metric):
                raise HainaError(f"collection {name!r} exists with dim {existing.dim} and metric {existing.metric}, "
                                 f"not dim {dim} and metric {metric}: drop it or choose another name")
            return existing
        return self._create(name, int(dim), metric, hnsw, metadata)

    def list_collections(self) -> list[CollectionInfo]:
        """Every collection, by name."""
        return [info for name in sorted(self._names()) if (info := self._info(name, fresh=True)) is not None]

    def get_collection(self, name: str) -> CollectionInfo:
        """The collection `name`; a missing one is a one-line error listing those that exist."""
        return self._require(name, fresh=True)

    def _require(self, name: str, fresh: bool = False) -> CollectionInfo:
        """The collection's settings for an operation on it (`fresh`: not from a backend's cache; exact count)."""
        info = self._info(name, fresh=fresh)
        if info is None:
            names = sorted(self._names())
            have = f"it has {', '.join(names[:20])}" + (" ..." if len(names) > 20 else "") if names else "it is empty"
            raise HainaError(f"no collection {name!r} in {self.location} ({have}); "
                             "create it with `haina rag collection create`")
        return info

    def drop_collection(self, name: str) -> None:
        """Delete the collection and everything in it."""
        self._require(name, fresh=True)
        self._drop(name)

    def set_collection_metadata(self, name: str, metadata: Mapping[str, Any]) -> CollectionInfo:
        """Replace the collection's free-form metadata (JSON) and return its info."""
        self._require(name)
        self._set_metadata(name, _json_object(metadata, f"metadata of collection {name!r}"))
        return self.get_collection(name)

    # ---- records -----------------------------------------------------------------------------------------

    def upsert(self, name: str, ids: Sequence[str], vectors: Any, texts: Sequence[str] | None = None,
               metadatas: Sequence[Mapping[str, Any] | None] | None = None) -> None:
        """Insert records, or replace those whose id exists (text, metadata and vector all replaced)."""
        info = self._require(name)
        ids = _check_ids(ids, "upsert", unique=True)
        if not ids:
            return
        vectors = _check_vectors(vectors, info, len(ids), "upsert")
        self._put(name, ids, vectors, _check_texts(texts, len(ids)), _check_metadatas(metadatas, len(ids)))

    def update(self, name: str, ids: Sequence[str], vectors: Any = None, texts: Sequence[str] | None = None,
               metadatas: Sequence[Mapping[str, Any] | None] | None = None) -> None:
        """Change the vector, text and/or metadata (replaced as a whole) of existing records."""
        info = self._require(name)
        ids = _check_ids(ids, "update", unique=True)
        if not ids:
            return
        if vectors is None and texts is None and metadatas is None:
            raise HainaError("update needs vectors, texts or metadatas to change")
        new_vectors = None if vectors is None else _check_vectors(vectors, info, len(ids), "update")
        new_texts = None if texts is None else _check_texts(texts, len(ids))
        new_metas = None if metadatas is None else _check_metadatas(metadatas, len(ids))
        old = {r.id: r for r in self._get(name, ids, None, None, include_vectors=new_vectors is None)}
        missing = [i for i in ids if i not in old]
        if missing:
            raise HainaError(f"update: no record {_some(missing)} in collection {name!r} (upsert adds records)")
        rows = [old[i] for i in ids]
        self._put(name, ids,
                  new_vectors if new_vectors is not None else np.stack([r.vector for r in rows]).astype(np.float32),
                  new_texts if new_texts is not None else [r.text for r in rows],
                  new_metas if new_metas is not None else [r.metadata for r in rows])

    def delete(self, name: str, ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None) -> int:
        """Delete the records with these ids and/or matching `where` (both: their intersection); returns how many."""
        self._require(name)
        if ids is None and not where:
            raise HainaError("delete needs ids or a filter; to delete a whole collection drop it")
        ids = None if ids is None else list(dict.fromkeys(_check_ids(ids, "delete")))
        flt = self._check_where(name, where)
        if flt is not None:
            ids = [r.id for r in self._get(name, ids, flt, None, include_vectors=False)]
        return self._delete(name, ids) if ids else 0

    def get(self, name: str, ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None,
            limit: int | None = None, include_vectors: bool = False) -> list[Record]:
        """Records by id (in the order given; unknown ids are skipped) and/or filter, at most `limit` of them."""
        self._require(name)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise HainaError(f"limit must be a non-negative integer, got {limit!r}")
        ids = None if ids is None else list(dict.fromkeys(_check_ids(ids, "get")))
        flt = self._check_where(name, where)
        if ids is None:
            return self._get(name, None, flt, limit, include_vectors)
        by_id = {r.id: r for r in self._get(name, ids, flt, None, include_vectors)}
        return [by_id[i] for i in ids if i in by_id][:limit]

    def query(self, name: str, vectors: Any, top_k: int = 5, where: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """The `top_k` nearest records to each query vector ((Q, dim) or one (dim,) vector), best first."""
        info = self._require(name)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise HainaError(f"top_k must be a positive integer, got {top_k!r}")
        queries = _check_vectors(vectors, info, None, "query")
        flt = self._check_where(name, where)
        if len(queries) == 0:
            return []
        return self._query(name, queries, top_k, flt)

    def count(self, name: str) -> int:
        """How many records the collection holds."""
        return self.get_collection(name).count

    def stats(self, name: str) -> dict[str, Any]:
        """Count, dimension, metric, HNSW parameters, bytes on disk and metadata fields of a collection.

        `disk_bytes` counts the collection's own files (None where the backend cannot tell, as through a
        server); `store_disk_bytes` the whole store directory (Chroma keeps all collections' records in one
        SQLite file, so its per-collection figure covers only the vector index).
        """
        info = self.get_collection(name)
        return {"name": info.name, "backend": self.backend, "location": self.location, "count": info.count,
                "dim": info.dim, "metric": info.metric, "hnsw": asdict(info.hnsw),
                **self._disk_bytes(name), "fields": sorted(self._fields(name, refresh=True)),
                "metadata": info.metadata}

    def close(self) -> None:
        """Release the store's files or connection; the object is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_where(self, name: str, where: Mapping[str, Any] | None) -> Filter | None:
        flt = normalize(where)
        wanted = fields_of(flt)
        if wanted and not wanted <= self._fields(name, refresh=False):
            known = self._fields(name, refresh=True)  # another writer may have added the field since we looked
            unknown = sorted(wanted - known)
            if unknown:
                have = ", ".join(sorted(known)) or "none: its records have no metadata"
                raise HainaError(f"filter field {unknown[0]!r} is not a metadata field of collection {name!r} "
                                 f"(its fields: {have})")
        return flt

    # ---- what a backend implements ----------------------------------------------------------------------

    @abstractmethod
    def _names(self) -> list[str]: ...

    @abstractmethod
    def _info(self, name: str, fresh: bool) -> CollectionInfo | None:
        """The collection's settings, None if it does not exist; unless `fresh`, may come from a cache."""

    @abstractmethod
    def _create(self, name: str, dim: int, metric: str, hnsw: HNSW, metadata: dict) -> CollectionInfo: ...

    @abstractmethod
    def _drop(self, name: str) -> None: ...

    @abstractmethod
    def _set_metadata(self, name: str, metadata: dict) -> None: ...

    @abstractmethod
    def _put(self, name: str, ids: list[str], vectors: np.ndarray, texts: list[str], metadatas: list[dict]) -> None:
        """Insert or wholly replace records (metadata keys absent from the new metadata are removed)."""

    @abstractmethod
    def _get(self, name: str, ids: list[str] | None, where: Filter | None, limit: int | None,
             include_vectors: bool) -> list[Record]: ...

    @abstractmethod
    def _delete(self, name: str, ids: list[str]) -> int:
        """Delete these ids (some may not exist); returns how many existed."""

    @abstractmethod
    def _query(self, name: str, vectors: np.ndarray, top_k: int, where: Filter | None) -> list[list[Hit]]: ...

    @abstractmethod
    def _fields(self, name: str, refresh: bool) -> set[str]:
        """Every metadata field a record of the collection has had (`refresh`: not from a cache)."""

    @abstractmethod
    def _disk_bytes(self, name: str) -> dict[str, int | None]: ...


def open_store(backend: str = "chroma", path: str | Path = "runs/rag", server: str | None = None) -> VectorStore:
    """Open a vector store: Chroma embedded in `path`, a Chroma server at `server`, or the exact index in `path`.

    Args:
        backend: "chroma" or "exact".
        path: the store directory (created when missing); ignored with `server`.
        server: a Chroma server URL such as http://127.0.0.1:8000 (`chroma run --path DIR --port 8000`).
    """
    if backend == "chroma":
        from haina.rag.chroma import ChromaStore

        return ChromaStore(path=None if server else path, server=server)
    if backend == "exact":
        if server:
            raise HainaError("the exact index runs in-process and has no server; drop --server or use --backend chroma")
        from haina.rag.exact import ExactStore

        return ExactStore(path)
    raise HainaError(f"unknown vector store backend {backend!r}: use chroma or exact")


# ---- input checks shared by the backends ---------------------------------------------------------------------


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise HainaError(f"bad collection name {name!r}: use 3-512 letters, digits, '.', '_' or '-', "
                         "starting and ending with a letter or digit")


def _check_ids(ids: Any, what: str, unique: bool = False) -> list[str]:
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise HainaError(f"{what}: ids must be a list of strings, got {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise HainaError(f"{what}: every id must be a non-empty string, got {bad[0]!r}")
    if unique and len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise HainaError(f"{what}: id {dup!r} appears twice in one call; give each record once")
    return ids


def _check_vectors(vectors: Any, info: CollectionInfo, n: int | None, what: str) -> np.ndarray:
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise HainaError(f"{what}: vectors must be a (N, {info.dim}) array of numbers") from None
    if array.ndim == 1 and n in (None, 1):  # one vector for one record, or one query
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != info.dim:
        got = array.shape[-1] if array.ndim else "a scalar"
        raise HainaError(f"{what}: vectors of dimension {got} for collection {info.name!r} of dimension "
                         f"{info.dim}; embed with the model the collection was built with")
    if n is not None and len(array) != n:
        raise HainaError(f"{what}: {n} ids but {len(array)} vectors")
    if not np.isfinite(array).all():
        raise HainaError(f"{what}: vectors contain NaN or infinity")
    return np.ascontiguousarray(array)


def _check_texts(texts: Sequence[str] | None, n: int) -> list[str]:
    if texts is None:
        return [""] * n
    if isinstance(texts, str) or len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise HainaError(f"texts must be a list of {n} strings, one per id")
    return list(texts)


def _check_metadatas(metadatas: Sequence[Mapping[str, Any] | None] | None, n: int) -> list[dict[str, Any]]:
    if metadatas is None:
        return [{} for _ in range(n)]
    if isinstance(metadatas, Mapping) or len(metadatas) != n:
        raise HainaError(f"metadatas must be a list of {n} objects (or nulls), one per id")
    out = []
    for meta in metadatas:
        if meta is None:
            out.append({})
            continue
        if not isinstance(meta, Mapping):
            raise HainaError(f"record metadata must be an object of field: value, got {type(meta).__name__}")
        for key, value in meta.items():
            if not isinstance(key, str) or not key or key[0] in "$#":
                raise HainaError(f"bad metadata field {key!r}: a non-empty string not starting with '$' or '#'")
            if value_kind(value) is None:
                raise HainaError(f"metadata field {key!r} has value {value!r}: use a string, a finite number, "
                                 "an integer within int64 or a boolean (omit the field for no value)")
        out.append(dict(meta))
    return out


def _json_object(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise HainaError(f"{what} must be a JSON object, got {type(value).__name__}")
    try:  # round-trip, so both backends hand back the same thing (tuples as lists, keys as strings)
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise HainaError(f"{what} is not JSON: {e}") from None


def _some(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


def similarity(metric: str, distance: float) -> float:
    """The score for a Chroma-convention distance (see the module docstring)."""
    return -distance if metric == "l2" else 1.0 - distance


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0

