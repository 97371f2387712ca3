"""The exact index: brute-force similarity search over a float32 matrix, persistent in a directory.

Every query scores every record (one matrix product) and keeps the top k with `argpartition`, so the
answer is exact: this is the recall reference for Chroma's HNSW, and the simplest store for small
collections (up to some hundred thousand vectors, all held in memory).

On disk, one directory per collection:

    STORE/haina-exact-store.json        marks the directory as an exact store
    STORE/NAME/collection.json          the manifest: settings, metadata fields, and the files below
    STORE/NAME/base-G.npy, base-G.jsonl  a snapshot: vectors (N, dim) float32, one JSON record per row
    STORE/NAME/delta-G.npy, delta-G.jsonl  changes since (records put, ids deleted), applied in order

A change writes one small delta and then the manifest that names it (atomically, through
`haina.core.io`), so its cost is proportional to the change, not to the collection; when the deltas
outgrow the snapshot they are folded into a new one. A crash leaves the manifest naming complete files
only; files it does not name are leftovers and are removed at the next snapshot. Writers take an
exclusive lock on the collection and readers reload when the manifest changed, so several processes
may share a store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import HainaError
from haina.core.io import atomic_path, read_json, write_json
from haina.rag.filters import Filter, compile_filter
from haina.rag.store import HNSW, CollectionInfo, Hit, Record, VectorStore, dir_bytes

__all__ = ["ExactStore"]

FORMAT = "haina-exact/1"
MARKER = "haina-exact-store.json"
MANIFEST = "collection.json"
MAX_DELTAS = 64  # beyond this many delta files (or more delta rows than the snapshot has) a new snapshot is written
QUERY_CHUNK = 256  # queries scored together: bounds the (N, chunk) score matrix


class _Collection:
    """One collection in memory: records in insertion order, their vectors as rows of one matrix."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.metric = manifest["metric"]
        self.fields: set[str] = set(manifest["fields"])
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.metas: list[dict[str, Any]] = []
        self.row: dict[str, int] = {}
        self.vecs = np.zeros((0, self.dim), dtype=np.float32)  # capacity rows; the first len(ids) are live
        self.norm2 = np.zeros(0, dtype=np.float32)
        self.stamp: tuple[int, int, int] | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def info(self, name: str) -> CollectionInfo:
        m = self.manifest
        return CollectionInfo(name=name, dim=self.dim, metric=self.metric, hnsw=HNSW(**m["hnsw"]), count=self.n,
                              metadata=m["metadata"])

    def put(self, ids: list[str], vectors: np.ndarray, texts: list[str], metas: list[dict[str, Any]]) -> None:
        new = [k for k, i in enumerate(ids) if i not in self.row]
        if self.n + len(new) > len(self.vecs):  # grow geometrically so appends stay amortized O(1)
            cap = max(2 * len(self.vecs), self.n + len(new), 16)
            vecs = np.zeros((cap, self.dim), dtype=np.float32)
            vecs[: self.n] = self.vecs[: self.n]
            norm2 = np.zeros(cap, dtype=np.float32)
            norm2[: self.n] = self.norm2[: self.n]
            self.vecs, self.norm2 = vecs, norm2
        for k in new:
            self.row[ids[k]] = self.n
            self.ids.append(ids[k])
            self.texts.append("")
            self.metas.append({})
        rows = np.fromiter((self.row[i] for i in ids), dtype=np.int64, count=len(ids))
        self.vecs[rows] = vectors
        self.norm2[rows] = np.einsum("ij,ij->i", vectors, vectors)
        for r, text, meta in zip(rows.tolist(), texts, metas):
            self.texts[r] = text
            self.metas[r] = meta
            self.fields.update(meta)

    def delete(self, ids: list[str]) -> int:
        rows = [self.row[i] for i in dict.fromkeys(ids) if i in self.row]
        if not rows:
            return 0
        keep = np.ones(self.n, dtype=bool)
        keep[rows] = False
        self.vecs = self.vecs[: self.n][keep]
        self.norm2 = self.norm2[: self.n][keep]
        idx = np.flatnonzero(keep).tolist()
        self.ids = [self.ids[r] for r in idx]
        self.texts = [self.texts[r] for r in idx]
        self.metas = [self.metas[r] for r in idx]
        self.row = {i: r for r, i in enumerate(self.ids)}
        return len(rows)

    def record(self, r: int, include_vector: bool) -> Record:
        vector = self.vecs[r].copy() if include_vector else None
        return Record(id=self.ids[r], text=self.texts[r], metadata=dict(self.metas[r]), vector=vector)

    def search(self, queries: np.ndarray, top_k: int, where: Filter | None) -> list[list[Hit]]:
        n = self.n
        rows = np.arange(n)
        if where:
            keep = compile_filter(where)
            rows = np.flatnonzero(np.fromiter((keep(m) for m in self.metas), dtype=bool, count=n))
        if not len(rows):
            return [[] for _ in queries]
        vecs = self.vecs[rows] if len(rows) < n else self.vecs[:n]
        k = min(top_k, len(rows))
        out = []
        for start in range(0, len(queries), QUERY_CHUNK):
            q = queries[start:start + QUERY_CHUNK]
            dots = vecs @ q.T  # (N, Q)
            if self.metric == "cosine":
                norms = np.sqrt(self.norm2[rows])[:, None] * np.linalg.norm(q, axis=1)[None, :]
                score = dots / np.maximum(norms, 1e-30)
                dist = 1.0 - score
            elif self.metric == "ip":
                score, dist = dots, 1.0 - dots
            else:  # |x - q|^2 expanded; rounding can take it a hair below zero for identical vectors
                dist = np.maximum(self.norm2[rows][:, None] - 2.0 * dots + np.einsum("ij,ij->i", q, q)[None, :], 0.0)
                score = -dist
            for j in range(len(q)):
                s = score[:, j]
                top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
                top = top[np.argsort(-s[top], kind="stable")]
                out.append([Hit(id=self.ids[r], score=float(s[t]), distance=float(dist[t, j]),
                                text=self.texts[r], metadata=dict(self.metas[r]))
                            for t, r in zip(top.tolist(), rows[top].tolist())])
        return out


class ExactStore(VectorStore):
    """Exact brute-force search in a directory (see the module docstring for the layout)."""

    backend = "exact"

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise HainaError(f"vector store {self.root} is a file; give a directory to --store")
        if (self.root / "chroma.sqlite3").exists():
            raise HainaError(f"{self.root} holds a Chroma store; pass --backend chroma, or choose another --store")
        self._cache: dict[str, _Collection] = {}

    # ---- collections ------------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if (p / MANIFEST).is_file()]

    def _info(self, name: str, fresh: bool) -> CollectionInfo | None:
        col = self._load(name)
        return None if col is None else col.info(name)

    def _create(self, name: str, dim: int, metric: str, hnsw: HNSW, metadata: dict) -> CollectionInfo:
        self._claim_root()
        manifest = {"format": FORMAT, "name": name, "dim": dim, "metric": metric, "hnsw": asdict(hnsw),
                    "metadata": metadata, "fields": [], "generation": 0, "base": None, "base_rows": 0,
                    "deltas": [], "delta_rows": 0}
        tmp = self.root / f".{name}.{uuid.uuid4().hex[:8]}.new"
        tmp.mkdir()
        try:
            write_json(tmp / MANIFEST, manifest)
            tmp.rename(self.root / name)  # fails if another process created it meanwhile
        except OSError as e:
            raise HainaError(f"cannot create collection {name!r} in {self.root}: {e.strerror}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self._load(name).info(name)

    def _drop(self, name: str) -> None:
        gone = self.root / f".{name}.{uuid.uuid4().hex[:8]}.dropped"
        (self.root / name).rename(gone)  # at once invisible to other processes, then deleted at leisure
        self._cache.pop(name, None)
        shutil.rmtree(gone, ignore_errors=True)

    def _set_metadata(self, name: str, metadata: dict) -> None:
        with self._writing(name) as col:
            col.manifest["metadata"] = metadata
            self._write_manifest(name, col)

    # ---- records ----------------------------------------------------------------------------------------

    def _put(self, name: str, ids: list[str], vectors: np.ndarray, texts: list[str], metadatas: list[dict]) -> None:
        lines = [{"id": i, "text": t, "metadata": m} for i, t, m in zip(ids, texts, metadatas)]
        with self._writing(name) as col:
            col.put(ids, vectors, texts, metadatas)
            self._commit(name, col, lines, vectors)

    def _delete(self, name: str, ids: list[str]) -> int:
        with self._writing(name) as col:
            gone = [i for i in dict.fromkeys(ids) if i in col.row]
            if gone:
                col.delete(gone)
                self._commit(name, col, [{"delete": i} for i in gone], None)
            return len(gone)

    def _get(self, name: str, ids: list[str] | None, where: Filter | None, limit: int | None,
             include_vectors: bool) -> list[Record]:
        col = self._load(name, required=True)
        rows = range(col.n) if ids is None else sorted(col.row[i] for i in ids if i in col.row)
        keep = compile_filter(where)
        out = []
        for r in rows:
            if limit is not None and len(out) >= limit:
                break
            if keep(col.metas[r]):
                out.append(col.record(r, include_vectors))
        return out

    def _query(self, name: str, vectors: np.ndarray, top_k: int, where: Filter | None) -> list[list[Hit]]:
        return self._load(name, required=True).search(vectors, top_k, where)

    def _fields(self, name: str, refresh: bool) -> set[str]:
        return set(self._load(name, required=True).fields)  # _load already rereads a changed manifest

    def _disk_bytes(self, name: str) -> dict[str, int | None]:
        return {"disk_bytes": dir_bytes(self.root / name), "store_disk_bytes": dir_bytes(self.root)}

    def close(self) -> None:
        self._cache.clear()

    # ---- persistence ------------------------------------------------------------------------------------

    def _claim_root(self) -> None:
        """Create the store directory, refusing one that holds something else."""
        marker = self.root / MARKER
        if marker.is_file():
            return
        if self.root.is_dir() and any(not p.name.startswith(".") for p in self.root.iterdir()):
            raise HainaError(f"{self.root} exists and is not a haina exact store; choose another --store "
                             "(or an empty directory)")
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"format": FORMAT})

    @contextlib.contextmanager
    def _lock(self, name: str, exclusive: bool) -> Iterator[None]:
        path = self.root / name / ".lock"
        try:
            with open(path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield  # the lock goes with the file's closing
        except FileNotFoundError:
            if (self.root / name).exists():
                raise
            raise HainaError(f"collection {name!r} was dropped from {self.root} while in use") from None

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[_Collection]:
        """The collection, fresh from disk and locked against other writers; reloaded if the change fails."""
        with self._lock(name, exclusive=True):
            col = self._load(name, required=True, locked=True)
            try:
                yield col
            except BaseException:
                self._cache.pop(name, None)  # memory may be ahead of disk: the next access rereads the disk
                raise

    def _stamp(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.root / name / MANIFEST).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size  # the manifest is replaced by rename: a new inode each write

    def _load(self, name: str, required: bool = False, locked: bool = False) -> _Collection | None:
        stamp = self._stamp(name)
        if stamp is None:
            self._cache.pop(name, None)
            if required:
                raise HainaError(f"no collection {name!r} in {self.root} (was it dropped meanwhile?)")
            return None
        col = self._cache.get(name)
        if col is not None and col.stamp == stamp:
            return col
        if locked:
            col = self._read(name)
        else:
            with self._lock(name, exclusive=False):  # a writer must not fold away files while we read them
                col = self._read(name)
        self._cache[name] = col
        return col

    def _read(self, name: str) -> _Collection:
        folder = self.root / name
        stamp = self._stamp(name)
        hint = f"the collection {name!r} is damaged; drop it and index again"
        manifest = read_json(folder / MANIFEST, hint=hint, expect=dict)
        if manifest.get("format") != FORMAT:
            raise HainaError(f"{folder / MANIFEST} is not a {FORMAT} collection manifest; {hint}")
        col = _Collection(manifest)
        for part in ([manifest["base"]] if manifest["base"] else []) + manifest["deltas"]:
            lines = _read_jsonl(folder / part["records"], hint)
            vectors = _read_npy(folder / part["vectors"], col.dim, hint) if part["vectors"] else None
            puts = [x for x in lines if "delete" not in x]
            if len(puts) != (0 if vectors is None else len(vectors)):
                raise HainaError(f"{folder / part['records']} and its vectors disagree in length; {hint}")
            if puts:
                col.put([x["id"] for x in puts], vectors, [x["text"] for x in puts], [x["metadata"] for x in puts])
            col.delete([x["delete"] for x in lines if "delete" in x])
        col.fields = set(manifest["fields"])  # the fields ever seen, which deletes do not shrink
        col.stamp = stamp
        return col

    def _commit(self, name: str, col: _Collection, lines: list[dict], vectors: np.ndarray | None) -> None:
        """Write a change as a delta (or a new snapshot when the deltas have grown), then the manifest."""
        folder = self.root / name
        m = col.manifest
        m["generation"] += 1
        g = m["generation"]
        m["fields"] = sorted(col.fields)
        # Folding when the deltas outgrow the snapshot doubles the snapshot each time: O(1) amortized per row.
        if len(m["deltas"]) + 1 > MAX_DELTAS or m["delta_rows"] + len(lines) > max(1024, m["base_rows"]):
            _write_npy(folder / f"base-{g}.npy", col.vecs[: col.n])
            _write_jsonl(folder / f"base-{g}.jsonl", [{"id": i, "text": t, "metadata": md}
                                                      for i, t, md in zip(col.ids, col.texts, col.metas)])
            m["base"] = {"records": f"base-{g}.jsonl", "vectors": f"base-{g}.npy"}
            m["deltas"], m["delta_rows"], m["base_rows"] = [], 0, col.n
            self._write_manifest(name, col)
            named = {m["base"]["records"], m["base"]["vectors"]}
            for p in folder.iterdir():  # earlier snapshots and deltas, and a crash's leftovers
                if p.name.startswith(("base-", "delta-")) and p.name not in named:
                    p.unlink(missing_ok=True)
            return
        if vectors is not None:
            _write_npy(folder / f"delta-{g}.npy", vectors)
        _write_jsonl(folder / f"delta-{g}.jsonl", lines)
        m["deltas"].append({"records": f"delta-{g}.jsonl", "vectors": f"delta-{g}.npy" if vectors is not None else None})
        m["delta_rows"] += len(lines)
        self._write_manifest(name, col)

    def _write_manifest(self, name: str, col: _Collection) -> None:
        write_json(self.root / name / MANIFEST, col.manifest)
        col.stamp = self._stamp(name)


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _read_npy(path: Path, dim: int, hint: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise HainaError(f"cannot read {path}: {e}; {hint}") from None
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != dim:
        raise HainaError(f"{path} holds {array.dtype} {array.shape}, not (N, {dim}) float32; {hint}")
    return array


def _read_jsonl(path: Path, hint: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise HainaError(f"cannot read {path}: {e}; {hint}") from None
    if not all(isinstance(r, dict) and ("delete" in r or {"id", "text", "metadata"} <= r.keys()) for r in rows):
        raise HainaError(f"{path} holds records of an unexpected shape; {hint}")
    return rows
