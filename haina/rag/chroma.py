"""The Chroma backend: an HNSW index embedded in a directory (`PersistentClient`) or behind `chroma run`.

Embeddings are always passed in: collections are made and opened with `embedding_function=None`, so
Chroma never loads (or downloads) its default embedding model, and telemetry is off.

Chroma's own behaviour that this module smooths over (checked against chromadb 1.5.9):

- `upsert` and `update` merge metadata into what a record had; haina replaces it, so the keys a record
  loses are sent as None (which Chroma deletes).
- `update` with texts but no embeddings asks an embedding function for new vectors; haina's `update`
  therefore reads the current records and upserts them whole (see `VectorStore.update`).
- `delete` does not say how many records it deleted, and `get` by ids returns storage order; both are
  settled here and in `VectorStore`.
- The dimension is fixed by the first vector a collection receives, not at creation; haina records it
  in the collection's metadata (key `haina`, JSON) with the caller's metadata, and checks vectors first.
- The metadata fields a collection has seen are Chroma's own `schema.keys` (kept by Chroma, also
  through a server), so filters on unknown fields are caught without scanning the records.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from haina.core.errors import HainaError
from haina.rag.exact import MARKER as EXACT_MARKER
from haina.rag.filters import Filter
from haina.rag.store import HNSW, CollectionInfo, Hit, Record, VectorStore, dir_bytes, similarity

__all__ = ["ChromaStore"]

META_KEY = "haina"  # the collection-metadata key under which haina keeps its JSON
DEFAULT_PORT = 8000  # `chroma run`'s


class ChromaStore(VectorStore):
    """A Chroma database: embedded in `path`, or the server at `server` (a URL)."""

    backend = "chroma"

    def __init__(self, path: str | Path | None = None, server: str | None = None) -> None:
        try:
            import chromadb
            from chromadb.config import Settings
        except ImportError:
            raise HainaError("the Chroma backend needs chromadb: pip install 'haina[rag]' "
                             "(or use --backend exact)") from None
        settings = Settings(anonymized_telemetry=False)
        self.server = server
        self.root: Path | None = None
        self._cols: dict[str, Any] = {}  # name -> (chromadb Collection, CollectionInfo)
        self._known: dict[str, set[str]] = {}  # name -> metadata fields seen (a cache of Chroma's schema)
        self._hint = ""
        if server:
            host, port, ssl = _parse_url(server)
            self.location = server
            self._hint = f"start one with `chroma run --path DIR --host {host} --port {port}`"
            with self._errors():
                self.client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
        else:
            self.root = Path(path if path is not None else "runs/rag")
            self.location = str(self.root)
            _check_root(self.root)
            with self._errors():
                # Chroma caches clients by the path string: an absolute one, so a relative path and a chdir in one
                # process cannot open another store's client.
                self.client = chromadb.PersistentClient(path=str(self.root.resolve()), settings=settings)
        with self._errors():
            self._batch = max(1, int(self.client.get_max_batch_size()))

    # ---- collections ------------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        with self._errors():
            return [c.name for c in self.client.list_collections()]

    def _info(self, name: str, fresh: bool) -> CollectionInfo | None:
        if not fresh and name in self._cols:
            return self._cols[name][1]
        from chromadb.errors import NotFoundError

        with self._errors():
            try:
                col = self.client.get_collection(name, embedding_function=None)
            except NotFoundError:
                self._forget(name)
                return None
            own = _own_metadata(col.metadata)
            dim = own.get("dim") or col.get_model().dimension
            if not dim:
                raise HainaError(f"collection {name!r} in {self.location} was not made by haina and holds no vectors "
                                 "yet, so its dimension is unknown; drop it or choose another name")
            hnsw = _configuration(col).get("hnsw") or {}
            info = CollectionInfo(name=name, dim=int(dim), metric=hnsw.get("space", "l2"),
                                  hnsw=_hnsw_of(hnsw), count=col.count() if fresh else -1,
                                  metadata=own.get("metadata", {}))
        self._cols[name] = (col, info)
        return info

    def _create(self, name: str, dim: int, metric: str, hnsw: HNSW, metadata: dict) -> CollectionInfo:
        asked = {"space": metric, "ef_construction": hnsw.ef_construction, "ef_search": hnsw.ef_search,
                 "max_neighbors": hnsw.m}
        with self._errors():
            self.client.create_collection(name, configuration={"hnsw": dict(asked)}, embedding_function=None,
                                          metadata={META_KEY: json.dumps({"dim": dim, "metadata": metadata})})
            kept = _configuration(self.client.get_collection(name, embedding_function=None)).get("hnsw") or {}
            if any(kept.get(k) != v for k, v in asked.items()):  # read back: a silently ignored setting is a bug
                self.client.delete_collection(name)
                raise HainaError(f"Chroma did not keep the index settings {asked} (it has {kept}); "
                                 "check the installed chromadb version against haina's [rag] extra")
        return self.get_collection(name)

    def _drop(self, name: str) -> None:
        with self._errors(name):
            self.client.delete_collection(name)
        self._forget(name)

    def _set_metadata(self, name: str, metadata: dict) -> None:
        info = self._require(name, fresh=True)
        with self._errors(name):
            self._col(name).modify(metadata={META_KEY: json.dumps({"dim": info.dim, "metadata": metadata})})
        self._forget(name)

    # ---- records ----------------------------------------------------------------------------------------

    def _put(self, name: str, ids: list[str], vectors: np.ndarray, texts: list[str], metadatas: list[dict]) -> None:
        col = self._col(name)
        with self._errors(name):
            for s in range(0, len(ids), self._batch):
                batch = ids[s:s + self._batch]
                had = col.get(ids=batch, include=["metadatas"])
                before = {i: m or {} for i, m in zip(had["ids"], had["metadatas"])}
                metas = []
                for i, meta in zip(batch, metadatas[s:s + self._batch]):
                    gone = {k: None for k in before.get(i, {}) if k not in meta}  # None: Chroma deletes the key
                    metas.append({**gone, **meta} or None)
                col.upsert(ids=batch, embeddings=vectors[s:s + self._batch], documents=texts[s:s + self._batch],
                           metadatas=metas)
        self._known.setdefault(name, set()).update(k for m in metadatas for k in m)

    def _get(self, name: str, ids: list[str] | None, where: Filter | None, limit: int | None,
             include_vectors: bool) -> list[Record]:
        col = self._col(name)
        include = ["documents", "metadatas"] + (["embeddings"] if include_vectors else [])
        out: list[Record] = []
        with self._errors(name):
            if ids is None:
                parts = [col.get(where=where, limit=limit, include=include)]
            else:
                parts = [col.get(ids=ids[s:s + self._batch], where=where, include=include)
                         for s in range(0, len(ids), self._batch)]
        for got in parts:
            vectors = got.get("embeddings") if include_vectors else None
            for k, i in enumerate(got["ids"]):
                out.append(Record(id=i, text=got["documents"][k] or "", metadata=dict(got["metadatas"][k] or {}),
                                  vector=None if vectors is None else np.asarray(vectors[k], dtype=np.float32)))
        return out

    def _delete(self, name: str, ids: list[str]) -> int:
        col = self._col(name)
        deleted = 0
        with self._errors(name):
            for s in range(0, len(ids), self._batch):
                present = col.get(ids=ids[s:s + self._batch], include=[])["ids"]  # Chroma does not count deletes
                if present:
                    col.delete(ids=present)
                    deleted += len(present)
        return deleted

    def _query(self, name: str, vectors: np.ndarray, top_k: int, where: Filter | None) -> list[list[Hit]]:
        col = self._col(name)
        metric = self._cols[name][1].metric
        out: list[list[Hit]] = []
        with self._errors(name):
            for s in range(0, len(vectors), self._batch):
                got = col.query(query_embeddings=vectors[s:s + self._batch], n_results=top_k, where=where,
                                include=["documents", "metadatas", "distances"])
                for ids, docs, metas, dists in zip(got["ids"], got["documents"], got["metadatas"], got["distances"]):
                    out.append([Hit(id=i, score=similarity(metric, float(d)), distance=float(d), text=t or "",
                                    metadata=dict(m or {})) for i, t, m, d in zip(ids, docs, metas, dists)])
        return out

    def _fields(self, name: str, refresh: bool) -> set[str]:
        if not refresh and name in self._known:
            return self._known[name]
        with self._errors(name):
            col = self.client.get_collection(name, embedding_function=None)
            schema = getattr(col, "schema", None)
            if schema is not None and getattr(schema, "keys", None) is not None:
                fields = {k for k in schema.keys if not k.startswith("#")}  # '#document', '#embedding' are Chroma's
            else:  # a server without schemas: read the records' metadata, a page at a time
                fields, offset = set(), 0
                while page := col.get(include=["metadatas"], limit=self._batch, offset=offset)["metadatas"]:
                    fields.update(k for m in page if m for k in m)
                    offset += len(page)
        self._known[name] = fields
        return fields

    def _disk_bytes(self, name: str) -> dict[str, int | None]:
        if self.root is None:
            return {"disk_bytes": None, "store_disk_bytes": None}
        col = self._col(name)
        try:  # the HNSW files sit in one folder per vector segment, named by the segment's id in Chroma's SQLite
            db = sqlite3.connect(f"file:{self.root / 'chroma.sqlite3'}?mode=ro", uri=True, timeout=1.0)
            with contextlib.closing(db):
                rows = db.execute("SELECT id FROM segments WHERE collection = ? AND scope = 'VECTOR'",
                                  (str(col.id),)).fetchall()
            own = sum(dir_bytes(self.root / r[0]) for r in rows)
        except sqlite3.Error:  # a private layout that may change: then the figure is unknown, not wrong
            own = None
        return {"disk_bytes": own, "store_disk_bytes": dir_bytes(self.root)}

    def close(self) -> None:
        self._cols.clear()
        self._known.clear()
        with contextlib.suppress(Exception):  # closing twice, or a server already gone, is not the user's problem
            self.client.close()

    # ---- helpers ------------------------------------------------------------------------------------------

    def _col(self, name: str) -> Any:
        if name not in self._cols:
            self._require(name, fresh=True)
        return self._cols[name][0]

    def _forget(self, name: str) -> None:
        self._cols.pop(name, None)
        self._known.pop(name, None)

    @contextlib.contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        """Chroma's exceptions as one-line HainaErrors: a server that is down, a collection that vanished."""
        import httpx
        from chromadb.errors import ChromaError, NotFoundError

        try:
            yield
        except HainaError:
            raise
        except NotFoundError:
            if name is None:
                raise HainaError(f"Chroma at {self.location}: not found") from None
            self._forget(name)
            raise HainaError(f"no collection {name!r} in {self.location} (was it dropped meanwhile?)") from None
        except httpx.TransportError:
            raise HainaError(self._down()) from None
        except (ChromaError, ValueError) as e:
            if self.server and "could not connect" in str(e).lower():
                raise HainaError(self._down()) from None
            text = " ".join(str(e).split()) or type(e).__name__
            raise HainaError(f"Chroma at {self.location} refused the request: {text[:300]}") from None

    def _down(self) -> str:
        return f"no Chroma server at {self.server}: {self._hint}"


def _parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HainaError(f"bad Chroma server URL {url!r}: give it as http://HOST:PORT, e.g. http://127.0.0.1:8000")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise HainaError(f"bad Chroma server URL {url!r}: the port is not a number") from None
    return parts.hostname, port, parts.scheme == "https"


def _check_root(root: Path) -> None:
    """Refuse a directory that is something else, before Chroma writes its database into it."""
    if root.exists() and not root.is_dir():
        raise HainaError(f"vector store {root} is a file; give a directory to --store")
    if (root / EXACT_MARKER).exists():
        raise HainaError(f"{root} holds an exact-index store; pass --backend exact, or choose another --store")
    if root.is_dir() and not (root / "chroma.sqlite3").exists() and any(
            not p.name.startswith(".") for p in root.iterdir()):
        raise HainaError(f"{root} exists and is not a Chroma store; choose another --store (or an empty directory)")


def _configuration(col: Any) -> dict[str, Any]:
    with warnings.catch_warnings():  # chromadb warns that a collection without an embedding function is "legacy"
        warnings.simplefilter("ignore", DeprecationWarning)
        return col.configuration or {}


def _own_metadata(metadata: dict | None) -> dict[str, Any]:
    try:
        own = json.loads((metadata or {}).get(META_KEY) or "{}")
    except (TypeError, ValueError):
        own = {}
    return own if isinstance(own, dict) else {}


def _hnsw_of(config: dict[str, Any]) -> HNSW:
    defaults = HNSW()
    return HNSW(m=int(config.get("max_neighbors") or defaults.m),
                ef_construction=int(config.get("ef_construction") or defaults.ef_construction),
                ef_search=int(config.get("ef_search") or defaults.ef_search))
