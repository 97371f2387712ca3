"""`rag qa` and `rag eval`: question sets with known answer chunks, retrieval metrics, the eval report."""

import json
import math

import pytest
import torch

pytest.importorskip("bm25s", reason="bm25s is not installed (pip install 'haina[rag]')")

from haina.core.io import read_json
from haina.eval.compare import compare_table, read_report
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.rag import open_store
from haina.rag.evaluate import first_relevant_rank, is_relevant, rag_eval_command, retrieval_metrics
from haina.rag.index import index_documents
from haina.rag.qa import build_qa, chunk_questions, qa_command, read_qa
from haina.rag.store import Hit, Record
from haina.tokenizer.train import train_bpe

# A pydoc-style module per record (the layout of haina.data.stdlib_corpus), and a Markdown guide.
MODULES = {
    "kitchen": ("Tools for the kitchen: pots, ovens and timers.", [
        ("kitchen.boil(water, minutes=9)", "Boil the water in a pot for the given number of minutes."),
        ("class kitchen.Oven(object)", "An oven that bakes bread at a fixed temperature."),
        ("kitchen.Oven.preheat(self, degrees)", "Heat the oven up before the bread goes in.")]),
    "garden": ("Helpers for a vegetable garden.", [
        ("garden.water(bed, litres)", "Water one bed of the garden with this many litres."),
        ("garden.harvest(bed)", "Pick every ripe vegetable of a bed and return them.")]),
    "music": ("Scales, chords and tempo.", [
        ("music.tempo(bpm)", "Return the length of one beat in seconds at this tempo."),
        ("class music.Chord(object)", "Three or more notes played together as one sound.")]),
}
GUIDE = """# Installing the tools

Install the package with pip from the local wheel file. Check the version afterwards.

# Cooking pasta

Boil the pasta in salted water for nine minutes. Drain it and keep a cup of the water.
"""


def module_text(name, summary, defs):
    parts = [f"module {name}\n\n{summary}"]
    parts += [f"{head}\n\n    {doc}\n\n    More details follow here." for head, doc in defs]
    return "\n\n".join(parts) + "\n"


@pytest.fixture
def collection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(GUIDE)
    records = [{"id": f"doc:{m}", "text": module_text(m, *v), "source": f"{m}.py"} for m, v in MODULES.items()]
    (tmp_path / "docs" / "api.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = open_store("exact", tmp_path / "store")
    index_documents(store, "docs", ["docs"], chunk_tokens=30, overlap=4)
    yield store
    store.close()


def hit(i, text="", source="a.md"):
    return Hit(id=f"c{i}", score=1.0, distance=0.0, text=text, metadata={"source": source})


def test_metrics_equal_a_hand_computation_and_scikit_learn():
    ranks = [1, 3, None, 2, 7]
    m = retrieval_metrics(ranks, ks=(1, 5, 10))
    assert m["recall@1"] == pytest.approx(1 / 5) and m["recall@5"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(4 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2 + 1 / 7) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1 / math.log2(3) + 1 / math.log2(8)) / 5)
    assert retrieval_metrics([12], ks=(10,), ndcg_k=10) == {"recall@10": 0.0, "mrr": 1 / 12, "ndcg@10": 0.0}

    metrics = pytest.importorskip("sklearn.metrics")
    found = [r for r in ranks if r is not None]
    # One relevant passage per question: a ranking of 10 hits with a single 1 at the answer's rank.
    y_true = [[1 if i == r - 1 else 0 for i in range(10)] for r in found]
    y_score = [[10 - i for i in range(10)] for _ in found]
    ndcg = sum(metrics.ndcg_score([t], [s], k=10) for t, s in zip(y_true, y_score)) / len(ranks)
    assert m["ndcg@10"] == pytest.approx(ndcg)
    # With one relevant label, label ranking average precision is the reciprocal rank.
    mrr = metrics.label_ranking_average_precision_score(y_true, y_score) * len(found) / len(ranks)
    assert m["mrr"] == pytest.approx(mrr)


def test_answer_rouge_l_scores_the_words_without_markers():
    from types import SimpleNamespace

    from haina.rag.evaluate import _rouge_l

    ref = {"answer": "Serialize obj to a JSON formatted str."}
    exact = SimpleNamespace(text="[2] Serialize obj to a JSON formatted str.")
    wrong = SimpleNamespace(text="[1] Delete all counts in the shared memory.")
    assert _rouge_l([(ref, exact)]) == pytest.approx(1.0)  # the marker is not part of what is said
    assert _rouge_l([(ref, wrong)]) == pytest.approx(0.0)
    assert _rouge_l([(ref, exact), (ref, wrong), ({"answer": None}, exact)]) == pytest.approx(0.5)
    assert _rouge_l([({}, exact)]) is None  # no reference answers: nothing to score


def test_relevance_by_chunk_id_or_span():
    item = {"question": "q", "chunk_id": "c2", "span": "Boil the water for nine minutes.", "source": "a.md"}
    hits = [hit(0, "nothing here"), hit(1, "Then:  boil the\n water"), hit(2, "x"),
            hit(3, "First, Boil the\n   water for nine minutes. Then drain."),
            hit(4, "Boil the water for nine minutes.", source="other.md")]
    assert [is_relevant(item, h) for h in hits] == [False, False, True, True, False]
    assert first_relevant_rank(item, hits) == 3
    assert first_relevant_rank({"question": "q", "chunk_id": "zz"}, hits) is None


def test_questions_come_from_definitions_and_sections():
    text = module_text("kitchen", *MODULES["kitchen"])
    rec = Record(id="doc:kitchen:0", text=text, metadata={"source": "kitchen.py", "doc": "doc:kitchen", "chunk": 0})
    qs = chunk_questions(rec)
    assert [q["kind"] for q in qs] == ["module", "function", "class", "function"]
    assert qs[1]["question"].endswith(("kitchen.boil do?", "Explain kitchen.boil.", "kitchen.boil used for?"))
    assert qs[1]["answer"] == "Boil the water in a pot for the given number of minutes."
    assert all(q["chunk_id"] == "doc:kitchen:0" and q["span"] in " ".join(text.split()) for q in qs)
    section = Record(id="g:1", text="# Cooking pasta\n\nBoil it for nine minutes. Then drain.\n\nMore.",
                     metadata={"source": "g.md", "section": "Cooking pasta"})
    assert [(q["kind"], q["answer"]) for q in chunk_questions(section)] == \
        [("section", "Boil it for nine minutes. Then drain.")]
    cut = Record(id="g:2", text="kitchen.boil(water)\n\n    Boil the water in a pot for the", metadata={})
    assert chunk_questions(cut) == []  # its summary may go on in the next chunk: no question


def test_qa_builder_is_deterministic_and_names_real_chunks(collection, tmp_path):
    records = collection.get("docs")
    first, counts = build_qa(records, n=6, seed=3)
    again, _ = build_qa(list(reversed(records)), n=6, seed=3)
    assert first == again and len(first) == 6 and counts["candidates"] > 6
    held = {r.id: r for r in records}
    for item in first:
        assert item["chunk_id"] in held
        assert item["span"] in " ".join(held[item["chunk_id"]].text.split())
    assert build_qa(records, n=6, seed=4)[0] != first
    train, _ = build_qa(records, n=None, split="train", test_fraction=0.5)
    test, _ = build_qa(records, n=None, split="test", test_fraction=0.5)
    assert train and test and not {i["doc"] for i in train} & {i["doc"] for i in test}
    qa_command("docs", str(tmp_path / "qa.jsonl"), n=6, seed=3, store="store", backend="exact")
    assert read_qa(tmp_path / "qa.jsonl") == first


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    corpus = GUIDE + "".join(module_text(m, *v) for m, v in MODULES.items())
    tok = train_bpe([corpus] * 20, vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=400, block_size=256, n_layer=1, n_embd=32, n_head=2)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    save_model(path, Transformer(cfg), tok)
    return path


def test_rag_eval_report_is_read_by_eval_compare(collection, checkpoint, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa_command("docs", str(qa), n=8, store="store", backend="exact")
    rag_eval_command("docs", str(qa), "eval/bm25", store="store", backend="exact", top_k=5)
    rag_eval_command("docs", str(qa), "eval/answers", checkpoint=str(checkpoint), store="store", backend="exact",
                     top_k=5, max_new_tokens=6, device="cpu")
    first, second = read_report("eval/bm25"), read_report("eval/answers")
    assert first["kind"] == "rag" and first["questions"] == 8
    assert 0 <= first["bm25_mrr"] <= first["bm25_recall@5"] <= 1 and "bm25_recall@10" not in first
    assert (tmp_path / "eval" / "bm25" / "recall.png").stat().st_size > 1000
    for key in ("citation_validity", "refusal_rate", "cited_rate", "answer_shown_rate", "answer_rouge_l"):
        assert second[key] is None or 0 <= second[key] <= 1
    assert len(second["details"]["answers"]) == 8 and second["checkpoint"] == str(checkpoint)
    table = compare_table(["eval/bm25", "eval/answers"])
    assert "| bm25_recall@5 |" in table and "| citation_validity |" in table
    assert "![recall](recall.png)" in (tmp_path / "eval" / "bm25" / "report.md").read_text()


def test_sft_records_teach_citing_the_answer_chunk(collection, checkpoint, tmp_path):
    qa_command("docs", str(tmp_path / "train-qa.jsonl"), n=10, store="store", backend="exact",
               sft_out=str(tmp_path / "sft"), checkpoint=str(checkpoint), top_k=3)
    items = {it["question"]: it for it in read_qa(tmp_path / "train-qa.jsonl")}
    rows = [json.loads(line) for name in ("train", "val")
            for line in (tmp_path / "sft" / f"{name}.jsonl").read_text().splitlines()]
    report = read_json(tmp_path / "sft" / "report.json")
    assert rows and report["train"] + report["val"] == len(rows)
    for row in rows:
        question = row["prompt"].rsplit("Question: ", 1)[1]
        n = int(row["response"][1:row["response"].index("]")])
        block = row["prompt"].split(f"\n[{n}] ", 1)[1].split("\n\n[", 1)[0].split("\n\nQuestion:", 1)[0]
        assert items[question]["span"] in " ".join(block.split())  # the cited source shows the answer
        assert row["response"] == f"[{n}] {items[question]['answer']}"
