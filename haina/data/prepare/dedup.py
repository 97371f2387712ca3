"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH).

Hashes and MinHash signatures are computed per document in the parallel workers; the decision is
one global, sequential pass in input order (`Deduplicator`), so the first occurrence is the one
kept, whatever the number of workers.

Shingles are character 4-grams of the lower-cased, whitespace-collapsed text. Why characters and
why 4: the default threshold is a Jaccard similarity of 0.8, and a copy with 5 % of its words
substituted must land well above it for LSH to find it. Each substituted word destroys every
shingle that overlaps it: with word n-grams that is n shingles per substitution, so word 5-grams
(datatrove's choice) put a 5 %-edited copy at J ≈ 0.65 and word 2-grams at J ≈ 0.83 — too close
to 0.8. Character n-grams lose only (word length + n − 1) of the ~(word length + 1) shingles a
word contributes, and short n loses fewer: char 4-grams keep J ≈ 0.89 at 5 % (≈ 0.95 at 2 %),
while unrelated English documents of 1 KB stay below J ≈ 0.2, far from 0.8, so precision does not
suffer. `benchmarks/data_pipeline.py` measures exactly this.

The signature is a vectorized numpy MinHash (datasketch's per-shingle Python hashing would cap
us near 500 docs/s); the index is datasketch's `MinHashLSH`, whose bands and rows it derives from
the threshold and the number of permutations.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, as the polynomial base over code points
_EMPTY = np.uint32(0xFFFFFFFF)


def dedup_key(text: str) -> str:
    """The text both hashes are computed on: lower-cased, whitespace runs collapsed."""
    return " ".join(text.lower().split())


def exact_hash(key: str) -> int:
    """A 64-bit content hash (BLAKE2b), stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(key: str, n: int) -> np.ndarray:
    """The set of 32-bit hashes of the character n-grams of `key` (uint64 array, unique)."""
    if not key:
        return np.zeros(0, dtype=np.uint64)
    cps = np.frombuffer(key.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(n, len(cps))
    m = len(cps) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the polynomial hash wraps modulo 2**64 on purpose
        for k in range(n):
            h = h * _POLY + cps[k:k + m]
        # splitmix64's finalizer spreads the bits, so the top 32 are a good hash of the n-gram.
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return np.unique(h >> np.uint64(32))


class MinHasher:
    """MinHash signatures with `num_perm` multiply-shift hash functions over 32-bit shingle hashes."""

    def __init__(self, num_perm: int = 128, ngram: int = 4, seed: int = 1):
        rng = np.random.default_rng(seed)
        # h_i(x) = (a_i * x + b_i mod 2**64) >> 32 with odd a_i: a universal family (Dietzfelbinger et al.)
        self.a = (rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm
        self.ngram = ngram

    def signature(self, key: str) -> np.ndarray:
        """The (num_perm,) uint32 signature of `key` (see `dedup_key`)."""
        x = shingle_hashes(key, self.ngram)
        if len(x) == 0:
            return np.full(self.num_perm, _EMPTY, dtype=np.uint32)
        with np.errstate(over="ignore"):
            v = (x[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
        return v.min(axis=0).astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


class Deduplicator:
    """The global, sequential dedup decision: feed documents in input order, get a verdict each.

    Memory grows with the number of kept documents: an entry per exact hash (~100 bytes), the
    signature (4 bytes a permutation) and datasketch's LSH entries (~100 bytes a band), about
    2 KB a document at 128 permutations, so ~1 million documents per 2 GB. Beyond that, this is
    the stage to shard by hash (or to move to an on-disk LSH such as datatrove's).
    """

    def __init__(self, *, exact: bool, minhash: bool, threshold: float = 0.8, num_perm: int = 128):
        self.exact = exact
        self.seen: dict[int, str] = {}
        self.lsh = None
        self.ids: dict[int, str] = {}
        if minhash:
            from datasketch import MinHashLSH

            # Bands and rows come from datasketch's optimizer for the threshold, weighted towards
            # recall; every candidate is then verified against the threshold with the signature's
            # Jaccard estimate, which removes the extra false positives that weighting lets in.
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.threshold = threshold
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)  # row i: the signature of LSH key i
        self.cluster_sizes: dict[str, int] = {}  # representative id -> documents in its cluster (itself included)
        self._n = 0

    @property
    def bands(self) -> tuple[int, int]:
        """(bands, rows) of the LSH index, or (0, 0) without MinHash."""
        return (self.lsh.b, self.lsh.r) if self.lsh is not None else (0, 0)

    def check(self, doc_id: str, ehash: int, sig: np.ndarray | None) -> tuple[str | None, str | None]:
        """(reason, representative id) for a duplicate, (None, None) for a document to keep."""
        if self.exact and ehash in self.seen:
            rep = self.seen[ehash]
            self.cluster_sizes[rep] = self.cluster_sizes.get(rep, 1) + 1
            return "exact_duplicate", rep
        m = None
        if self.lsh is not None and sig is not None:
            from datasketch import LeanMinHash

            # The scheme label only feeds datasketch's consistency checks; our values are 32-bit.
            m = LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")
            # Keys are insertion ordinals: among the verified candidates the earliest document wins.
            for key in sorted(self.lsh.query(m)):
                if jaccard_estimate(sig, self._sigs[key]) >= self.threshold:
                    rep = self.ids[key]
                    self.cluster_sizes[rep] = self.cluster_sizes.get(rep, 1) + 1
                    return "near_duplicate", rep
        if self.exact:
            self.seen[ehash] = doc_id
        if m is not None:
            self.lsh.insert(self._n, m, check_duplication=False)
            self.ids[self._n] = doc_id
            if self._n == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
            self._sigs[self._n] = sig
            self._n += 1
        return None, None
