"""Indexing: chunks diffed against the collection, only changes embedded, deletions, resuming, remembered settings."""

import json

import pytest
import torch

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.core.errors import HainaError
from haina.generate.embed import Embedder
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.rag import open_store
from haina.rag.bm25 import BM25Index
from haina.rag.index import BM25Side, file_key, index_documents
from haina.tokenizer.train import train_bpe

BACKENDS = ["exact", pytest.param("chroma", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("chromadb"), reason="chromadb is not installed (extra 'rag')"))]

# Three sections of a few words each: with a 60-token budget every section is one chunk, so an edit to one
# section changes exactly one chunk.
GUIDE = """# Install

Install the package with pip from the local wheel file.

# Configure

Write the settings into a YAML file beside the project.

# Run

Start the service and watch the logs for errors.
"""
NOTES = "Plain notes about cooking pasta in salted water.\n\nBoil it for nine minutes, then drain.\n"
RECORDS = [{"id": "fox", "text": "The quick brown fox jumps over the lazy dog."},
           {"id": "sky", "text": "Telescopes show the rings of Saturn on a clear night."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny haina model (random weights): enough to embed deterministically."""
    root = tmp_path_factory.mktemp("embedder")
    tok = train_bpe([GUIDE + NOTES + " ".join(r["text"] for r in RECORDS)] * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=1, n_embd=32, n_head=2)
    save_model(root / "m", Transformer(cfg), tok)
    return root / "m"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ids are paths relative to the working directory
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(GUIDE)
    (docs / "notes.txt").write_text(NOTES)
    (docs / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return docs


@pytest.fixture
def opened(tmp_path):
    """open_store(backend) on an absolute path (Chroma caches clients by path), closed after the test."""
    stores = []

    def make(backend="exact"):
        stores.append(open_store(backend, tmp_path / "store"))
        return stores[-1]

    yield make
    for s in stores:
        s.close()


class Spy:
    """Counts the texts an embedder is asked to embed; can fail on the n-th call (an interruption)."""

    def __init__(self, embedder, fail_on: int | None = None):
        self.inner, self.fail_on, self.calls, self.texts = embedder, fail_on, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, texts, batch_size=32):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.texts += list(texts)
        return self.inner.embed(texts, batch_size)


def counts_of(c):
    return c.added, c.updated, c.unchanged, c.deleted


def all_ids(store, name="docs"):
    return sorted(r.id for r in store.get(name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reindex_after_changing_one_file_updates_only_its_chunks(backend, corpus, ckpt, opened):
    store = opened(backend)
    embedder = Spy(Embedder.load(str(ckpt), device="cpu"))
    first = index_documents(store, "docs", ["docs"], embedder=embedder, chunk_tokens=60, overlap=4)
    assert counts_of(first) == (6, 0, 0, 0)  # 3 sections + 1 note + 2 records
    assert first.documents == 4 and first.mode == "hybrid"
    assert all_ids(store) == ["docs/guide.md:0", "docs/guide.md:1", "docs/guide.md:2", "docs/notes.txt:0",
                              "fox:0", "sky:0"]
    assert len(embedder.texts) == 6

    again = index_documents(store, "docs", ["docs"], embedder=embedder)  # nothing changed: nothing embedded
    assert counts_of(again) == (0, 0, 6, 0) and len(embedder.texts) == 6

    (corpus / "guide.md").write_text(GUIDE.replace("YAML file", "TOML file"))
    edited = index_documents(store, "docs", ["docs"], embedder=embedder)
    assert counts_of(edited) == (0, 1, 5, 0)
    assert embedder.texts[6:] == ["# Configure\n\nWrite the settings into a TOML file beside the project."]
    assert edited.sources["docs/guide.md"] == {"added": 0, "updated": 1, "unchanged": 2, "deleted": 0}
    assert edited.sources["docs/notes.txt"] == {"added": 0, "updated": 0, "unchanged": 1, "deleted": 0}
    assert "TOML" in store.get("docs", ids=["docs/guide.md:1"])[0].text
    assert store.count("docs") == 6


def test_metadata_of_chunks(corpus, opened):
    store = opened()
    index_documents(store, "docs", ["docs"], chunk_tokens=60, overlap=4)
    meta = store.get("docs", ids=["docs/guide.md:1"])[0].metadata
    assert {k: meta[k] for k in ("source", "file", "doc", "section", "chunk")} == \
        {"source": "docs/guide.md", "file": "docs/guide.md", "doc": "docs/guide.md", "section": "Configure", "chunk": 1}
    assert GUIDE[meta["start"]:meta["end"]] == store.get("docs", ids=["docs/guide.md:1"])[0].text
    assert store.get("docs", ids=["sky:0"])[0].metadata["file"] == "docs/records.jsonl"


def test_an_edit_that_only_moves_text_embeds_nothing(corpus, ckpt, opened):
    store = opened()
    embedder = Spy(Embedder.load(str(ckpt), device="cpu"))
    index_documents(store, "docs", ["docs"], embedder=embedder, chunk_tokens=60, overlap=4)
    (corpus / "guide.md").write_text("\n\n" + GUIDE)  # offsets shift, texts do not
    moved = index_documents(store, "docs", ["docs"], embedder=embedder)
    assert counts_of(moved) == (0, 0, 6, 0) and len(embedder.texts) == 6
    record = store.get("docs", ids=["docs/guide.md:2"])[0]
    assert ("\n\n" + GUIDE)[record.metadata["start"]:record.metadata["end"]] == record.text  # offsets rewritten


@pytest.mark.parametrize("backend", BACKENDS)
def test_emptying_or_removing_a_file_deletes_its_chunks(backend, corpus, opened):
    store = opened(backend)
    index_documents(store, "docs", ["docs"], chunk_tokens=60, overlap=4)
    (corpus / "guide.md").write_text("")
    emptied = index_documents(store, "docs", ["docs"])
    assert counts_of(emptied) == (0, 0, 3, 3)
    assert emptied.sources["docs/guide.md"]["deleted"] == 3
    assert all_ids(store) == ["docs/notes.txt:0", "fox:0", "sky:0"]
    (corpus / "notes.txt").unlink()  # gone from an input directory: its chunks go too
    assert counts_of(index_documents(store, "docs", ["docs"])) == (0, 0, 2, 1)
    (corpus / "records.jsonl").write_text(json.dumps(RECORDS[1]) + "\n")  # one record left the file
    assert counts_of(index_documents(store, "docs", ["docs"])) == (0, 0, 1, 1)
    assert all_ids(store) == ["sky:0"]
    # The BM25 side followed every change.
    assert sorted(BM25Index.load(BM25Side(store, "docs").path).ids) == ["sky:0"]


def test_indexing_one_file_leaves_the_others_alone(corpus, opened):
    store = opened()
    index_documents(store, "docs", ["docs"], chunk_tokens=60, overlap=4)
    only = index_documents(store, "docs", ["docs/notes.txt"])
    assert counts_of(only) == (0, 0, 1, 0) and store.count("docs") == 6


def test_an_interrupted_run_resumes_without_duplicates(corpus, ckpt, opened):
    store = opened()
    embedder = Spy(Embedder.load(str(ckpt), device="cpu"), fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        index_documents(store, "docs", ["docs"], embedder=embedder, chunk_tokens=60, overlap=4, batch_size=2)
    assert store.count("docs") == 2  # the first batch is in
    side = BM25Side(store, "docs")
    assert side.stale  # the BM25 index is marked for a rebuild
    first = set(all_ids(store))

    embedder = Spy(Embedder.load(str(ckpt), device="cpu"))
    resumed = index_documents(store, "docs", ["docs"], embedder=embedder, batch_size=2)
    assert counts_of(resumed) == (4, 0, 2, 0)
    assert len(embedder.texts) == 4  # what the first run finished is not embedded again
    ids = all_ids(store)
    assert len(ids) == len(set(ids)) == 6 and first <= set(ids)
    assert not side.stale and sorted(BM25Index.load(side.path).ids) == ids


def test_the_collection_remembers_its_embedder_and_chunking(corpus, ckpt, tmp_path, opened):
    store = opened()
    index_documents(store, "docs", ["docs"], embedder=str(ckpt), chunk_tokens=60, overlap=4, device="cpu")
    settings = store.get_collection("docs").metadata["rag"]
    assert settings["embedder"]["dim"] == 32 and settings["embedder"]["pooling"] == "last"
    assert settings["chunk"] == {"max_tokens": 60, "overlap": 4, "counter": "embedder"}
    (corpus / "notes.txt").write_text(NOTES.replace("nine", "ten"))
    again = index_documents(store, "docs", ["docs"], device="cpu")  # no embedder given: the remembered one
    assert again.mode == "hybrid" and counts_of(again) == (0, 1, 5, 0)

    with pytest.raises(HainaError, match="was chunked with 60 tokens .* drop it first"):
        index_documents(store, "docs", ["docs"], chunk_tokens=30)
    with pytest.raises(HainaError, match="was indexed with embedder .* drop it first"):
        index_documents(store, "docs", ["docs"], embedder=Embedder.load(str(ckpt), device="cpu", pooling="mean"))
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_model(other, Transformer(ModelConfig.from_name("tiny", vocab_size=300, block_size=64, n_layer=1, n_embd=16,
                                                        n_head=2)), Embedder.load(str(ckpt)).backend.tokenizer)
    with pytest.raises(HainaError, match="dimension"):
        index_documents(store, "docs", ["docs"], embedder=str(other))

    index_documents(store, "plain", ["docs"])
    with pytest.raises(HainaError, match="'plain' is BM25-only"):
        index_documents(store, "plain", ["docs"], embedder=str(ckpt))


def test_a_created_collection_must_match_the_embedder(corpus, ckpt, opened):
    store = opened()
    store.create_collection("vec", dim=8)
    with pytest.raises(HainaError, match="dimension 8 but the embedder gives 32"):
        index_documents(store, "vec", ["docs"], embedder=str(ckpt))
    with pytest.raises(HainaError, match="8-dimensional vectors and names no embedder"):
        index_documents(store, "vec", ["docs"])
    store.create_collection("vec32", dim=32)  # made by hand, adopted by the first index run
    assert index_documents(store, "vec32", ["docs"], embedder=str(ckpt)).added == 6
    assert store.get_collection("vec32").metadata["rag"]["embedder"]["dim"] == 32


def test_an_empty_corpus_is_one_line_and_creates_nothing(corpus, tmp_path, opened):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n\n")
    store = opened()
    with pytest.raises(HainaError, match="no text to index"):
        index_documents(store, "docs", ["empty"])
    assert store.list_collections() == []
    with pytest.raises(HainaError, match="input not found"):
        index_documents(store, "docs", ["missing/*.md"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(HainaError, match=r"bad.jsonl:2: invalid JSON"):
        index_documents(store, "docs", ["bad.jsonl"])
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    with pytest.raises(HainaError, match="cannot index picture.png"):
        index_documents(store, "docs", ["picture.png"])
    assert store.list_collections() == []


def test_a_prepare_output_is_read_by_its_splits(corpus, tmp_path, opened):
    from haina.data.prepare.command import prepare

    words = "the river runs past old stone walls where green hills rise under blue skies and birds sing"
    (tmp_path / "raw").mkdir()
    for i in range(6):
        (tmp_path / "raw" / f"d{i}.txt").write_text(f"Document {i}: {words} number {i}.\n")
    prepare(["raw"], "prepared", filters="none", dedup="none", val_fraction=0.34, workers=1)
    counts = index_documents(opened(), "prep", ["prepared"])
    assert counts.documents == 6 and counts.added == 6
    assert all("/rejects/" not in f and not f.endswith(".json") for f in counts.sources)
    store = opened()
    sources = {r.metadata["source"] for r in store.get("prep")}
    assert sources == {f"raw/d{i}.txt" for i in range(6)}  # the provenance prepare kept, not the shard


def test_file_keys_are_relative_inside_the_working_directory(corpus, tmp_path):
    assert file_key(corpus / "guide.md") == "docs/guide.md"
    assert file_key("/etc/hosts") == "/etc/hosts"
