"""The vector store contract, run over both backends (the exact index and embedded Chroma), plus the filter language.

The same assertions hold for both, so anything written against `VectorStore` behaves the same on either;
Chroma's top-k is also checked against the exact index (at this size, with a wide HNSW search, it is exact).
"""

import json

import numpy as np
import pytest

from haina.core.errors import HainaError
from haina.rag import HNSW, open_store
from haina.rag.filters import compile_filter, normalize

BACKENDS = ["exact", pytest.param("chroma", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("chromadb"), reason="chromadb is not installed (extra 'rag')"))]
WIDE = HNSW(m=32, ef_construction=200, ef_search=200)  # a near-exhaustive graph search at this size

# Records for the filter tests: kinds mixed on purpose (int/float/bool/str, and missing fields).
DOCS = {
    "a": {"lang": "en", "year": 2020, "score": 0.5, "draft": True},
    "b": {"lang": "fr", "year": 2021, "score": 1.5},
    "c": {"lang": "en", "year": 2022.0, "draft": False},
    "d": {"year": 2023, "tag": "x"},
    "e": {},
}


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = open_store(request.param, tmp_path / "store")
    yield s
    s.close()


def vecs(n, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def fill(store, name="docs", metric="cosine"):
    store.create_collection(name, dim=8, metric=metric, hnsw=WIDE)
    ids = list(DOCS)
    store.upsert(name, ids, vecs(len(ids)), [f"text {i}" for i in ids], [DOCS[i] for i in ids])
    return name


def ids_of(records):
    return sorted(r.id for r in records)


# ---- collections -------------------------------------------------------------------------------------------


def test_create_list_get_drop(store):
    info = store.create_collection("alpha", dim=4, metric="l2", hnsw=HNSW(m=8, ef_construction=64, ef_search=32),
                                   metadata={"embedder": "tiny", "chunk": {"tokens": 128}})
    assert (info.name, info.dim, info.metric, info.count) == ("alpha", 4, "l2", 0)
    assert info.hnsw == HNSW(m=8, ef_construction=64, ef_search=32)  # for Chroma: read back from its configuration
    assert info.metadata == {"embedder": "tiny", "chunk": {"tokens": 128}}
    store.create_collection("beta", dim=3)
    assert [c.name for c in store.list_collections()] == ["alpha", "beta"]
    assert store.get_collection("beta").metric == "cosine" and store.get_collection("beta").hnsw == HNSW()
    assert store.create_collection("alpha", dim=4, metric="l2", exist_ok=True).hnsw.m == 8  # the existing one
    with pytest.raises(HainaError, match="already exists"):
        store.create_collection("alpha", dim=4, metric="l2")
    with pytest.raises(HainaError, match="dim 4 and metric l2, not dim 5"):
        store.create_collection("alpha", dim=5, metric="l2", exist_ok=True)
    store.set_collection_metadata("beta", {"bm25_only": True})
    assert store.get_collection("beta").metadata == {"bm25_only": True}
    store.drop_collection("alpha")
    assert [c.name for c in store.list_collections()] == ["beta"]
    with pytest.raises(HainaError, match=r"no collection 'alpha' .*it has beta"):
        store.get_collection("alpha")


def test_upsert_is_idempotent_and_replaces_whole_records(store):
    store.create_collection("col", dim=8)
    v = vecs(3)
    for _ in range(2):
        store.upsert("col", ["1", "2", "3"], v, ["one", "two", "three"], [{"k": 1, "old": "x"}, None, {"k": 3}])
    assert store.count("col") == 3
    store.upsert("col", ["1", "4"], vecs(2, seed=1), ["ONE", "four"], [{"k": 10}, {"k": 4}])
    got = {r.id: r for r in store.get("col", include_vectors=True)}
    assert sorted(got) == ["1", "2", "3", "4"]
    assert got["1"].text == "ONE" and got["1"].metadata == {"k": 10}  # 'old' is gone: a replace, not a merge
    np.testing.assert_allclose(got["1"].vector, vecs(2, seed=1)[0], rtol=1e-6)
    assert got["2"].metadata == {} and got["2"].text == "two"
    assert got["1"].vector.dtype == np.float32 and store.get("col", ["2"])[0].vector is None


def test_update_text_metadata_vector(store):
    store.create_collection("col", dim=8, hnsw=WIDE)
    v = vecs(4)
    store.upsert("col", list("abcd"), v, list("ABCD"), [{"n": i} for i in range(4)])
    store.update("col", ["a"], texts=["new text"])
    (a,) = store.get("col", ["a"], include_vectors=True)
    assert a.text == "new text" and a.metadata == {"n": 0}
    np.testing.assert_allclose(a.vector, v[0], rtol=1e-6)
    store.update("col", ["b", "c"], metadatas=[{"m": "x"}, None])
    got = {r.id: r for r in store.get("col", ["b", "c"])}
    assert got["b"].metadata == {"m": "x"} and got["c"].metadata == {} and got["b"].text == "B"
    store.update("col", ["d"], vectors=v[0] * 3)  # one vector is (1, dim); d now points where a does
    assert store.query("col", v[0], top_k=2)[0][1].id in {"a", "d"}
    assert {h.id for h in store.query("col", v[0], top_k=2)[0]} == {"a", "d"}
    assert store.get("col", ["d"])[0].text == "D"
    with pytest.raises(HainaError, match=r"update: no record 'zz' in collection 'col' \(upsert adds records\)"):
        store.update("col", ["a", "zz"], texts=["x", "y"])
    with pytest.raises(HainaError, match="needs vectors, texts or metadatas"):
        store.update("col", ["a"])
    assert store.get("col", ["a"])[0].text == "new text"  # the failed update changed nothing


def test_delete_by_ids_and_by_filter(store):
    name = fill(store)
    assert store.delete(name, ids=["a", "zz", "a"]) == 1
    assert store.delete(name, where={"lang": "en"}) == 1  # only c is left of the English ones
    assert store.delete(name, ids=["b", "d"], where={"year": {"$gte": 2023}}) == 1  # the intersection: d
    assert ids_of(store.get(name)) == ["b", "e"]
    assert store.delete(name, where={"lang": "de"}) == 0
    with pytest.raises(HainaError, match="needs ids or a filter"):
        store.delete(name)
    assert store.count(name) == 2


def test_get_order_limit_and_vectors(store):
    store.create_collection("col", dim=8)
    v = vecs(5)
    store.upsert("col", list("vwxyz"), v)
    assert [r.id for r in store.get("col", ["z", "nope", "v", "x"])] == ["z", "v", "x"]  # order given, unknown skipped
    assert [r.id for r in store.get("col", ["z", "v", "x"], limit=2)] == ["z", "v"]
    assert len(store.get("col", limit=3)) == 3 and store.get("col", limit=0) == []
    got = store.get("col", ["y"], include_vectors=True)[0]
    np.testing.assert_allclose(got.vector, v[3], rtol=1e-6)


FILTERS = [
    ({"lang": "en"}, "ac"),
    ({"lang": {"$eq": "fr"}}, "b"),
    ({"lang": {"$ne": "en"}}, "bde"),  # $ne also matches records without the field
    ({"year": 2022}, "c"),  # an int equals the float 2022.0
    ({"year": {"$gt": 2021}}, "cd"),
    ({"year": {"$gte": 2021}}, "bcd"),
    ({"year": {"$lt": 2021}}, "a"),
    ({"score": {"$lte": 1.5}}, "ab"),
    ({"lang": {"$in": ["fr", "de"]}}, "b"),
    ({"lang": {"$nin": ["fr"]}}, "acde"),
    ({"year": {"$in": [2020, 2022.0]}}, "ac"),  # ints and floats mixed: one number kind
    ({"draft": True}, "a"),
    ({"draft": {"$ne": True}}, "bcde"),
    ({"year": True}, ""),  # a boolean never equals a number
    ({"lang": {"$ne": 1}}, "abcde"),  # nor a string a number
    ({"lang": {"$gt": 0}}, ""),  # ranges only match numeric fields
    ({"$and": [{"lang": "en"}, {"year": {"$gt": 2020}}]}, "c"),
    ({"$or": [{"lang": "fr"}, {"tag": "x"}]}, "bd"),
    ({"lang": "en", "draft": False}, "c"),  # several fields: shorthand for $and
    ({"$or": [{"$and": [{"lang": "en"}, {"draft": True}]}, {"year": {"$gte": 2023}}]}, "ad"),
    ({"$and": [{"year": {"$gte": 2021}}]}, "bcd"),  # one term
]


@pytest.mark.parametrize("where, expected", FILTERS, ids=[json.dumps(f) for f, _ in FILTERS])
def test_every_filter_operator_on_get_and_query(store, where, expected):
    name = fill(store)
    assert ids_of(store.get(name, where=where)) == sorted(expected)
    hits = store.query(name, vecs(1, seed=9), top_k=10, where=where)[0]
    assert sorted(h.id for h in hits) == sorted(expected)


BAD_FILTERS = [
    ({"lang": {"$like": "e"}}, "unknown operator '\\$like'"),
    ({"year": {"$gt": "2020"}}, "takes a number"),
    ({"year": {"$gt": True}}, "takes a number"),
    ({"lang": {"$in": []}}, "non-empty list"),
    ({"lang": {"$in": "en"}}, "non-empty list"),
    ({"lang": {"$in": ["en", 1]}}, "mix"),
    ({"lang": None}, "string, number or boolean"),
    ({"lang": ["en"]}, "string, number or boolean"),
    ({"$and": {"lang": "en"}}, "non-empty list of filters"),
    ({"$or": []}, "non-empty list of filters"),
    ({"$not": {"lang": "en"}}, "not a metadata field or operator"),
    ({"lang": {"$eq": "en", "$ne": "fr"}}, "one operator per field"),
    (["lang"], "is a JSON object"),
]


@pytest.mark.parametrize("where, message", BAD_FILTERS, ids=[json.dumps(f) for f, _ in BAD_FILTERS])
def test_bad_filters_are_one_line_errors(where, message):
    with pytest.raises(HainaError, match=message) as e:
        normalize(where)
    assert "\n" not in str(e.value) and str(e.value).startswith("bad filter")


def test_filter_normal_form_is_chromas():
    assert normalize(None) is None and normalize({}) is None
    assert normalize({"a": 1, "b": {"$gt": 2}}) == {"$and": [{"a": 1}, {"b": {"$gt": 2}}]}
    assert normalize({"$or": [{"a": 1}]}) == {"a": 1}
    assert normalize({"a": {"$in": [1, 2.5]}}) == {"a": {"$in": [1.0, 2.5]}}
    assert compile_filter(normalize({"a": {"$nin": [1]}}))({}) and not compile_filter({"a": 1})({"a": True})


def test_a_filter_on_a_missing_field_names_the_fields(store):
    name = fill(store)
    for call in (lambda: store.get(name, where={"langg": "en"}), lambda: store.delete(name, where={"langg": "en"}),
                 lambda: store.query(name, vecs(1), where={"$or": [{"lang": "en"}, {"langg": "en"}]})):
        with pytest.raises(HainaError, match=r"filter field 'langg' is not a metadata field of collection 'docs' "
                                             r"\(its fields: draft, lang, score, tag, year\)"):
            call()
    # A field every holder of which was deleted is still known: the filter is valid and matches nothing.
    store.delete(name, ids=["d"])
    assert store.get(name, where={"tag": "x"}) == []


# ---- search ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_scores_and_distances_per_metric(store, metric):
    store.create_collection("mmm", dim=3, metric=metric)
    store.upsert("mmm", ["a", "b", "c"], np.array([[3, 4, 0], [1, 0, 0], [0, 0, 2]], dtype=np.float32))
    (hits,) = store.query("mmm", [1, 1, 0], top_k=3)
    got = {h.id: (h.score, h.distance) for h in hits}
    expected = {  # score higher is better; distance as Chroma reports it
        "cosine": {"a": 7 / 5 / 2**0.5, "b": 1 / 2**0.5, "c": 0.0},
        "ip": {"a": 7.0, "b": 1.0, "c": 0.0},
        "l2": {"a": -13.0, "b": -1.0, "c": -6.0},
    }[metric]
    for i, score in expected.items():
        assert got[i][0] == pytest.approx(score, abs=1e-5)
        assert got[i][1] == pytest.approx(-score if metric == "l2" else 1 - score, abs=1e-5)
    assert [h.id for h in hits] == sorted(expected, key=lambda i: -expected[i])
    assert [h.text for h in hits] == ["", "", ""] and hits[0].metadata == {}


@pytest.mark.skipif(not __import__("importlib").util.find_spec("chromadb"), reason="chromadb is not installed")
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_chroma_top_k_equals_the_exact_index(tmp_path, metric):
    x, q = vecs(400, dim=16, seed=1), vecs(20, dim=16, seed=2)
    meta = [{"even": i % 2 == 0} for i in range(len(x))]
    results = {}
    for backend in ("exact", "chroma"):
        with open_store(backend, tmp_path / backend) as s:
            s.create_collection("rrr", dim=16, metric=metric, hnsw=WIDE)
            s.upsert("rrr", [str(i) for i in range(len(x))], x, metadatas=meta)
            results[backend] = (s.query("rrr", q, top_k=10), s.query("rrr", q, top_k=5, where={"even": True}))
    for exact, approx in zip(results["exact"], results["chroma"]):
        for e, a in zip(exact, approx):
            assert [h.id for h in a] == [h.id for h in e]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in e], rtol=1e-4, atol=1e-4)


def test_query_shapes_and_small_collections(store):
    store.create_collection("qqq", dim=8)
    assert store.query("qqq", vecs(2), top_k=3) == [[], []]  # empty collection
    store.upsert("qqq", ["a", "b"], vecs(2))
    assert [len(h) for h in store.query("qqq", vecs(3), top_k=5)] == [2, 2, 2]  # top_k beyond the count
    assert store.query("qqq", np.zeros((0, 8)), top_k=1) == []
    with pytest.raises(HainaError, match="top_k must be a positive integer"):
        store.query("qqq", vecs(1), top_k=0)


# ---- persistence -------------------------------------------------------------------------------------------


def test_everything_survives_reopening(store, tmp_path):
    name = fill(store, metric="ip")
    store.update(name, ["a"], texts=["changed"])
    store.delete(name, ids=["e"])
    store.set_collection_metadata(name, {"embedder": "tiny"})
    before = store.query(name, vecs(3, seed=5), top_k=3)
    store.close()
    with open_store(store.backend, tmp_path / "store") as again:
        info = again.get_collection(name)
        assert (info.count, info.metric, info.hnsw, info.metadata) == (4, "ip", WIDE, {"embedder": "tiny"})
        assert again.get(name, ["a"])[0].text == "changed"
        assert again.get(name, ["b"])[0].metadata == DOCS["b"]
        assert [[h.id for h in q] for q in again.query(name, vecs(3, seed=5), top_k=3)] == [
            [h.id for h in q] for q in before]
        assert again.stats(name)["fields"] == ["draft", "lang", "score", "tag", "year"]


def test_stats(store):
    name = fill(store)
    st = store.stats(name)
    assert st["backend"] == store.backend and st["count"] == 5 and st["dim"] == 8 and st["metric"] == "cosine"
    assert st["hnsw"] == {"m": 32, "ef_construction": 200, "ef_search": 200}
    assert st["fields"] == ["draft", "lang", "score", "tag", "year"] and st["metadata"] == {}
    assert st["store_disk_bytes"] > 0 and (st["disk_bytes"] is None or st["disk_bytes"] >= 0)
    json.dumps(st)  # printable as it is by `haina rag stats --json`


def test_exact_index_folds_deltas_and_ignores_leftovers(tmp_path):
    from haina.rag.exact import MAX_DELTAS

    s = open_store("exact", tmp_path / "ex")
    s.create_collection("ccc", dim=4, metric="l2")
    for i in range(MAX_DELTAS + 6):  # many small writes: deltas, then one fold into a new snapshot
        s.upsert("ccc", [f"r{i}", "same"], np.full((2, 4), i, dtype=np.float32), metadatas=[{"i": i}, {"i": -i}])
    s.delete("ccc", ids=["r0"])
    manifest = json.loads((tmp_path / "ex" / "ccc" / "collection.json").read_text())
    assert manifest["base"] and len(manifest["deltas"]) < MAX_DELTAS
    (tmp_path / "ex" / "ccc" / "delta-9999.jsonl").write_text('{"id": "ghost", "text": "", "metadata": {}}\n')
    other = open_store("exact", tmp_path / "ex")  # a second process's view, reading from disk
    assert other.count("ccc") == MAX_DELTAS + 6 and other.get("ccc", ["same"])[0].metadata == {"i": -(MAX_DELTAS + 5)}
    assert other.get("ccc", ["ghost"]) == []  # a crash's leftover file, not named by the manifest, is not read
    other.upsert("ccc", ["new"], np.ones((1, 4)))
    assert s.count("ccc") == MAX_DELTAS + 7  # the first object sees the other's write
    assert s.query("ccc", np.full(4, 3.0), top_k=1)[0][0].id == "r3"


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(store):
    store.create_collection("col", dim=8)
    cases = [
        (lambda: store.create_collection("x1y", dim=8, metric="dot"), "unknown metric 'dot': use cosine, l2 or ip"),
        (lambda: store.create_collection("a/b", dim=8), "bad collection name"),
        (lambda: store.create_collection("abc", dim=0), "positive integer"),
        (lambda: store.upsert("col", ["a"], vecs(1, dim=4)), "dimension 4 for collection 'col' of dimension 8"),
        (lambda: store.query("col", vecs(1, dim=7)), "dimension 7 for collection 'col' of dimension 8"),
        (lambda: store.update("col", ["a"], vectors=vecs(1, dim=9)), "dimension 9"),
        (lambda: store.upsert("col", ["a", "b", "a"], vecs(3)), "id 'a' appears twice in one call"),
        (lambda: store.upsert("col", ["a", "b"], vecs(3)), "2 ids but 3 vectors"),
        (lambda: store.upsert("col", ["a"], np.full((1, 8), np.nan)), "NaN"),
        (lambda: store.upsert("col", ["a"], vecs(1), metadatas=[{"k": None}]), "metadata field 'k'"),
        (lambda: store.upsert("col", ["a"], vecs(1), metadatas=[{"k": [1]}]), "metadata field 'k'"),
        (lambda: store.upsert("col", ["a"], vecs(1), texts=[3]), "texts must be a list of 1 strings"),
        (lambda: store.upsert("col", "abc", vecs(3)), "ids must be a list"),
        (lambda: store.upsert("nope", ["a"], vecs(1)), "no collection 'nope'"),
        (lambda: store.query("nope", vecs(1)), "no collection 'nope'"),
        (lambda: store.delete("nope", ids=["a"]), "no collection 'nope'"),
        (lambda: store.drop_collection("nope"), "no collection 'nope'"),
        (lambda: store.stats("nope"), "no collection 'nope'"),
        (lambda: store.create_collection("col", dim=16, exist_ok=True), "exists with dim 8"),
        (lambda: store.get("col", where={"k": {"$regex": "x"}}), "unknown operator"),
        (lambda: store.get("col", where={"k": 1}), "filter field 'k'.*none: its records have no metadata"),
    ]
    for call, message in cases:
        with pytest.raises(HainaError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert store.count("col") == 0


def test_a_store_directory_of_the_other_kind_is_refused(tmp_path):
    pytest.importorskip("chromadb")
    with open_store("exact", tmp_path / "ex") as s:
        s.create_collection("col", dim=2)
    with open_store("chroma", tmp_path / "ch") as s:
        s.create_collection("col", dim=2)
    with pytest.raises(HainaError, match="holds an exact-index store; pass --backend exact"):
        open_store("chroma", tmp_path / "ex")
    with pytest.raises(HainaError, match="holds a Chroma store; pass --backend chroma"):
        open_store("exact", tmp_path / "ch")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for backend in ("chroma", "exact"):
        with pytest.raises(HainaError, match="is not a"):
            open_store(backend, tmp_path / "other").create_collection("col", dim=2)
    with pytest.raises(HainaError, match="unknown vector store backend 'faiss'"):
        open_store("faiss", tmp_path / "x")
    with pytest.raises(HainaError, match="has no server"):
        open_store("exact", tmp_path / "x", server="http://127.0.0.1:1")


@pytest.mark.skipif(not __import__("importlib").util.find_spec("chromadb"), reason="chromadb is not installed")
def test_chroma_batches_beyond_its_max_batch_size(tmp_path):
    with open_store("chroma", tmp_path / "ch") as s:
        s._batch = 7  # Chroma's own limit is thousands; a small one walks the same code paths quickly
        s.create_collection("bat", dim=4, metric="l2", hnsw=WIDE)
        x = vecs(30, dim=4)
        s.upsert("bat", [str(i) for i in range(30)], x, metadatas=[{"i": i} for i in range(30)])
        s.upsert("bat", [str(i) for i in range(30)], x, metadatas=[{"j": i} for i in range(30)])
        assert s.count("bat") == 30 and s.get("bat", ["29"])[0].metadata == {"j": 29}
        hits = s.query("bat", x, top_k=1)
        assert [h[0].id for h in hits] == [str(i) for i in range(30)]
        assert len(s.get("bat", [str(i) for i in range(30)])) == 30
        assert s.delete("bat", ids=[str(i) for i in range(25)] + ["nope"]) == 25 and s.count("bat") == 5
