"""BM25 over chunk texts (bm25s): ranking, edits, a filter hook, files without pickle; and rank fusion."""

import json

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.core.errors import HainaError
from haina.rag.bm25 import BM25Index
from haina.rag.fuse import reciprocal_rank_fusion

CORPUS = {
    "py:0": "The for statement iterates over the items of any sequence, such as a list or a string.",
    "py:1": "The while statement repeats a suite while an expression is true.",
    "py:2": "Dictionaries map hashable keys to values; a dict lookup by key is fast.",
    "py:3": "Exceptions are raised with the raise statement and handled by try and except clauses.",
    "py:4": "A list is a mutable sequence; append adds an item at the end of the list.",
    "cook:0": "Whisk the eggs, add flour and bake the cake for forty minutes.",
}


@pytest.fixture
def index():
    ix = BM25Index(stem=False)
    ix.add(CORPUS.items())
    return ix


def test_ranking_makes_sense(index):
    hits = index.query("how do I handle exceptions with try", top_k=3)
    assert hits[0][0] == "py:3" and len(hits) == 1  # only documents sharing a term are hits
    hits = index.query("append an item to a list", top_k=3)
    assert hits[0][0] == "py:4" and {h for h, _ in hits} <= {"py:0", "py:4"}
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True) and hits[0][1] > 0
    assert index.query("bake a cake")[0][0] == "cook:0"
    assert index.query("the a of") == []  # stopwords only
    assert index.query("zeppelin") == []  # unknown words
    assert index.tokenize("The Statement, THE statements!") == ["statement", "statements"]
    with pytest.raises(HainaError, match="top_k"):
        index.query("list", top_k=0)


def test_filter_hook_limits_the_candidates(index):
    everything = index.query("statement", top_k=10)
    assert {h for h, _ in everything} == {"py:0", "py:1", "py:3"}
    # The allowed ids (a metadata filter's result; unknown ones ignored) rank as they do among all.
    allowed = {"py:1", "py:3", "py:4", "nope"}
    assert index.query("statement", top_k=10, allowed=allowed) == [h for h in everything if h[0] in allowed]
    assert index.query("statement", top_k=1, allowed={"py:0"}) == [h for h in everything if h[0] == "py:0"]
    assert index.query("statement", allowed=set()) == []


def test_edits_rebuild_once_and_upsert(index):
    assert len(index) == 6 and "py:2" in index
    index.add([("py:5", "Generators yield values lazily; a generator expression looks like a list comprehension.")])
    assert index.query("generator yield")[0][0] == "py:5"
    index.add([("py:5", "Lambda expressions create anonymous functions.")])  # same id: replaced
    assert index.query("generator yield") == [] and index.query("anonymous lambda")[0][0] == "py:5"
    assert index.remove(["py:5", "cook:0", "missing"]) == 2
    assert len(index) == 5 and index.query("bake cake") == []
    assert "flour" not in index._vocab  # the vocabulary drops words no document uses any more
    index.remove(index.ids)
    assert len(index) == 0 and index.query("list") == []


def test_scores_equal_bm25s_own_index(index):
    import bm25s

    from haina.rag.bm25 import _retriever_class

    rng = np.random.default_rng(0)
    docs = [rng.zipf(1.5, size=rng.integers(0, 40)).clip(max=199).astype(np.int32) for _ in range(300)]
    vocab = {f"t{i}": i for i in range(200)}
    ours = _retriever_class()(method="lucene")
    ours.index((docs, vocab), create_empty_token=False, show_progress=False)
    stock = bm25s.BM25(method="lucene")
    stock.index(([d.tolist() for d in docs], vocab), create_empty_token=False, show_progress=False)
    assert ours.scores["num_docs"] == stock.scores["num_docs"] == 300
    for key in ("indptr", "indices"):
        np.testing.assert_array_equal(ours.scores[key], stock.scores[key])
        assert ours.scores[key].dtype == stock.scores[key].dtype
    np.testing.assert_allclose(ours.scores["data"], stock.scores["data"], rtol=1e-6)
    for q in ([1], [0, 3, 17], [150, 199, 2]):
        np.testing.assert_allclose(ours.get_scores_from_ids(q), stock.get_scores_from_ids(q), rtol=1e-6)


def test_ties_break_by_id_not_insertion_order():
    a, b = BM25Index(stem=False), BM25Index(stem=False)
    docs = [("d2", "red apple"), ("d1", "red apple"), ("d3", "green pear")]
    a.add(docs)
    b.add(reversed(docs))
    assert a.query("apple") == b.query("apple") and [h for h, _ in a.query("apple")] == ["d1", "d2"]
    assert [h for h, _ in a.query("apple", top_k=1)] == ["d1"]


def test_persistence_round_trip_without_pickle(index, tmp_path):
    index.save(tmp_path / "bm25")
    files = sorted(p.relative_to(tmp_path / "bm25").as_posix() for p in (tmp_path / "bm25").rglob("*") if p.is_file())
    assert "bm25.json" in files and "tokens.npz" in files and all(not f.endswith((".pkl", ".pickle")) for f in files)
    for f in (tmp_path / "bm25").rglob("*.np[yz]"):  # every array loads with pickle refused
        np.load(f, allow_pickle=False)
    loaded = BM25Index.load(tmp_path / "bm25")
    for q in ("statement", "list item", "bake", "dict key lookup"):
        assert loaded.query(q, top_k=4) == index.query(q, top_k=4)
    assert loaded.ids == index.ids and loaded.stemmer == index.stemmer
    # A loaded index can be edited and saved again.
    loaded.remove(["py:0"])
    loaded.add([("py:9", "Sets hold unique hashable items.")])
    loaded.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert again.query("unique sets")[0][0] == "py:9" and "py:0" not in again

    empty = BM25Index(stem=False)
    empty.save(tmp_path / "empty")
    assert len(BM25Index.load(tmp_path / "empty")) == 0


def test_damaged_or_missing_index_is_one_line(index, tmp_path):
    with pytest.raises(HainaError, match="no BM25 index"):
        BM25Index.load(tmp_path / "none")
    index.save(tmp_path / "bm25")
    meta = json.loads((tmp_path / "bm25" / "bm25.json").read_text())
    meta["ids"] = meta["ids"][:-1]
    (tmp_path / "bm25" / "bm25.json").write_text(json.dumps(meta))
    with pytest.raises(HainaError, match="damaged"):
        BM25Index.load(tmp_path / "bm25")
    (tmp_path / "bm25" / "bm25.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(HainaError, match="not a haina BM25 index"):
        BM25Index.load(tmp_path / "bm25")


def test_stemming_needs_pystemmer():
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        with pytest.raises(HainaError, match="PyStemmer"):
            BM25Index(stem=True)
        assert BM25Index().stemmer is None
    else:
        assert BM25Index().stemmer == "english"
        assert BM25Index().tokenize("running runs") == ["run", "run"]


# ---------------------------------------------------------------------------------------- rank fusion
def test_rrf_scores_and_order():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    score = dict(fused)
    assert score["a"] == pytest.approx(1 / 61 + 1 / 62) and score["d"] == pytest.approx(1 / 63)
    assert [d for d, _ in fused] == ["a", "c", "b", "d"]
    # (id, score) pairs are accepted and their scores ignored; k changes the weights of the ranks.
    assert reciprocal_rank_fusion([[("a", 9.0), ("b", 1.0)], [("b", 0.9)]], k=1)[0] == ("b", 1 / 2 + 1 / 3)
    assert reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=[2.0, 1.0])[0][0] == "a"
    assert reciprocal_rank_fusion([["a", "b", "c"]], top_k=2) == [("a", 1 / 61), ("b", 1 / 62)]
    assert reciprocal_rank_fusion([]) == [] and reciprocal_rank_fusion([[], []]) == []


def test_rrf_ties_are_deterministic():
    # b and a have the same ranks in mirrored lists: bit-identical scores, so the id decides.
    assert [d for d, _ in reciprocal_rank_fusion([["b", "x", "a"], ["a", "y", "b"]])][:2] == ["a", "b"]
    three = [["p", "q", "r"], ["q", "r", "p"], ["r", "p", "q"]]  # every document at ranks 1, 2 and 3
    for perm in (three, three[::-1], three[1:] + three[:1]):
        fused = reciprocal_rank_fusion(perm)
        assert [d for d, _ in fused] == ["p", "q", "r"] and len({s for _, s in fused}) == 1
    # Equal scores (k=0: 1/2 + 1/2 = 1/1), different best ranks: the ones ranked first somewhere come first.
    assert reciprocal_rank_fusion([["b", "a"], ["x", "a"]], k=0) == [("b", 1.0), ("x", 1.0), ("a", 1.0)]
    assert reciprocal_rank_fusion([["a", "a", "b"]]) == [("a", 1 / 61), ("b", 1 / 63)]  # repeats count once
    with pytest.raises(HainaError, match="one per ranking"):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 2.0])
