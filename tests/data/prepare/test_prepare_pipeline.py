"""The whole pipeline: outputs, rejects, the accounting invariant, report, determinism, crash and resume."""

import json
import random

import pyarrow.parquet as pq
import pytest

from haina.core.errors import HainaError
from haina.data.prepare import pipeline
from haina.data.prepare.config import PrepareConfig
from haina.data.prepare.pipeline import prepare_documents
from haina.data.prepare.report import check_accounting
from haina.data.prepare.writers import read_jsonl_zst

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "pa", "lu", "mo", "ri", "sen", "tar", "gol", "fin", "bel", "cor", "dan"]
STOP = ["the", "and", "of", "to", "with", "that"]


def prose(rng, sentences=8):
    """A document that passes every filter: sentences of made-up words with English stop words."""
    out = []
    for _ in range(sentences):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(8, 14))]
        for i in range(0, len(words), 4):
            words.insert(i, rng.choice(STOP))
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out[:4]) + "\n\n" + " ".join(out[4:])


def write_corpus(path, n=40, seed=0, labels=True):
    """n good documents plus one of every kind of bad record; returns the expected drop reasons."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        rec = {"text": prose(rng)}
        if labels:
            rec["label"] = "pos" if i % 4 else "neg"
        lines.append(json.dumps(rec))
    good = [json.loads(x)["text"] for x in lines]
    extra = [
        json.dumps({"text": good[0].upper().replace(" ", "  "), "label": "pos"}),  # exact duplicate (normalized)
        json.dumps({"text": good[1].replace(good[1].split()[3], "zebra", 1), "label": "pos"}),  # near duplicate
        json.dumps({"text": "Lorem ipsum dolor sit amet. " + good[2], "label": "pos"}),
        json.dumps({"text": "Too short to keep.", "label": "neg"}),
        json.dumps({"text": " \t ", "label": "neg"}),
        "{not json",
    ]
    path.write_text("\n".join(lines + extra) + "\n")
    return {"exact_duplicate": 1, "near_duplicate": 1, "c4_lorem_ipsum": 1, "gopher_min_words": 1, "empty": 1,
            "malformed_record": 1}


def read_split(out, split):
    return [r for p in sorted((out / split).glob("*.jsonl.zst")) for r in read_jsonl_zst(p)]


def test_prepare_end_to_end(tmp_path):
    expected = write_corpus(tmp_path / "in.jsonl", n=40)
    out = tmp_path / "out"
    report = prepare_documents([tmp_path / "in.jsonl"], out, PrepareConfig(val_fraction=0.1, test_fraction=0.1,
                                                                            workers=1))
    d = report["documents"]
    assert d["in"] == 46 and d["kept"] == 40
    assert d["by_reason"] == expected
    assert d["in"] == d["kept"] + sum(d["by_reason"].values())
    assert "46 in = 40 kept + 6 dropped" in report["accounting"]["equation"]
    # Every dropped document is in rejects/, with its reason (and for duplicates, its cluster).
    rejects = {p.name.split(".")[0]: list(read_jsonl_zst(p)) for p in (out / "rejects").iterdir()}
    assert {k: len(v) for k, v in rejects.items()} == expected
    assert rejects["near_duplicate"][0]["meta"]["duplicate_of"] == "in.jsonl:2"
    assert rejects["malformed_record"][0]["meta"]["line"] == 46
    # Stratified, exact split sizes; shards readable; labels kept.
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 4, 4)
    assert sum(r["label"] == "neg" for r in val) == 1 and sum(r["label"] == "neg" for r in test) == 1
    assert set(train[0]) >= {"id", "text", "source", "label", "meta"}
    assert {r["id"] for r in train + val + test} == {f"in.jsonl:{i}" for i in range(1, 41)}
    # Report files.
    assert json.loads((out / "report.json").read_text())["documents"]["kept"] == 40
    md = (out / "report.md").read_text()
    assert "46 in = 40 kept + 6 dropped" in md and "| c4_lorem_ipsum | 1 |" in md and "Class balance" in md
    assert (out / "lengths.png").stat().st_size > 1000 and (out / "classes.png").stat().st_size > 1000
    assert report["class_balance"] == {"neg": 10, "pos": 30}
    assert not (out / "_work").exists() and not (out / "_done").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]  # no working directory left beside


def test_split_is_stable_across_runs_input_order_and_workers(tmp_path):
    write_corpus(tmp_path / "a.jsonl", n=30, seed=1, labels=False)
    write_corpus(tmp_path / "b.jsonl", n=30, seed=2, labels=False)
    cfg = PrepareConfig(val_fraction=0.2, workers=1)
    prepare_documents([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "o1", cfg)
    prepare_documents([tmp_path / "b.jsonl", tmp_path / "a.jsonl"], tmp_path / "o2",
                      PrepareConfig(val_fraction=0.2, workers=2))
    val1 = sorted(r["text"] for r in read_split(tmp_path / "o1", "val"))
    val2 = sorted(r["text"] for r in read_split(tmp_path / "o2", "val"))
    assert val1 == val2 and len(val1) == 12


def test_accounting_violation_fails_loudly():
    assert check_accounting(10, 7, {"empty": 3}, 3).startswith("10 in = 7 kept + 3 dropped")
    with pytest.raises(RuntimeError, match="accounting invariant violated"):
        check_accounting(10, 7, {"empty": 2}, 2)
    with pytest.raises(RuntimeError, match="accounting invariant violated"):
        check_accounting(10, 7, {"empty": 3}, 2)  # a reject counted but not written


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "dir").mkdir()
    with pytest.raises(HainaError, match="no documents"):
        prepare_documents([tmp_path / "empty.jsonl"], tmp_path / "out", PrepareConfig(workers=1))
    with pytest.raises(HainaError, match="no input files found"):
        prepare_documents([tmp_path / "dir"], tmp_path / "out", PrepareConfig(workers=1))


def test_a_wrong_text_field_is_named_in_the_warning(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    report = prepare_documents([tmp_path / "in.jsonl"], tmp_path / "out", PrepareConfig(workers=1))
    assert report["documents"]["by_reason"] == {"malformed_record": 5}
    assert any("--text-field" in w for w in report["warnings"])


def test_crash_and_resume(tmp_path, monkeypatch):
    for i in range(3):
        write_corpus(tmp_path / f"part{i}.jsonl", n=10, seed=10 + i)
    inputs = sorted(tmp_path.glob("part*.jsonl"))
    out = tmp_path / "out"
    cfg = PrepareConfig(workers=1)
    real = pipeline.process_unit
    calls = []

    def crashing(unit, uid, *args):
        calls.append(uid)
        if uid == "00001":
            real(unit, uid, *args)  # the unit finishes its files...
            raise KeyboardInterrupt  # ...but the run dies before the next one (a crash, a kill)
        return real(unit, uid, *args)

    monkeypatch.setattr(pipeline, "process_unit", crashing)
    with pytest.raises(KeyboardInterrupt):
        prepare_documents(inputs, out, cfg)
    state = tmp_path / ".out.haina-partial"  # the work so far, kept beside --out, never inside it
    assert sorted(p.name for p in (state / "_done").iterdir()) == ["00000.json", "00001.json"]
    assert not out.exists()  # nothing half-published

    calls.clear()
    monkeypatch.setattr(pipeline, "process_unit", lambda unit, uid, *a: calls.append(uid) or real(unit, uid, *a))
    report = prepare_documents(inputs, out, cfg, resume=True)
    assert calls == ["00002"]  # completed units were skipped
    fresh = prepare_documents(inputs, tmp_path / "fresh", cfg)
    assert report["documents"] == fresh["documents"] and report["splits"] == fresh["splits"]
    assert read_split(out, "train") == read_split(tmp_path / "fresh", "train")

    # A changed config does not reuse the old units.
    write_corpus(tmp_path / "part0.jsonl", n=10, seed=10)
    calls.clear()
    prepare_documents(inputs, out, PrepareConfig(workers=1, pii=True), resume=True)
    assert calls == ["00000", "00001", "00002"]


def test_parquet_output_pii_and_no_filters(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "mail me at a@b.com", "label": 1}) + "\n"
                                       + json.dumps({"text": "call 555-123-4567", "label": 0}) + "\n")
    report = prepare_documents([tmp_path / "in.jsonl"], tmp_path / "out",
                               PrepareConfig(filters=(), dedup=(), pii=True, val_fraction=0, output_format="parquet",
                                             workers=1))
    table = pq.read_table(tmp_path / "out" / "train" / "part-00000.parquet").to_pylist()
    assert sorted(r["text"] for r in table) == ["call <PHONE>", "mail me at <EMAIL>"]
    assert report["stages"]["pii"]["replaced"] == {"email": 1, "phone": 1}
    assert report["documents"]["dropped"] == 0


def test_lone_surrogates_in_json_do_not_stop_the_run(tmp_path):
    rng = random.Random(3)
    recs = [{"text": prose(rng) + " \ud83d", "id": "a\udc00"}, {"text": prose(rng)}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))  # ASCII escapes, as in the wild
    report = prepare_documents([tmp_path / "in.jsonl"], tmp_path / "out", PrepareConfig(workers=1, val_fraction=0,
                                                                                              filters="none"))
    assert report["documents"]["kept"] == 2
    texts = [r["text"] for r in read_split(tmp_path / "out", "train")]
    assert sum(t.endswith("\ufffd") for t in texts) == 1


def test_output_that_is_a_file_is_a_clear_error(tmp_path):
    write_corpus(tmp_path / "in.jsonl", n=3)
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(HainaError, match="is a file, not a directory"):
        prepare_documents([tmp_path / "in.jsonl"], tmp_path / "out", PrepareConfig(workers=1))
