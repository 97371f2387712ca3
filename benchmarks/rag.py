"""Retrieval at scale: vector-store indexing and query speed, HNSW recall, embedding speed and BM25 queries/s.

Three stores behind haina's `VectorStore` interface (`haina.rag.open_store`), each given the same records:
- **exact**: the in-process exact index (numpy), the recall reference;
- **chroma embedded**: Chroma's `PersistentClient` in a directory;
- **chroma server**: a `chroma run --path TMP --host 127.0.0.1` started here on a free port (and stopped at the
  end), reached over HTTP; it shares the machine's cores with this process.

At each collection size in --sizes (chunks), the script measures:
- **store upsert chunks/s**: the collection is built through `VectorStore.upsert` in batches of --batch (the
  indexer's default, `index_documents(batch_size=...)`), one slice of the records per round, the stores
  taking turns within a round (the order reversed every other round). A round's figure is its slice's
  chunks/s, so the spread also holds the slowdown of a growing index; "whole build" is all chunks over the
  summed time;
- **query latency**: --queries single queries (one vector per call, top 10), with no filter and with an
  equality filter on an integer metadata field that about 10% of the chunks match (`{"group": g}`, g the
  group of the document the query was drawn about: a question asked within one product's or one team's
  documents); p50 and p99 per round, reported as medians over the rounds with their range, and the p50
  against the exact index's within each round. On a busy machine the exact index's unfiltered p50 includes
  waking numpy's BLAS threads for every product (the header prints how many there are): at 2 k chunks and
  a load average of 5 on 2 cores, 8-18 ms, where one BLAS thread takes 0.04 ms;
- **recall@10** of each Chroma store against the exact index on the same vectors, queries and filters, at
  haina's default ef_search (`HNSW().ef_search`) and at --ef-search: the collection's search setting is
  changed with Chroma's own `modify`, and the store reopened (the server restarted) so that it is read;
- **BM25**: `BM25Index` built over the same chunk texts (chunks/s), then --queries text queries (six
  consecutive words of a random chunk), top 10; queries/s per round.

Records: the text of the standard library's documentation (`haina.data.stdlib_corpus`), cut by
`haina.rag.chunk` with the indexer's defaults and no embedder (256 words, 32 of overlap), about 1.7 k chunks;
larger sizes add variants of every chunk, each made of lines drawn at random from its document and the two
documents on either side, with the chunk's length, so the texts keep the corpus's words and their frequencies
without repeating it. Metadata as `haina rag index` writes it (source, file, doc, section, start, end,
chunk, tokens, hash) plus `group` (one of ten, per document).

Vectors: synthetic, because embedding 100 k chunks with a real model takes hours on two cores. 384
dimensions (all-MiniLM-L6-v2's), unit length, cosine metric, drawn as a hierarchy of Gaussians in an
anisotropic space (a power-law spectrum on a random basis, around a shared mean direction): document
topics, each chunk variant's document, then its chunk; a query is drawn about a random chunk's document,
with more noise. The constants were fitted to MiniLM embeddings of 800 stdlib chunks (140 documents) and
of 150 questions about those documents from `haina data instruct --from-stdlib`, real vs synthetic: mean
pairwise cosine 0.21 vs 0.19, nearest neighbour 0.77 vs 0.71, 10th neighbour 0.55 vs 0.55,
participation-ratio dimension 53 vs 48-52; a question's best chunk 0.65 vs 0.65, its 10th 0.46 vs 0.49.
Every run prints the chunk check again on its own embedding sample. HNSW recall depends on that
geometry, so the recall figures hold for embeddings like MiniLM's, not for every model.

Embedding: chunks/s of `minilm` (when its package is installed) and of a haina model of the quickstart
recipe's shape (runs/quickstart if it exists, else random weights with a BPE tokenizer trained on the
corpus: speed depends on the shape, not the weights) on --embed-sample real chunks, cut with each
embedder's own tokenizer as the indexer cuts them, embedded in batches of --batch; interleaved rounds.
The indexer embeds and then upserts every batch, so the end-to-end indexing rate is
1 / (1/embed + 1/upsert), from the medians; printed for every store and embedder.

    .venv/bin/python benchmarks/rag.py                     # 10 k and 100 k chunks (~15 min on 2 cores)
    .venv/bin/python benchmarks/rag.py --sizes 10000       # 10 k only
    .venv/bin/python benchmarks/rag.py --quick             # a smoke run: 2 k chunks, fewer queries
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rounds import Spread, cpu_model, load_average, ratios, round_order

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the hub
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

DIM = 384  # all-MiniLM-L6-v2's
GROUPS = 10  # values of the filtered metadata field: a filter keeps about a tenth of the chunks
TOP_K = 10
WINDOW = 2  # a variant draws its lines from its document and this many documents on either side
# The synthetic geometry (see the module docstring): spectrum exponent, the shared mean's length, and the
# noise of each level, fitted to MiniLM embeddings of stdlib chunks and questions.
SPECTRUM, MEAN, TOPIC, VARIANT, CHUNK, QUERY = 0.6, 0.6, 1.0, 0.4, 0.8, 1.2


def blas() -> str:
    """numpy's BLAS and its thread count: small single-query products pay for waking its threads on a busy machine."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS threads unknown (no threadpoolctl)"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")]
    return f"numpy BLAS {pools[0]['internal_api']}, {pools[0]['num_threads']} threads" if pools else "numpy BLAS ?"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(parts: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------------- records
@dataclass
class Corpus:
    """Chunk records and, for the vectors, each one's topic (its original document) and document (variant)."""

    ids: list[str]
    texts: list[str]
    metas: list[dict]
    topic: np.ndarray
    doc: np.ndarray


def base_chunks() -> tuple[list[dict], list]:
    """The stdlib documents and their chunks as `haina rag index` cuts them without an embedder."""
    from haina.data.stdlib_corpus import iter_stdlib_documents
    from haina.rag.chunk import chunk_text

    docs = list(iter_stdlib_documents())
    chunks = []
    for k, d in enumerate(docs):
        for c in chunk_text(d["text"], d["source"], source_id=d["id"], metadata={"file": d["source"], "doc": d["id"]}):
            chunks.append((k, c))
    return docs, chunks


def make_corpus(n: int, docs: list[dict], chunks: list, seed: int) -> Corpus:
    """`n` records: the real chunks first, then variants of them (see the module docstring)."""
    from haina.rag.chunk import content_hash

    lines = [[ln for ln in d["text"].splitlines() if ln.strip()] for d in docs]
    pools: dict[int, list[str]] = {}
    rnd = random.Random(seed)
    ids, texts, metas, topic, doc = [], [], [], [], []
    copy = 0
    while len(ids) < n:
        for k, c in chunks[: n - len(ids)]:
            meta = dict(c.metadata)
            if copy:
                pool = pools.get(k) or pools.setdefault(k, [ln for d in lines[max(0, k - WINDOW):k + WINDOW + 1]
                                                            for ln in d])
                parts, size = [], 0
                while size < len(c.text):
                    parts.append(rnd.choice(pool))
                    size += len(parts[-1]) + 1
                text = "\n".join(parts)
                meta.update(doc=f"{meta['doc']}~{copy}", end=meta["start"] + len(text), tokens=len(text.split()),
                            hash=content_hash(text, meta["section"]))
            else:
                text = c.text
            meta["group"] = zlib.crc32(meta["doc"].encode()) % GROUPS
            ids.append(f"{meta['doc']}:{meta['chunk']}")
            texts.append(text)
            metas.append(meta)
            topic.append(k)
            doc.append(copy * len(docs) + k)
        copy += 1
    return Corpus(ids, texts, metas, np.asarray(topic), np.unique(doc, return_inverse=True)[1])


class Space:
    """The synthetic embedding space: a basis, a spectrum, a mean, and latent topic and document offsets."""

    def __init__(self, n_topics: int, n_docs: int, seed: int):
        rng = np.random.default_rng(seed)
        self.basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
        lam = np.arange(1, DIM + 1, dtype=np.float64) ** -SPECTRUM
        self.scale = np.sqrt(lam / lam.sum() * DIM).astype(np.float32)
        mean = rng.standard_normal(DIM)
        self.mean = (mean * MEAN * np.sqrt(DIM) / np.linalg.norm(mean)).astype(np.float32)
        self.topics = TOPIC * rng.standard_normal((n_topics, DIM), dtype=np.float32)
        self.docs = VARIANT * rng.standard_normal((n_docs, DIM), dtype=np.float32)
        self.rng = rng

    def sample(self, topic: np.ndarray, doc: np.ndarray, noise: float) -> np.ndarray:
        """(len(topic), DIM) unit vectors about these topics and documents, with `noise` at the last level."""
        out = np.empty((len(topic), DIM), dtype=np.float32)
        for s in range(0, len(topic), 8192):
            t, d = topic[s:s + 8192], doc[s:s + 8192]
            z = self.topics[t] + self.docs[d] + noise * self.rng.standard_normal((len(t), DIM), dtype=np.float32)
            x = self.mean + (z * self.scale) @ self.basis.T
            out[s:s + len(t)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def geometry(x: np.ndarray) -> dict[str, float]:
    """What the synthetic vectors are fitted to: mean pairwise cosine, 1st/10th neighbour cosine, PR dimension."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    pair = float(s[np.triu_indices(len(x), 1)].mean())
    np.fill_diagonal(s, -np.inf)
    near = -np.sort(-s, axis=1)
    c = x - x.mean(0)
    ev = np.linalg.eigvalsh(c.T @ c / len(x))
    return {"pair": pair, "nn1": float(near[:, 0].mean()), "nn10": float(near[:, min(9, len(x) - 2)].mean()),
            "dim": float(ev.sum() ** 2 / (ev ** 2).sum())}


# --------------------------------------------------------------------------------- embedding
def embedders(args: argparse.Namespace, texts: list[str], tmp: Path) -> tuple[dict, list[str]]:
    """{name: Embedder} for minilm (if installed) and a quickstart-shape haina model; notes on what was used."""
    from haina.core.errors import HainaError
    from haina.generate.embed import MINILM, Embedder

    out, notes = {}, []
    try:
        out["minilm"] = Embedder.load(MINILM, device=args.device)
    except HainaError as e:
        notes.append(f"minilm skipped: {e}")
    if Path(args.haina_model).exists():
        try:
            out["haina quickstart"] = Embedder.load(args.haina_model, device=args.device)
            notes.append(f"haina quickstart: {args.haina_model}")
        except HainaError as e:
            notes.append(f"{args.haina_model} not loaded ({e})")
    if "haina quickstart" not in out:
        import torch

        from haina.model import Transformer
        from haina.model.checkpoint import save_model
        from haina.tokenizer.train import train_bpe
        from haina.train.config import PretrainConfig
        from haina.train.pretrain import find_recipe

        cfg = PretrainConfig.from_file(find_recipe("quickstart")).model
        tokenizer = train_bpe(texts, vocab_size=cfg.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_model(tmp / "quickstart", Transformer(cfg), tokenizer)
        out["haina quickstart"] = Embedder.load(str(tmp / "quickstart"), device=args.device)
        notes.append("haina quickstart: random weights, the recipe's shape "
                     f"({cfg.n_layer} layers, d={cfg.n_embd}, context {cfg.block_size}), BPE {cfg.vocab_size} "
                     "trained on the corpus")
    return out, notes


def embed_sample(embedder, docs: list[dict], size: int, seed: int) -> tuple[list[str], list[int]]:
    """`size` chunks of randomly chosen documents, cut as the indexer cuts them for this embedder."""
    from haina.rag.chunk import ChunkConfig, chunk_text

    tokens = min(256, embedder.max_tokens)  # index.py's DEFAULT_CHUNK_TOKENS and overlap rule
    cfg = ChunkConfig(max_tokens=tokens, overlap=min(32, tokens // 4))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    texts, owner = [], []
    for k in order:
        for c in chunk_text(docs[k]["text"], docs[k]["source"], config=cfg, count_tokens=embedder.count_tokens):
            texts.append(c.text)
            owner.append(k)
        if len(texts) >= size:
            break
    return texts[:size], owner[:size]


def bench_embedding(args, docs, emb: dict, space: Space, parts: dict) -> dict:
    samples = {name: embed_sample(e, docs, args.embed_sample, args.seed) for name, e in emb.items()}
    for name, e in emb.items():  # untimed warm-up: first batch shapes, allocator, threads
        e.embed(samples[name][0][:8], batch_size=args.batch)
    rates: dict[str, list[float]] = {k: [] for k in emb}
    vectors = {}
    with timed(parts, "embedding (timed rounds)"):
        for r in range(args.rounds):
            for name in round_order(list(emb), r):
                t0 = time.perf_counter()
                vectors[name] = emb[name].embed(samples[name][0], batch_size=args.batch)
                rates[name].append(len(samples[name][0]) / (time.perf_counter() - t0))
                log(f"embed round {r + 1}/{args.rounds}: {name}: {rates[name][-1]:,.1f} chunks/s")
    out = {name: {"rate": rates[name], "dim": emb[name].dim, "n": len(samples[name][0]),
                  "tokens": float(np.mean([emb[name].count_tokens(t) for t in samples[name][0]]))} for name in emb}
    if "minilm" in emb:  # the realism check: MiniLM's geometry on these chunks against the synthetic one
        owner = np.asarray(samples["minilm"][1])
        synthetic = space.sample(owner, np.unique(owner, return_inverse=True)[1], CHUNK)
        out["geometry"] = (geometry(vectors["minilm"]), geometry(synthetic))
    return out


# --------------------------------------------------------------------------------- the Chroma server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """`chroma run` on a free loopback port; `start` waits for its heartbeat, `stop` ends it."""

    def __init__(self, binary: str, path: Path):
        self.binary, self.path, self.proc, self.url = binary, path, None, ""

    def start(self) -> str:
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.path.parent / "chroma-server.log", "ab")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen([self.binary, "run", "--path", str(self.path), "--host", "127.0.0.1", "--port",
                                      str(port)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.path.parent / "chroma-server.log").read_text(errors="replace")[-1500:]
                raise SystemExit(f"chroma run exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return self.url
            time.sleep(0.2)
        self.stop()
        raise SystemExit("chroma run did not answer its heartbeat within 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None


def chroma_binary() -> str | None:
    beside = Path(sys.executable).parent / "chroma"  # the venv's, even when it is not activated
    return str(beside) if beside.exists() else shutil.which("chroma")


# --------------------------------------------------------------------------------- one collection size
def open_stores(tmp: Path, server: ChromaServer | None, exact: bool = True) -> dict:
    from haina.rag import open_store

    stores = {"exact": open_store("exact", tmp / "exact")} if exact else {}
    stores["chroma embedded"] = open_store("chroma", tmp / "chroma")
    if server is not None:
        stores["chroma server"] = open_store("chroma", server=server.url)
    return stores


def reopen_with_ef(stores: dict, name: str, ef: int, tmp: Path, server: ChromaServer | None) -> dict:
    """Set the Chroma collections' ef_search and reopen them (restarting the server) so that it is read."""
    for key in ("chroma embedded", "chroma server"):
        if key in stores:
            # haina's HNSW settings are fixed at creation; Chroma's own `modify` changes the search one, which
            # a loaded index picks up only when it is loaded again.
            stores[key].client.get_collection(name, embedding_function=None).modify(
                configuration={"hnsw": {"ef_search": ef}})
            stores[key].close()
    if server is not None:
        server.stop()
        server.start()
    stores.update(open_stores(tmp, server, exact=False))
    for key in ("chroma embedded", "chroma server"):
        if key in stores and stores[key].get_collection(name).hnsw.ef_search != ef:
            raise SystemExit(f"{key}: ef_search is still {stores[key].get_collection(name).hnsw.ef_search}, not {ef}")
    return stores


def run_queries(store, name: str, queries: np.ndarray, wheres: list | None) -> tuple[list[float], list[list[str]]]:
    """Milliseconds per single query and the ids it returned."""
    lat, got = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        hits = store.query(name, queries[i], top_k=TOP_K, where=None if wheres is None else wheres[i])[0]
        lat.append((time.perf_counter() - t0) * 1e3)
        got.append([h.id for h in hits])
    return lat, got


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True) if t]))


def query_rounds(args, stores: dict, keys: list[str], name: str, qv, wheres) -> dict:
    """{(store, filtered): {"p50": [...], "p99": [...], "ids": first round's hits}} over interleaved rounds."""
    sides = [(k, f) for k in keys for f in (False, True)]
    for k, f in sides:  # untimed: loads an index reopened from disk, warms caches and connections
        run_queries(stores[k], name, qv[:10], wheres[:10] if f else None)
    out = {s: {"p50": [], "p99": [], "ids": None} for s in sides}
    for r in range(args.rounds):
        for k, f in round_order(sides, r):
            lat, got = run_queries(stores[k], name, qv, wheres if f else None)
            res = out[(k, f)]
            res["p50"].append(float(np.percentile(lat, 50)))
            res["p99"].append(float(np.percentile(lat, 99)))
            res["ids"] = res["ids"] or got
            log(f"query round {r + 1}/{args.rounds}: {k}{' filtered' if f else ''}: p50 {res['p50'][-1]:.2f} ms")
    return out


def bench_size(args, n: int, docs, chunks, tmp: Path, server, parts: dict) -> dict:
    from haina.rag import HNSW
    from haina.rag.bm25 import BM25Index

    tag = f"{n:,} chunks"
    with timed(parts, f"{tag}: texts and vectors"):
        corpus = make_corpus(n, docs, chunks, args.seed)
        space = Space(int(corpus.topic.max()) + 1, int(corpus.doc.max()) + 1, args.seed)
        vectors = space.sample(corpus.topic, corpus.doc, CHUNK)
        pick = np.random.default_rng(args.seed + 1).integers(0, n, args.queries)
        qv = space.sample(corpus.topic[pick], corpus.doc[pick], QUERY)
        wheres = [{"group": corpus.metas[i]["group"]} for i in pick]
    groups = np.bincount([m["group"] for m in corpus.metas], minlength=GROUPS)
    selectivity = float(np.mean([groups[w["group"]] for w in wheres]) / n)
    stores = open_stores(tmp, server)
    name = f"bench-{n}"
    ef0 = HNSW().ef_search
    for s in stores.values():
        s.create_collection(name, dim=DIM, metric="cosine", hnsw=HNSW())
    # ---- upsert, a slice per round
    upsert: dict[str, list[float]] = {k: [] for k in stores}
    spent = dict.fromkeys(stores, 0.0)
    with timed(parts, f"{tag}: upsert"):
        for r, part in enumerate(np.array_split(np.arange(n), args.rounds)):
            for k in round_order(list(stores), r):
                t0 = time.perf_counter()
                for s in range(0, len(part), args.batch):
                    rows = part[s:s + args.batch]
                    stores[k].upsert(name, [corpus.ids[i] for i in rows], vectors[rows],
                                     [corpus.texts[i] for i in rows], [corpus.metas[i] for i in rows])
                dt = time.perf_counter() - t0
                spent[k] += dt
                upsert[k].append(len(part) / dt)
                log(f"{tag}: upsert round {r + 1}/{args.rounds}: {k}: {upsert[k][-1]:,.0f} chunks/s")
    for k, s in stores.items():
        if s.count(name) != n:
            raise SystemExit(f"{k} holds {s.count(name)} records after upserting {n}")
    # ---- queries at the default ef_search, then at --ef-search
    with timed(parts, f"{tag}: queries"):
        q0 = query_rounds(args, stores, list(stores), name, qv, wheres)
        chroma = [k for k in stores if k != "exact"]
        stores = reopen_with_ef(stores, name, args.ef_search, tmp, server)
        q1 = query_rounds(args, stores, chroma, name, qv, wheres)
    rows = []
    for ef, res in ((ef0, q0), (args.ef_search, q1)):
        for (k, f), v in res.items():
            ref = q0[("exact", f)]
            rows.append({"store": k, "ef": None if k == "exact" else ef, "filtered": f, "p50": Spread.of(v["p50"]),
                         "p99": Spread.of(v["p99"]),
                         "vs": ratios(v["p50"], ref["p50"]) if res is q0 and k != "exact" else None,
                         "recall": None if k == "exact" else recall(v["ids"], ref["ids"])})
    for s in stores.values():
        s.drop_collection(name)
        s.close()
    # ---- BM25 over the same texts
    with timed(parts, f"{tag}: BM25"):
        t0 = time.perf_counter()
        index = BM25Index()
        index.add(zip(corpus.ids, corpus.texts, strict=True))
        index.query("warm up", top_k=TOP_K)  # the first query builds the score matrix
        build = n / (time.perf_counter() - t0)
        rnd = random.Random(args.seed)
        texts = []
        for i in pick:
            words = corpus.texts[i].split()
            at = rnd.randrange(max(1, len(words) - 6))
            texts.append(" ".join(words[at:at + 6]))
        qps = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for t in texts:
                index.query(t, top_k=TOP_K)
            qps.append(len(texts) / (time.perf_counter() - t0))
            log(f"{tag}: BM25 round {r + 1}/{args.rounds}: {qps[-1]:,.0f} queries/s")
    return {"n": n, "upsert": upsert, "whole": {k: n / v for k, v in spent.items()}, "queries": rows,
            "selectivity": selectivity, "bm25": {"build": build, "qps": Spread.of(qps)}}


# --------------------------------------------------------------------------------- main
def main() -> None:
    from haina.rag.index import index_documents

    batch = inspect.signature(index_documents).parameters["batch_size"].default
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="collection sizes (chunks)")
    p.add_argument("--queries", type=int, default=200, help="single queries per store, filter setting and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--batch", type=int, default=batch, help="chunks per upsert and per embedding batch "
                                                            "(default: the indexer's)")
    p.add_argument("--ef-search", type=int, default=200, help="the higher HNSW ef_search measured beside the default")
    p.add_argument("--embed-sample", type=int, default=192, help="real chunks embedded per embedder and round")
    p.add_argument("--haina-model", default="runs/quickstart", help="a quickstart checkpoint (else random weights)")
    p.add_argument("--device", default="cpu", help="where the embedders run")
    p.add_argument("--no-server", action="store_true", help="leave out the Chroma server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 k chunks, 50 queries, 2 rounds, 32 chunks "
                                                        "embedded")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.queries, args.rounds, args.embed_sample = [2000], 50, 2, 32
    if min(args.sizes) < 1 or args.queries < 10 or args.rounds < 1 or args.batch < 1 or args.embed_sample < 8:
        p.error("--sizes, --rounds and --batch must be at least 1, --queries at least 10, --embed-sample at least 8")
    t_start, parts = time.perf_counter(), {}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="haina-bench-rag-") as tmp_name:
        tmp = Path(tmp_name)
        with timed(parts, "corpus and chunking"):
            docs, chunks = base_chunks()
        with timed(parts, "embedders loaded"):
            emb, notes = embedders(args, [d["text"] for d in docs], tmp)
        space = Space(len(docs), len(docs), args.seed)
        embedding = bench_embedding(args, docs, emb, space, parts)
        binary = None if args.no_server else chroma_binary()
        server = ChromaServer(binary, tmp / "server") if binary else None
        if server is None:
            notes.append("chroma server left out" + ("" if args.no_server else ": no `chroma` command"))
        try:
            if server is not None:
                with timed(parts, "chroma server start"):
                    server.start()
            sizes = [bench_size(args, n, docs, chunks, tmp, server, parts) for n in args.sizes]
        finally:
            if server is not None:
                server.stop()
    report(args, len(chunks), embedding, sizes, notes, parts, (load_before, load_average()),
           time.perf_counter() - t_start)


def report(args, base: int, embedding: dict, sizes: list[dict], notes: list[str], parts: dict, load, total) -> None:
    import bm25s
    import chromadb

    from haina.rag import HNSW

    hnsw = HNSW()
    print("\n## Retrieval: vector stores, HNSW recall, embedding and BM25 (issue 17)\n")
    print(f"{datetime.date.today()} · {cpu_model()} ({os.cpu_count()} cores) · Python {platform.python_version()} · "
          f"numpy {np.__version__} ({blas()}) · chromadb {chromadb.__version__} · bm25s {bm25s.__version__} · "
          f"{args.rounds} interleaved round{'s' if args.rounds != 1 else ''} · load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after · {total / 60:.1f} min in all\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/rag.py', *sys.argv[1:]])}`\n")
    print(f"Records: stdlib documentation chunks ({base:,} real, the rest variants), synthetic {DIM}-d unit vectors "
          f"fitted to MiniLM's geometry, cosine; HNSW m={hnsw.m}, ef_construction={hnsw.ef_construction} (haina's "
          f"defaults); upserts "
          f"and embedding in batches of {args.batch}. {'; '.join(notes)}.\n")
    rates = {k: Spread.of(v["rate"]) for k, v in embedding.items() if k != "geometry"}
    print("### Store upserts and end-to-end indexing\n")
    head = " | ".join(f"with {k} embedding: chunks/s" for k in rates)
    print(f"| chunks | store | upsert chunks/s: median slice (min–max, rounds) | whole build chunks/s | {head} |")
    print("|---:|---|---:|---:|" + "---:|" * len(rates))
    for s in sizes:
        for k, v in s["upsert"].items():
            u = Spread.of(v)
            ends = " | ".join(f"{1 / (1 / e.median + 1 / u.median):,.1f}" for e in rates.values())
            print(f"| {s['n']:,} | {k} | {u.text(',.0f')} | {s['whole'][k]:,.0f} | {ends} |")
    print("\nEnd to end = 1 / (1/embed + 1/upsert) from the medians: the indexer embeds a batch, then upserts it.\n")
    print("### Embedding real chunks\n")
    print("| embedder | dim | chunks | tokens/chunk (mean) | chunks/s: median (min–max, rounds) |")
    print("|---|---:|---:|---:|---:|")
    for k, e in rates.items():
        v = embedding[k]
        print(f"| {k} | {v['dim']} | {v['n']} | {v['tokens']:.0f} | {e.text(',.1f')} |")
    if "geometry" in embedding:
        real, syn = embedding["geometry"]
        print("\nGeometry on the minilm sample, MiniLM vs synthetic (same documents): " + ", ".join(
            f"{label} {real[key]:.2f} vs {syn[key]:.2f}" for key, label in
            (("pair", "mean pairwise cosine"), ("nn1", "nearest-neighbour cosine"), ("nn10", "10th neighbour"),
             ("dim", "participation-ratio dimension"))) + ".")
    print(f"\n### Query latency (single queries, top {TOP_K}) and recall@{TOP_K} against the exact index\n")
    print("| chunks | store | ef_search | filter | p50 ms: median (min–max, rounds) | p99 ms: median (min–max) | "
          f"p50 vs exact | recall@{TOP_K} |")
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    for s in sizes:
        for q in s["queries"]:
            print(f"| {s['n']:,} | {q['store']} | {q['ef'] or '—'} | {'group' if q['filtered'] else '—'} | "
                  f"{q['p50'].text('.2f')} | {q['p99'].text('.2f')} | "
                  f"{q['vs'].text('.2f', '×') if q['vs'] else '—'} | "
                  f"{'reference' if q['recall'] is None else format(q['recall'], '.3f')} |")
    print(f"\n{args.queries} queries per row and round. Filter: `{{\"group\": g}}`, matching "
          + ", ".join(f"{s['selectivity']:.1%} of {s['n']:,}" for s in sizes)
          + " chunks on average. \"p50 vs exact\": the ratio of p50s within each round (below 1: faster than exact).\n")
    print("### BM25 (bm25s through `BM25Index`)\n")
    print("| chunks | index build chunks/s | queries/s: median (min–max, rounds) |")
    print("|---:|---:|---:|")
    for s in sizes:
        print(f"| {s['n']:,} | {s['bm25']['build']:,.0f} | {s['bm25']['qps'].text(',.0f')} |")
    print(f"\nQueries: six consecutive words of a random chunk, top {TOP_K}.\n")
    print("Time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()) + ".")


if __name__ == "__main__":
    main()
