"""Benchmark `haina data prepare`: throughput per core, and near-duplicate precision/recall.

Prints markdown tables for BENCHMARKS.md:
1. documents/s/core for normalize + filters (Gopher quality, Gopher repetition, C4) + exact dedup;
2. documents/s/core for MinHash (128 permutations, signature + LSH), with datasketch's own
   `MinHash.update_batch` beside it;
3. near-duplicate precision and recall on a generated corpus with planted copies whose words are
   substituted at 2, 5, 10 and 20 %.

Documents are ~1 KB of English-like prose: sentences drawn from the word frequencies of
tinyshakespeare (when ../shared/data has it) or of a synthetic Zipf vocabulary. Times are CPU
time of this process (`time.process_time`), so "per core" holds on a busy machine too.

    .venv/bin/python benchmarks/data_pipeline.py [--docs 4000] [--originals 2000] [--planted 200]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.dedup import Deduplicator, MinHasher, dedup_key, exact_hash
from haina.data.prepare.filters import filter_document
from haina.data.prepare.normalize import normalize_text

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def vocabulary(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Words and their probabilities: tinyshakespeare's if present, else a synthetic Zipf vocabulary."""
    if SHAKESPEARE.is_file():
        words = re.findall(r"[a-z']+", SHAKESPEARE.read_text(encoding="utf-8").lower())
        vocab, counts = np.unique(words, return_counts=True)
        return [str(v) for v in vocab], counts / counts.sum()
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["the", "and", "to", "of", "that", "with", "be", "have"]
    vocab += ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(20_000)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    return vocab, p / p.sum()


class Corpus:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.vocab, self.p = vocabulary(self.rng)

    def words(self, n: int) -> list[str]:
        return [self.vocab[i] for i in self.rng.choice(len(self.vocab), size=n, p=self.p)]

    def document(self, chars: int = 1000) -> str:
        """Paragraphs of sentences (one paragraph per line, blank lines between), about `chars` long."""
        paragraphs, total = [], 0
        while total < chars:
            sentences = []
            for _ in range(int(self.rng.integers(2, 5))):
                w = self.words(int(self.rng.integers(8, 20)))
                sentences.append(" ".join(w).capitalize() + ".")
            para = " ".join(sentences)
            paragraphs.append(para)
            total += len(para) + 2
        return "\n\n".join(paragraphs)

    def substitute(self, text: str, fraction: float) -> str:
        """Replace each word with a random word with probability `fraction` (punctuation kept)."""
        out = []
        for line in text.split("\n"):
            words = line.split(" ")
            for i, w in enumerate(words):
                if w and self.rng.random() < fraction:
                    new = self.words(1)[0]
                    words[i] = new + ("." if w.endswith(".") else "")
            out.append(" ".join(words))
        return "\n".join(out)


def bench_filters(docs: list[str], cfg: PrepareConfig) -> dict:
    dedup = Deduplicator(exact=True, minhash=False)
    kept = 0
    start = time.process_time()
    for i, text in enumerate(docs):
        doc = {"text": normalize_text(text, cfg.normalize)}
        if filter_document(doc, cfg, cfg.filters, {}) is None:
            reason, _ = dedup.check(str(i), exact_hash(dedup_key(doc["text"])), None)
            kept += reason is None
    dt = time.process_time() - start
    return {"docs_per_s": len(docs) / dt, "kept": kept}


def bench_minhash(docs: list[str], num_perm: int, ngram: int) -> dict:
    keys = [dedup_key(d) for d in docs]
    hasher = MinHasher(num_perm, ngram)
    start = time.process_time()
    sigs = [hasher.signature(k) for k in keys]
    t_sig = time.process_time() - start
    dedup = Deduplicator(exact=False, minhash=True, num_perm=num_perm)
    start = time.process_time()
    for i, s in enumerate(sigs):
        dedup.check(str(i), 0, s)
    t_lsh = time.process_time() - start
    # The peer: datasketch's MinHash over the same shingles (bytes), hashed in Python per shingle.
    from datasketch import MinHash

    sub = keys[: max(1, len(keys) // 4)]
    start = time.process_time()
    for k in sub:
        m = MinHash(num_perm=num_perm)
        m.update_batch([k[i:i + ngram].encode() for i in range(len(k) - ngram + 1)])
    t_peer = (time.process_time() - start) / len(sub)
    return {"sig_per_s": len(docs) / t_sig, "lsh_per_s": len(docs) / t_lsh,
            "both_per_s": len(docs) / (t_sig + t_lsh), "peer_per_s": 1 / t_peer, "bands": dedup.bands}


def bench_end_to_end(docs: list[str]) -> float:
    """docs/s of the whole `prepare_documents` in one process: read, every stage, write, report."""
    import json
    import tempfile

    from haina.data.prepare.pipeline import prepare_documents

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        start = time.process_time()
        prepare_documents([path], Path(tmp) / "out", PrepareConfig(workers=1))
        return len(docs) / (time.process_time() - start)


def bench_near_dup(corpus: Corpus, n_orig: int, n_planted: int, cfg: PrepareConfig) -> list[dict]:
    originals = [corpus.document() for _ in range(n_orig)]
    hasher = MinHasher(cfg.minhash_perm, cfg.minhash_ngram)
    dedup = Deduplicator(exact=True, minhash=True, threshold=cfg.minhash_threshold, num_perm=cfg.minhash_perm)
    false_orig = 0
    for i, text in enumerate(originals):
        key = dedup_key(text)
        reason, _ = dedup.check(f"o{i}", exact_hash(key), hasher.signature(key))
        false_orig += reason is not None
    rows = []
    for frac in (0.02, 0.05, 0.10, 0.20):
        found = wrong = 0
        for j in corpus.rng.choice(n_orig, size=n_planted, replace=False):
            key = dedup_key(corpus.substitute(originals[j], frac))
            reason, rep = dedup.check(f"p{frac}-{j}", exact_hash(key), hasher.signature(key))
            if reason is not None:
                found += rep == f"o{j}"
                wrong += rep != f"o{j}"
        flagged = found + wrong
        rows.append({"substituted": frac, "recall": found / n_planted,
                     "precision": found / flagged if flagged else float("nan"), "false_originals": false_orig})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--originals", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=200)
    args = ap.parse_args()
    cfg = PrepareConfig()
    corpus = Corpus(0)
    docs = [corpus.document() for _ in range(args.docs)]
    mean_chars = sum(map(len, docs)) / len(docs)
    print(f"## Data pipeline ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()})\n")
    print(f"{args.docs:,} generated documents of {mean_chars:.0f} characters on average; one core, CPU time.\n")
    f = bench_filters(docs, cfg)
    m = bench_minhash(docs, cfg.minhash_perm, cfg.minhash_ngram)
    print("| stage | docs/s/core | target | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| normalize + filters (gopher, repetition, c4) + exact dedup | {f['docs_per_s']:,.0f} | 2,000 | "
          f"{f['docs_per_s'] / 2000:.2f} |")
    print(f"| MinHash {cfg.minhash_perm} perm, char {cfg.minhash_ngram}-grams: signature + LSH "
          f"({m['bands'][0]} bands × {m['bands'][1]} rows) | {m['both_per_s']:,.0f} | 500 | "
          f"{m['both_per_s'] / 500:.2f} |")
    print(f"| &nbsp;&nbsp; signature only (haina, numpy) | {m['sig_per_s']:,.0f} | | |")
    print(f"| &nbsp;&nbsp; signature only (datasketch `MinHash.update_batch`, same shingles) | "
          f"{m['peer_per_s']:,.0f} | | {m['sig_per_s'] / m['peer_per_s']:.1f}x |")
    print(f"| &nbsp;&nbsp; LSH query + insert (SQLite band index, in memory here) | {m['lsh_per_s']:,.0f} | | |")
    e2e = bench_end_to_end(docs)
    print(f"| end to end: `prepare_documents` (read JSONL, all stages, exact + MinHash, write shards, report) | "
          f"{e2e:,.0f} | | |")
    print(f"\n({f['kept']:,} of {args.docs:,} documents passed every filter.)\n")
    rows = bench_near_dup(corpus, args.originals, args.planted, cfg)
    print(f"Near duplicates: {args.originals:,} originals, then {args.planted} planted copies per level with "
          f"words substituted; threshold {cfg.minhash_threshold}, {cfg.minhash_perm} permutations, "
          f"char {cfg.minhash_ngram}-grams. Originals wrongly flagged: {rows[0]['false_originals']}.\n")
    print("| substituted words | recall | precision | target |")
    print("|---:|---:|---:|---|")
    for r in rows:
        target = "recall ≥ 0.9, precision ≥ 0.99" if r["substituted"] <= 0.05 else "—"
        print(f"| {r['substituted']:.0%} | {r['recall']:.3f} | {r['precision']:.3f} | {target} |")


if __name__ == "__main__":
    main()
