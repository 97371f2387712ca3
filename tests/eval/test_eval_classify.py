"""`haina eval classify` on a tiny classifier trained here to tell "good" texts from "bad" ones.

The metrics in report.json are recomputed from predictions.jsonl with scikit-learn, so the command is checked
end to end: data reading, the label map, batching, the report.
"""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from haina.cli import main
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.classifier import Classifier, ClassifierConfig, pad_batch, save_classifier
from haina.tokenizer.train import train_bpe

WORDS = ["the", "a", "film", "day", "meal", "story", "was", "felt", "seemed", "quite", "very", "really", "so", "and",
         "it", "this"]


def _text(rng: random.Random, mood: str) -> str:
    words = rng.choices(WORDS, k=rng.randint(2, 7))
    words.insert(rng.randint(0, len(words)), mood)
    return " ".join(words)


def _examples(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        out.append({"id": f"x{i}", "text": _text(rng, "good" if label == "pos" else "bad"), "label": label,
                    "source": rng.choice(["web", "mail"])})
    return out


@pytest.fixture(scope="module")
def tok():
    corpus = [" ".join(WORDS + ["good", "bad"]) * 20]
    return train_bpe(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A 1-layer classifier (last-token pooling) trained for 20 steps: "good" -> pos, "bad" -> neg."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=32)
    model = Classifier(Transformer(cfg), ClassifierConfig(labels=["neg", "pos"]), tok)
    train = _examples(1, 256)
    ids, _ = model.encode([r["text"] for r in train])
    y = torch.tensor([model.cfg.label_index[r["label"]] for r in train])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        rows = [(step * 32 + k) % len(train) for k in range(32)]
        idx, lengths = pad_batch([ids[i] for i in rows], tok.eos_id)
        loss = F.cross_entropy(model(idx, lengths), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("clf") / "ckpt"
    save_classifier(out, model)
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(ckpt, data, out, *extra):
    return main(["eval", "classify", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--batch-size", "8", *extra])


def _predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_report_equals_sklearn_on_the_saved_predictions(ckpt, tmp_path, capsys):
    rows = _examples(2, 60) + [{"id": "u1", "text": "good meal", "label": "meh"},
                               {"id": "u2", "text": "bad film", "label": "meh"},
                               {"id": "n1", "text": "a good day"}]
    data = _jsonl(tmp_path / "test.jsonl", rows)
    assert _eval(ckpt, data, tmp_path / "r") == 0
    assert "accuracy" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    for key in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc_macro", "pr_auc_macro", "ece", "brier"):
        assert isinstance(rep[key], float), key
    assert rep["kind"] == "classify" and rep["examples"] == 60 and rep["unseen_labels"] == 2
    assert rep["details"]["unseen_labels"] == {"meh": 2} and rep["details"]["unlabeled"] == 1
    assert set(rep["details"]["per_class"]) == {"neg", "pos"} and rep["details"]["confusion"]["labels"] == ["neg", "pos"]
    assert rep["accuracy"] > 0.9  # the toy task is learnt: the metrics below mean something
    assert 0.0 <= rep["ece"] <= 1.0

    preds = _predictions(tmp_path / "r")
    assert [p["id"] for p in preds] == [r["id"] for r in rows]  # every record, in input order
    scored = [p for p in preds if p["label"] in ("neg", "pos")]
    assert len(scored) == 60 and not any(p["scored"] for p in preds[60:])
    y = np.array([p["label"] == "pos" for p in scored], dtype=int)
    pred = np.array([p["predicted"] == "pos" for p in scored], dtype=int)
    proba = np.array([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in scored])
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("macro", "micro", "weighted"):
        assert rep[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg))
    assert rep["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]), abs=1e-6)
    ap = [skm.average_precision_score(y == c, proba[:, c]) for c in (0, 1)]
    assert rep["pr_auc_macro"] == pytest.approx(np.mean(ap), abs=1e-6)
    unit = proba / proba.sum(1, keepdims=True)  # float32 softmax rows, written in JSON, sum to 1 ± 1e-7
    assert rep["brier"] == pytest.approx(skm.brier_score_loss(y, unit, labels=[0, 1], scale_by_half=False), abs=1e-6)
    assert rep["details"]["confusion"]["matrix"] == skm.confusion_matrix(y, pred).tolist()

    md = (tmp_path / "r" / "report.md").read_text()
    assert "label is one the model never saw: `meh` (2)" in md and "1 records have no label" in md
    for png in ("confusion.png", "reliability.png"):
        assert (tmp_path / "r" / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md


def test_csv_with_noise_groups_and_mc_dropout(ckpt, tmp_path):
    rows = _examples(3, 40)
    lines = ["text,label,source"] + [f"{r['text']},{r['label']},{r['source']}" for r in rows]
    data = tmp_path / "test.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert _eval(ckpt, data, out, "--noise", "char,word", "--rates", "0", "0.3", "--group-field", "source",
                 "--mc-dropout", "3", "--dropout", "0.2") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["examples"] == 40
    noise = rep["details"]["noise"]
    assert [(r["noise"], r["rate"]) for r in noise] == [("clean", 0.0), ("char", 0.3), ("word", 0.3)]
    assert noise[0]["accuracy"] == rep["accuracy"]
    assert (out / "accuracy_vs_noise.png").is_file() and (out / "macro_f1_vs_noise.png").is_file()
    groups = rep["details"]["groups"]["per_group"]
    assert set(groups) == {"web", "mail"} and sum(g["n"] for g in groups.values()) == 40
    assert rep["group_gap_accuracy"] == pytest.approx(abs(groups["web"]["accuracy"] - groups["mail"]["accuracy"]))
    assert rep["mc_passes"] == 3 and rep["mc_entropy"] >= rep["mc_mutual_info"] >= 0.0
    md = (out / "report.md").read_text()
    assert "## Robustness to noise" in md and "## By source" in md and "## MC dropout" in md


def test_multi_label_parquet(tok, tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=1, n_head=4, n_embd=32)
    model = Classifier(Transformer(cfg), ClassifierConfig(labels=["a", "b", "c"], multi_label=True), tok)
    with torch.no_grad():
        model.head.weight.normal_(0, 3.0)  # probabilities on both sides of 0.5
    save_classifier(tmp_path / "ml", model)
    rng = random.Random(0)
    rows = [{"text": _text(rng, "good"), "label": rng.sample(["a", "b", "c", "zzz"], rng.randint(0, 2))}
            for _ in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    assert _eval(tmp_path / "ml", tmp_path / "t.parquet", tmp_path / "r") == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    preds = _predictions(tmp_path / "r")
    names = ["a", "b", "c"]
    y = np.array([[n in r["label"] for n in names] for r in rows], dtype=int)
    pred = np.array([[n in p["predicted"] for n in names] for p in preds], dtype=int)
    assert rep["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert rep["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro", zero_division=0))
    assert rep["unseen_labels"] == sum("zzz" in r["label"] for r in rows) and 0.0 <= rep["ece"] <= 1.0


def test_no_head_is_one_line_and_writes_nothing(tok, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(tmp_path / "lm", Transformer(ModelConfig.from_name("tiny", vocab_size=300, block_size=32, n_layer=1,
                                                                  n_embd=32)), tok)
    missing = tmp_path / "not-read.jsonl"  # never opened: the head is checked first
    assert _eval(tmp_path / "lm", missing, tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "has no classifier head" in err and "haina finetune classify" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rows, match", [
    ([{"text": "good", "label": "pos"}, {"text": 3, "label": "neg"}], "record 2 has a int in its 'text'"),
    ([{"text": "good", "label": "zzz"}], "none of the 1 records"),
    ([{"text": "good", "label": ["pos"]}], "not multi-label"),
])
def test_bad_data_is_one_line(ckpt, tmp_path, capsys, rows, match):
    data = _jsonl(tmp_path / "d.jsonl", rows)
    assert _eval(ckpt, data, tmp_path / "r") == 2
    assert match in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_bad_options_are_refused_before_loading(ckpt, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}])
    assert _eval(ckpt, data, tmp_path / "r", "--mc-dropout", "2", "--dropout", "1.5") == 2
    assert "--dropout" in capsys.readouterr().err
    assert _eval(ckpt, tmp_path / "d.txt", tmp_path / "r") == 2
    assert ".jsonl, .csv, .tsv or .parquet" in capsys.readouterr().err
