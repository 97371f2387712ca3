"""`haina finetune classify` end to end: a tiny base learns to tell "good", "bad" and "meh" texts apart.

The data is imbalanced (6 : 3 : 1), has bad records, a validation label training never saw, and a CSV test file.
Full fine-tuning and LoRA both reach high test accuracy; the run loads with `haina eval classify` and
`load_classifier`, and a LoRA run's head survives the round trip.
"""

import csv
import json
import random

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from haina.cli import main
from haina.core.errors import HainaError
from haina.data.records import iter_records, label_name
from haina.finetune.classify import classification_loss
from haina.finetune.classify_data import ClassBatches, class_weights, hold_out, parse_records, read_splits, scores
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.classifier import load_classifier
from haina.tokenizer.train import train_bpe

FILL = ["the", "a", "film", "day", "meal", "story", "was", "felt", "seemed", "quite", "very", "really", "so", "and"]
MOOD = {"pos": "good", "neg": "bad", "mid": "meh"}
MIX = ["pos"] * 6 + ["neg"] * 3 + ["mid"]  # imbalanced: "mid" is a tenth of the data


def _record(rng: random.Random, label: str, i: int) -> dict:
    words = rng.choices(FILL, k=rng.randint(2, 6))
    words.insert(rng.randint(0, len(words)), MOOD[label])
    return {"id": f"r{i}", "text": " ".join(words), "label": label}


def _records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [_record(rng, rng.choice(MIX), i) for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    tok = train_bpe([" ".join(FILL + list(MOOD.values())) * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=64, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "base", Transformer(cfg), tok)
    bad = [{"text": "good day"}, {"text": 7, "label": "pos"}]  # no label; a text that is not text
    _jsonl(root / "train.jsonl", _records(0, 240) + bad)
    _jsonl(root / "val.jsonl", _records(1, 40) + [{"text": "so angry", "label": "angry"}])
    with open(root / "test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows(_records(2, 60))
    return root


def _train(files, out, *extra):
    args = ["finetune", "classify", "--base", str(files / "base"), "--data", str(files / "train.jsonl"),
            "--val", str(files / "val.jsonl"), "--test", str(files / "test.csv"), "--out", str(out),
            "--train.max_steps=40", "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=5",
            "--train.eval_every=20", "--train.save_every=20", "--train.device=cpu", "--train.tensorboard=false",
            *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("lora", [False, True])
def test_classify_learns_and_loads_everywhere(files, tmp_path, lora):
    out = tmp_path / "run"
    extra = ["--lora.r=8", "--lora.alpha=16", "--train.lr=1e-2", "--classify.select_metric=macro_f1"] if lora else []
    report = _train(files, out, *extra)
    for key in ("accuracy", "macro_f1", "per_class", "confusion", "micro_f1", "weighted_f1", "imbalance", "selection"):
        assert key in report, key
    assert report["evaluated_on"] == "test" and report["evaluated_examples"] == 60
    assert report["accuracy"] >= 0.9 and report["macro_f1"] >= 0.85, report["confusion"]
    assert report["labels"] == ["mid", "neg", "pos"] and report["lora"] is lora
    assert report["data"]["records"]["rejected"] == 3  # two bad training records and the unseen validation label
    assert report["data"]["unseen_labels"]["val"] == {"angry": 1}
    reasons = {json.loads(line)["reason"] for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert reasons == {"no label in 'label'", "'text' is a int, not text", "label never seen in training"}
    assert report["validation"][-1]["macro_f1"] > report["validation"][0]["macro_f1"]
    assert report["selection"]["metric"] == ("macro_f1" if lora else "val_loss")

    ckpt = out / "checkpoints" / json.loads((out / "checkpoints" / "index.json").read_text())["best"]
    files_in = {p.name for p in ckpt.iterdir()}
    assert {"classifier.json", "classifier.safetensors"} <= files_in
    assert ("adapter.safetensors" in files_in) is lora and ("model.safetensors" in files_in) is not lora

    # The head comes back from disk (a LoRA run through its recorded base): the reloaded model scores the test
    # set exactly as the run's report says.
    model, _ = load_classifier(out)
    rows = list(iter_records(files / "test.csv"))
    proba = model.predict_proba([r["text"] for r in rows])
    y = np.array([model.cfg.label_index[r["label"]] for r in rows])
    assert skm.accuracy_score(y, proba.argmax(1)) == pytest.approx(report["accuracy"])

    if not lora:
        return
    # `haina eval classify` reads the run directory as it is (here a LoRA run: base + adapters + head).
    assert main(["eval", "classify", "--checkpoint", str(out), "--data", str(files / "test.csv"),
                 "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert ev["accuracy"] == pytest.approx(report["accuracy"])
    assert ev["macro_f1"] == pytest.approx(report["macro_f1"])
    # `finetune merge` folds the adapters in and keeps the head: the same probabilities from a plain checkpoint.
    assert main(["finetune", "merge", "--checkpoint", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_classifier(tmp_path / "merged")
    np.testing.assert_allclose(merged.predict_proba([r["text"] for r in rows]), proba, atol=1e-5)


def test_class_weights_and_focal_loss_run(files, tmp_path):
    report = _train(files, tmp_path / "run", "--class-weights", "auto", "--loss", "focal", "--sampling", "none",
                    "--classify.focal_gamma=1.5", "--train.max_steps=10", "--train.eval_every=10")
    imb = report["imbalance"]
    assert imb["class_weights"] == "auto" and imb["loss"] == "focal" and imb["focal_gamma"] == 1.5
    counts = imb["train_counts"]
    n = sum(counts.values())
    assert imb["weights"] == pytest.approx({k: n / (3 * c) for k, c in counts.items()})
    assert imb["weights"]["mid"] > imb["weights"]["neg"] > imb["weights"]["pos"]
    assert np.isfinite(report["val_loss"]) and report["accuracy"] is not None


def test_sampling_changes_the_batch_mix():
    y = [0] * 80 + [1] * 15 + [2] * 5
    ids = [[1, 2, 3]] * len(y)

    def shares(sampling):
        data = ClassBatches(ids, y, 0, sampling=sampling, seed=0)
        g = torch.Generator().manual_seed(0)
        drawn = torch.cat([data.get_batch(64, 8, g)["y"] for _ in range(40)])
        return torch.bincount(drawn, minlength=3).float() / len(drawn), data

    plain, _ = shares("none")
    over, _ = shares("over")
    under, data = shares("under")
    assert plain[2] < 0.1 and plain[0] > 0.7
    assert torch.allclose(over, torch.full((3,), 1 / 3), atol=0.05)
    assert torch.allclose(under, torch.full((3,), 1 / 3), atol=0.05)
    assert len(data.pool) == 15 and sorted(set(data.pool.tolist())) == sorted(data.pool.tolist())  # 5 per class


def test_losses():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(classification_loss(logits, y, multi_label=False), ce)
    w = torch.tensor([0.5, 1.0, 2.0])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(classification_loss(logits, y, multi_label=False, weights=w), (per * w[y]).mean())
    p = torch.softmax(logits, -1)[torch.arange(8), y]
    torch.testing.assert_close(classification_loss(logits, y, multi_label=False, gamma=2.0), (per * (1 - p) ** 2).mean())
    t = torch.randint(0, 2, (8, 3)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, pos_weight=w)
    torch.testing.assert_close(classification_loss(logits, t, multi_label=True, weights=w), bce)
    assert class_weights({"a": 3, "b": 1}, 4, multi_label=False) == [4 / 6, 2.0]
    assert class_weights({"a": 3, "b": 1}, 4, multi_label=True) == [1 / 3, 3.0]


@pytest.mark.parametrize("multi_label", [False, True])
def test_scores_match_scikit_learn(multi_label):
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    proba = rng.dirichlet(np.ones(4), size=50) if not multi_label else rng.random((50, 4))
    y = rng.integers(0, 3, 50) if not multi_label else rng.integers(0, 2, (50, 4))  # "d" never true
    got = scores(y, proba, labels, multi_label)
    pred = (proba >= 0.5).astype(int) if multi_label else proba.argmax(1)
    present = [c for c in range(4) if (y[:, c].any() or pred[:, c].any())] if multi_label else None
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("macro", "micro", "weighted"):
        assert got[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg, labels=present, zero_division=0))
    classes = present if multi_label else [c for c in range(4) if (y == c).any() or (pred == c).any()]
    per_class = skm.f1_score(y, pred, average=None, labels=classes, zero_division=0)
    assert [got["per_class"][labels[c]]["f1"] for c in classes] == pytest.approx(list(per_class))


def test_records_helpers(tmp_path):
    assert [label_name(v) for v in ("  x ", 3, 3.0, True, None, "", 2.5)] == ["x", "3", "3", "true", None, None, "2.5"]
    parsed = parse_records([_jsonl(tmp_path / "a.jsonl", [{"t": "x", "y": ["a", "b"]}, {"t": "z", "y": "a,c"}])],
                           text_field="t", label_field="y", multi_label=True, what="--data")
    assert parsed.names == [["a", "b"], ["a", "c"]] and not parsed.rejects
    kept, held = hold_out(parse_records([_jsonl(tmp_path / "b.jsonl", _records(3, 100))], text_field="text",
                                        label_field="label", multi_label=False, what="--data"), 0.2, 0, False)
    assert len(held.texts) == 20 and {n[0] for n in kept.names} == {"pos", "neg", "mid"}


def test_prepare_output_splits_are_used(files, tmp_path):
    raw = _jsonl(tmp_path / "raw.jsonl", [{**r, "text": f"{r['text']} {i}"} for i, r in enumerate(_records(4, 200))])
    assert main(["data", "prepare", "--input", str(raw), "--out", str(tmp_path / "prep"), "--filters", "none",
                 "--dedup", "none", "--workers", "1", "--val-fraction", "0.1", "--test-fraction", "0.15"]) == 0
    counts = json.loads((tmp_path / "prep" / "report.json").read_text())
    parsed, source = read_splits([str(tmp_path / "prep")], [], [], text_field="body", label_field="y",
                                 multi_label=False)
    assert source == "prepare" and sum(parsed[s].read for s in parsed) == 200
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--base", str(files / "base"), "--data", str(tmp_path / "prep"),
                 "--out", str(out), "--train.max_steps=10", "--train.device=cpu", "--train.tensorboard=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "prepare" and not any(report["data"]["held_out_from_train"].values())
    assert report["evaluated_on"] == "test" and report["evaluated_examples"] == parsed["test"].read > 0, counts


def test_resume_reads_the_head_back(files, tmp_path, capsys):
    out = tmp_path / "run"
    first = _train(files, out, "--train.max_steps=20")
    resumed = _train(files, out, "--resume", "--train.max_steps=30", "--train.save_every=10")
    assert first["steps"] == 20 and resumed["steps"] == 30 and resumed["steps_this_run"] == 10
    assert resumed["accuracy"] >= first["accuracy"] - 0.05
    capsys.readouterr()
    with pytest.raises(AssertionError):  # the CLI answers 2 with one line, and the run stays as it was
        _train(files, out, "--resume", "--train.max_steps=40", "--classify.select_metric=accuracy")
    assert "--classify.select_metric=val_loss" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["steps"] == 30


def test_multi_label_run(files, tmp_path):
    rng = random.Random(7)
    rows = []
    for i in range(160):
        on = [lab for lab in ("pos", "neg") if rng.random() < 0.5]
        words = rng.choices(FILL, k=3) + [MOOD[lab] for lab in on]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": on if i % 2 else json.dumps(on)})
    data = _jsonl(tmp_path / "multi.jsonl", rows)
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--base", str(files / "base"), "--data", str(data), "--out", str(out),
                 "--multi-label", "--label-field", "tags", "--class-weights", "auto", "--train.max_steps=40",
                 "--train.lr=3e-3", "--train.warmup_steps=5", "--train.eval_every=20", "--train.save_every=20",
                 "--train.device=cpu", "--train.tensorboard=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["multi_label"] and report["labels"] == ["neg", "pos"]
    assert report["subset_accuracy"] >= 0.8 and set(report["confusion"]) == {"neg", "pos"}
    model, _ = load_classifier(out)
    proba = model.predict_proba(["good bad film", "the day"])
    assert (proba[0] > 0.5).all() and (proba[1] < 0.5).all()


def test_bad_input_is_one_line(files, tmp_path):
    one = _jsonl(tmp_path / "one.jsonl", [{"text": "good", "label": "pos"}] * 30)
    with pytest.raises(HainaError, match="1 class"):
        read_and_map(one)
    with pytest.raises(HainaError, match="--text-field"):
        read_splits([str(one)], [], [], text_field="body", label_field="label", multi_label=False)
    args = ["finetune", "classify", "--base", str(files / "base"), "--data", str(one), "--out", str(tmp_path / "r")]
    assert main(args) == 2 and not (tmp_path / "r").exists()


def read_and_map(path):
    from haina.finetune.classify_data import label_map

    parsed, _ = read_splits([str(path)], [], [], text_field="text", label_field="label", multi_label=False)
    return label_map(parsed["train"], False, "label")
