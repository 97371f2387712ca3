"""A BM25 keyword index over chunk texts (`bm25s`), by chunk id, saved without pickle.

Texts are tokenized the same way at indexing and at query time: lower-cased words of two or more letters or
digits (`\\w\\w+`, as bm25s does), without English stopwords, and stemmed with the Snowball English stemmer when
PyStemmer is installed. Whether an index stems is decided when it is created and saved with it, so a query is
always tokenized as its index was, wherever it is loaded.

bm25s indexes are static (a sparse matrix of precomputed scores): adding or removing documents marks the
index stale, and the next query or save rebuilds it once from the token ids kept per document. Batched
changes therefore cost one rebuild, and no text is tokenized twice. The matrix is built with numpy in one
pass (`_retriever_class`) rather than bm25s's loop over documents: a rebuild of 100 k chunks took 0.6-2.7 s
of CPU here against bm25s's 2.8-3.3 s, without its list of Python ints per token. A collection edited
between every query would still want an incremental keyword index.

On disk (`save`, `load`), a directory written beside and swapped in (`haina.core.io.atomic_dir`):

    bm25.json       {"format": "haina-bm25/1", "k1", "b", "stemmer", "stopwords", "ids": [...]}
    tokens.npz      every document's token ids (flat, offsets), to rebuild after later edits
    scores/         bm25s's own files: JSON and .npy arrays, read with allow_pickle=False

Scores are BM25 ("lucene" variant); documents that share no term with the query are not hits. Ties are
broken by id, so results do not depend on insertion order.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np

from haina.core.errors import HainaError
from haina.core.io import atomic_dir, read_json, write_json

FORMAT = "haina-bm25/1"
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
EXTRA = "pip install 'haina[rag]'"


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise HainaError(f"BM25 retrieval needs the bm25s package; install it with {EXTRA}") from None
    return bm25s


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _retriever_class():
    """bm25s.BM25 with its score matrix built by numpy at once instead of a Python loop per document.

    `build_index_from_ids` is the hook bm25s documents for building the index another way; this one computes
    the same Lucene-variant BM25 scores (`tests/test_rag_bm25.py` compares them with bm25s's own) from arrays,
    which keeps rebuilding on every batch of edits affordable.
    """
    bm25s = _bm25s()

    class Retriever(bm25s.BM25):
        def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False):
            if self.method != "lucene" or self.idf_method != "lucene":
                return super().build_index_from_ids(unique_token_ids, corpus_token_ids, show_progress, leave_progress)
            n_docs, n_vocab = len(corpus_token_ids), len(unique_token_ids)
            lengths = np.fromiter((len(d) for d in corpus_token_ids), dtype=np.int64, count=n_docs)
            flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in corpus_token_ids])
            # (document, term) pairs and their counts, sorted by document then term
            pairs, tf = np.unique(np.repeat(np.arange(n_docs), lengths) * n_vocab + flat, return_counts=True)
            doc, term = pairs // n_vocab, pairs % n_vocab
            df = np.bincount(term, minlength=n_vocab)
            idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(self.dtype)
            norm = self.k1 * ((1 - self.b) + self.b * lengths[doc] / lengths.mean())
            scores = idf[term] * (tf / (norm + tf)).astype(self.dtype)
            by_term = np.argsort(term, kind="stable")  # column-major (CSC): one run of documents per term
            self.nonoccurrence_array = None
            return {"data": scores[by_term].astype(self.dtype), "indices": doc[by_term].astype(self.int_dtype),
                    "indptr": np.concatenate([[0], np.cumsum(df)]).astype(np.int64), "num_docs": n_docs}

    return Retriever


class BM25Index:
    """Chunk ids and their texts' BM25 statistics; `query` ranks ids for a text.

    Args:
        stem: stem words (Snowball English); None: when PyStemmer is installed. Fixed for the index's life.
        k1: term-frequency saturation.
        b: document-length normalization.
    """

    def __init__(self, *, stem: bool | None = None, k1: float = 1.5, b: float = 0.75):
        _bm25s()
        has_stemmer = importlib.util.find_spec("Stemmer") is not None
        if stem and not has_stemmer:
            raise HainaError("stemming needs PyStemmer; install it with `pip install PyStemmer`, or index without "
                             "stemming")
        self.stemmer = "english" if (has_stemmer if stem is None else stem) else None
        self.k1, self.b = float(k1), float(b)
        self._stop = _stopwords()
        self._stem = None
        if self.stemmer:
            import Stemmer

            self._stem = Stemmer.Stemmer(self.stemmer).stemWords
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._docs: list[np.ndarray] = []  # token ids (int32) per document, in `_words`
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        self._retriever = None
        self._stale = False
        self._removed = False  # documents went away since the last rebuild: the vocabulary has unused words

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: str) -> list[str]:
        """The terms of `text` as this index sees them."""
        words = [w for w in _TOKEN.findall(text.lower()) if w not in self._stop]
        return self._stem(words) if self._stem is not None else words

    def _ids_of(self, text: str, grow: bool) -> np.ndarray:
        out = []
        for w in self.tokenize(text):
            i = self._vocab.get(w)
            if i is None and grow:
                i = self._vocab[w] = len(self._words)
                self._words.append(w)
            if i is not None:
                out.append(i)
        return np.asarray(out, dtype=np.int32)

    # ----------------------------------------------------------------- edits
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._pos

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, items: Iterable[tuple[str, str]]) -> None:
        """Add (id, text) pairs; an id already indexed gets its new text (upsert)."""
        for chunk_id, text in items:
            tokens = self._ids_of(text, grow=True)
            at = self._pos.get(chunk_id)
            if at is None:
                self._pos[chunk_id] = len(self._ids)
                self._ids.append(chunk_id)
                self._docs.append(tokens)
            else:
                self._docs[at] = tokens
                self._removed = True
            self._stale = True

    def remove(self, ids: Iterable[str]) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were removed."""
        gone = {i for i in ids if i in self._pos}
        if gone:
            keep = [k for k, i in enumerate(self._ids) if i not in gone]
            self._ids = [self._ids[k] for k in keep]
            self._docs = [self._docs[k] for k in keep]
            self._pos = {i: k for k, i in enumerate(self._ids)}
            self._stale = self._removed = True
        return len(gone)

    def _rebuild(self) -> None:
        if not self._stale:
            return
        if self._removed and self._docs:
            # Drop the words no document uses any more, so that the vocabulary is exactly the documents' terms.
            used = np.zeros(len(self._words), dtype=bool)
            for d in self._docs:
                used[d] = True
            remap = (np.cumsum(used) - 1).astype(np.int32)
            self._words = [w for w, u in zip(self._words, used, strict=True) if u]
            self._vocab = {w: i for i, w in enumerate(self._words)}
            self._docs = [remap[d] for d in self._docs]
        elif not self._docs:
            self._words, self._vocab = [], {}
        self._retriever = None
        if self._words:  # documents with no term at all (only stopwords) leave nothing to score
            retriever = _retriever_class()(k1=self.k1, b=self.b, method="lucene")
            retriever.index((self._docs, dict(self._vocab)), create_empty_token=False, show_progress=False)
            self._retriever = retriever
        self._stale = self._removed = False

    # ----------------------------------------------------------------- query
    def query(self, text: str, top_k: int = 10, allowed: Collection[str] | None = None) -> list[tuple[str, float]]:
        """The best `top_k` (id, score) for `text`, best first; only documents sharing a term with it.

        Args:
            text: the query.
            top_k: how many hits at most.
            allowed: the ids a metadata filter let through (the caller's where-clause); None: all.
        """
        if top_k < 1:
            raise HainaError(f"top_k must be at least 1, got {top_k}")
        self._rebuild()
        terms = self._ids_of(text, grow=False)
        if self._retriever is None or not len(terms):
            return []
        scores = self._retriever.get_scores_from_ids(terms.tolist())
        rows = np.arange(len(self._ids)) if allowed is None else \
            np.fromiter((self._pos[i] for i in allowed if i in self._pos), dtype=np.int64)
        rows = rows[scores[rows] > 0]
        if len(rows) > top_k:  # every row tied with the k-th best stays in, for the tie-break by id below
            kth = np.partition(scores[rows], -top_k)[-top_k]
            rows = rows[scores[rows] >= kth]
        best = sorted(rows.tolist(), key=lambda r: (-float(scores[r]), self._ids[r]))[:top_k]
        return [(self._ids[r], float(scores[r])) for r in best]

    # ----------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        """Write the index into `directory` (replaced as a whole; see the module docstring)."""
        self._rebuild()
        lengths = np.fromiter((len(d) for d in self._docs), dtype=np.int64, count=len(self._docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(self._docs).astype(np.int32) if self._docs else np.zeros(0, dtype=np.int32)
        with atomic_dir(directory) as tmp:
            write_json(tmp / "bm25.json", {"format": FORMAT, "k1": self.k1, "b": self.b, "stemmer": self.stemmer,
                                           "stopwords": "en", "ids": self._ids, "words": self._words})
            with open(tmp / "tokens.npz", "wb") as f:
                np.savez(f, flat=flat, offsets=offsets)
            if self._retriever is not None:
                self._retriever.save(tmp / "scores", allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        """The index saved in `directory`; its arrays are read with allow_pickle=False.

        Raises:
            HainaError: no index there, or a damaged one, in one line.
        """
        d = Path(directory)
        hint = "rebuild it with `haina rag index`"
        if not (d / "bm25.json").is_file():
            raise HainaError(f"no BM25 index in {d} (bm25.json missing); {hint}")
        meta = read_json(d / "bm25.json", hint, expect=dict)
        if meta.get("format") != FORMAT:
            raise HainaError(f"{d / 'bm25.json'} is not a haina BM25 index (format {meta.get('format')!r})")
        try:
            index = cls(stem=meta["stemmer"] is not None, k1=meta["k1"], b=meta["b"])
            ids, words = [str(i) for i in meta["ids"]], [str(w) for w in meta["words"]]
            with np.load(d / "tokens.npz", allow_pickle=False) as z:
                flat, offsets = z["flat"].astype(np.int32), z["offsets"].astype(np.int64)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise HainaError(f"the BM25 index in {d} is damaged ({e}); {hint}") from None
        if len(offsets) != len(ids) + 1 or (len(flat) and (flat.min() < 0 or flat.max() >= len(words))) or \
                offsets[-1] != len(flat) or len(set(ids)) != len(ids):
            raise HainaError(f"the BM25 index in {d} is damaged (ids, words and tokens disagree); {hint}")
        index._ids, index._words = ids, words
        index._pos = {i: k for k, i in enumerate(ids)}
        index._vocab = {w: k for k, w in enumerate(words)}
        index._docs = [flat[offsets[k]:offsets[k + 1]] for k in range(len(ids))]
        if words:
            try:
                index._retriever = _bm25s().BM25.load(d / "scores", allow_pickle=False, show_progress=False)
            except (OSError, ValueError, KeyError) as e:
                raise HainaError(f"the BM25 scores in {d / 'scores'} are damaged ({e}); {hint}") from None
            if index._retriever.scores["num_docs"] != len(ids) or index._retriever.vocab_dict != index._vocab:
                raise HainaError(f"the BM25 scores in {d / 'scores'} do not match bm25.json; {hint}")
        return index


__all__ = ["BM25Index"]
