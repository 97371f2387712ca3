"""`haina finetune classify --folds K`: stratified and grouped folds, K ordinary runs and their aggregate.

Fold assignment is checked against scikit-learn's StratifiedKFold and StratifiedGroupKFold in spirit (the same
per-class counts, class shares about as even), not for equal folds. The end-to-end runs use a tiny base and a
few steps: three fold runs, an aggregate equal to numpy's mean and sample std of the folds' values, a second
run over the first (grouped, with a test split, LoRA and the imbalance options), and the one-line refusals.
"""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from haina.cli import main
from haina.core.errors import HainaError
from haina.core.output import read_manifest
from haina.finetune.kfold import METRICS, assign_folds, grouped_folds, stratified_folds, summarize
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.model.classifier import load_classifier
from haina.tokenizer.train import train_bpe

FILL = ["the", "a", "film", "day", "meal", "was", "felt", "quite", "very", "so"]
MOOD = {"pos": "good", "neg": "bad", "mid": "meh"}
MIX = ["pos"] * 5 + ["neg"] * 3 + ["mid"] * 2


def _labels(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(MIX) for _ in range(n)]


def _records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(MIX)
        words = rng.choices(FILL, k=rng.randint(2, 5))
        words.insert(rng.randint(0, len(words)), MOOD[label])
        rows.append({"text": " ".join(words), "label": label, "doc": f"d{i // 3}"})  # three records per document
    return rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------- assignment
def test_stratified_folds_match_scikit_learn_in_spirit():
    labels = _labels(0, 203)
    folds = stratified_folds(labels, 5, seed=3)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4] and len(folds) == len(labels)
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    ours = {c: sorted(Counter(f for f, y in zip(folds, labels) if y == c).values()) for c in MOOD}
    assert all(max(v) - min(v) <= 1 for v in ours.values()), ours
    # scikit-learn deals each class over the folds as evenly: the same multiset of per-fold counts per class.
    y = np.array(labels)
    sk = {c: sorted(int((y[val] == c).sum()) for _, val in StratifiedKFold(5, shuffle=True, random_state=0).split(y, y))
          for c in MOOD}
    assert ours == sk
    assert stratified_folds(labels, 5, seed=3) == folds  # the seed decides
    assert stratified_folds(labels, 5, seed=4) != folds


def _class_share_spread(labels, folds, k):
    """Mean over classes of the standard deviation over folds of the fold's share of that class."""
    y, f = np.array(labels), np.array(folds)
    return float(np.mean([np.std([((y == c) & (f == j)).sum() / (y == c).sum() for j in range(k)]) for c in set(labels)]))


def test_grouped_folds_keep_groups_whole_and_balanced():
    rng = random.Random(1)
    labels, groups = [], []
    for g in range(60):  # groups of 1 to 8 records, each leaning to one class
        lean = rng.choice(MIX)
        for _ in range(rng.randint(1, 8)):
            labels.append(lean if rng.random() < 0.8 else rng.choice(MIX))
            groups.append(f"g{g}")
    folds = grouped_folds(labels, groups, 4, seed=0)
    where: dict[str, set[int]] = {}
    for g, f in zip(groups, folds):
        where.setdefault(g, set()).add(f)
    assert all(len(fs) == 1 for fs in where.values())  # no group in two folds
    assert sorted(set(folds)) == [0, 1, 2, 3]
    sizes = Counter(folds).values()
    assert max(sizes) - min(sizes) <= 0.1 * len(labels)
    # About as even as scikit-learn's StratifiedGroupKFold (a different greedy rule, so not the same folds).
    sk = np.empty(len(labels), dtype=int)
    for j, (_, val) in enumerate(StratifiedGroupKFold(4, shuffle=True, random_state=0).split(labels, labels, groups)):
        sk[val] = j
    assert _class_share_spread(labels, folds, 4) <= _class_share_spread(labels, sk, 4) + 0.02
    assert grouped_folds(labels, groups, 4, seed=0) == folds
    assert grouped_folds(labels, groups, 4, seed=1) != folds


def test_assignment_refusals_name_the_cause():
    labels = ["a"] * 10 + ["b"] * 2
    with pytest.raises(HainaError, match=r"--folds 3 is more than the 2 examples of class 'b'"):
        assign_folds(labels, 3, 0)
    with pytest.raises(HainaError, match=r"--group-field doc gives 2 groups, fewer than --folds 3"):
        assign_folds(["a", "b"] * 3, 3, 0, groups=["x", "y"] * 3, group_field="doc")
    with pytest.raises(HainaError, match=r"1 example of class 'c', the smallest; .* give it more examples"):
        assign_folds([*labels, "c"], 2, 0)
    with pytest.raises(HainaError, match=r"gives 1 group, fewer than --folds 2; group by a field with more values"):
        assign_folds(labels, 2, 0, groups=["x"] * 12, group_field="source")
    assert len(assign_folds(labels, 2, 0)) == 12


def test_summarize_is_numpy():
    s = summarize([0.5, 0.75, None, 0.9])
    assert s["mean"] == pytest.approx(np.mean([0.5, 0.75, 0.9]))
    assert s["std"] == pytest.approx(np.std([0.5, 0.75, 0.9], ddof=1))
    assert s["folds"] == [0.5, 0.75, None, 0.9] and summarize([None])["mean"] is None


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfold")
    tok = train_bpe([" ".join(FILL + list(MOOD.values())) * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "base", Transformer(cfg), tok)
    _jsonl(root / "train.jsonl", _records(0, 90) + [{"text": "good day", "doc": "x"}])  # one record without a label
    _jsonl(root / "test.jsonl", _records(1, 24))
    return root


def _args(files, out, *extra):
    return ["finetune", "classify", "--base", str(files / "base"), "--data", str(files / "train.jsonl"),
            "--out", str(out), "--train.max_steps=4", "--train.batch_size=8", "--train.lr=3e-3",
            "--train.warmup_steps=1", "--train.eval_every=4", "--train.save_every=4", "--train.device=cpu",
            "--train.tensorboard=false", *extra]


def test_three_folds_end_to_end(files, tmp_path):
    out = tmp_path / "cv"
    assert main(_args(files, out, "--folds", "3")) == 0
    assert read_manifest(out)["command"] == "finetune classify --folds"
    report = json.loads((out / "report.json").read_text())
    assert report["folds"] == 3 and report["evaluated_on"] == "val" and "validation fold" in report["scored"]
    assert report["data"]["rejected"] == 1 and (out / "rejects.jsonl").is_file()
    folds = [json.loads((out / f"fold-{j}" / "report.json").read_text()) for j in (1, 2, 3)]
    for j, fold in enumerate(folds, 1):
        assert read_manifest(out / f"fold-{j}")["command"] == "finetune classify"
        assert fold["evaluated_on"] == "val" and fold["labels"] == ["mid", "neg", "pos"]
    assert sum(f["evaluated_examples"] for f in folds) == 90  # every example validated once
    for name in METRICS:
        values = [f[f"{f['evaluated_on']}_loss" if name == "loss" else name] for f in folds]
        if any(v is None for v in values):
            continue
        agg = report["metrics"][name]
        assert agg["folds"] == pytest.approx(values)
        assert agg["mean"] == pytest.approx(np.mean(values)) and agg["std"] == pytest.approx(np.std(values, ddof=1))
    md = (out / "report.md").read_text()
    assert all(f"| fold-{j} |" in md for j in (1, 2, 3)) and "| mean ± std |" in md
    model, _ = load_classifier(out / "fold-2")  # a fold is an ordinary run
    assert model.predict_proba(["good film"]).shape == (1, 3)

    # Again over the same OUT, without --overwrite: grouped, with a shared test split, LoRA and the imbalance options.
    assert main(_args(files, out, "--folds", "3", "--group-field", "doc", "--test", str(files / "test.jsonl"),
                      "--lora.r=4", "--class-weights", "auto", "--loss", "focal", "--sampling", "over",
                      "--classify.select_metric=macro_f1")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated_on"] == "test" and report["split"]["group_field"] == "doc" and report["lora"]
    assert report["imbalance"] == {"class_weights": "auto", "loss": "focal", "sampling": "over", "focal_gamma": 2.0}
    docs = [{json.loads(line)["doc"] for line in (out / "splits" / f"fold-{j}.jsonl").read_text().splitlines()}
            for j in (1, 2, 3)]
    assert not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])  # no document straddles folds
    for j in (1, 2, 3):
        fold = json.loads((out / f"fold-{j}" / "report.json").read_text())
        assert fold["evaluated_on"] == "test" and fold["evaluated_examples"] == 24 and fold["lora"]
        assert fold["selection"]["metric"] == "macro_f1" and fold["imbalance"]["sampling"] == "over"
        assert report["metrics"]["macro_f1"]["folds"][j - 1] == pytest.approx(fold["macro_f1"])


def _fails(capsys, args, out, *needles):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # nothing written


def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "cv"
    small = _jsonl(tmp_path / "small.jsonl", _records(0, 90) + [{"text": "so angry", "label": "angry"}] * 2)
    args = _args(files, out)
    _fails(capsys, [*args[:5], str(small), *args[6:], "--folds", "3"], out,
           "--folds 3 is more than the 2 examples of class 'angry'")
    _fails(capsys, [*args, "--folds", "1"], out, "--folds 1", "at least 2 folds")
    _fails(capsys, [*args, "--folds", "-2"], out, "--folds -2")
    _fails(capsys, [*args, "--folds", "3", "--multi-label"], out, "--multi-label")
    _fails(capsys, [*args, "--group-field", "doc"], out, "needs --folds")
    # Every tenth record has no document: counted (a record rejected for its label would not be).
    gaps = _jsonl(tmp_path / "gaps.jsonl", [{k: v for k, v in r.items() if k != "doc" or i % 10}
                                            for i, r in enumerate(_records(0, 90))])
    _fails(capsys, [*args[:5], str(gaps), *args[6:], "--folds", "3", "--group-field", "doc"], out,
           "--group-field doc: 9 of 90 records have no 'doc'")
    few = _jsonl(tmp_path / "few.jsonl", [{**r, "doc": f"d{i % 3}"} for i, r in enumerate(_records(0, 90))])
    _fails(capsys, [*args[:5], str(few), *args[6:], "--folds", "5", "--group-field", "doc"], out,
           "--group-field doc gives 3 groups, fewer than --folds 5")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(_args(files, foreign, "--folds", "3")) == 2
    assert "not a haina output" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep"


def test_a_stopped_fold_stops_the_folds_and_resume_continues(files, tmp_path, monkeypatch, capsys):
    """Ctrl-C in fold 2 ends the k-fold run there (the trainer saves and returns); --resume runs every fold again
    from its own checkpoint, with the same folds. Fold runs are stood in for: this is about the driver's wiring."""
    from haina.finetune import classify

    seen = []

    def fake(cfg, overwrite=False):
        seen.append(cfg)
        j = int(cfg.out.rsplit("-", 1)[1])
        stop = "SIGINT" if j == 2 and not cfg.train.resume else "max_steps"
        return {"evaluated_on": "test", "evaluated_examples": 24, "test_loss": 1.0 / j, "accuracy": 0.5 + j / 10,
                "macro_f1": 0.4 + j / 20, "labels": ["mid", "neg", "pos"], "stopped_because": stop,
                "per_class": {"pos": {"f1": 0.5}}}

    monkeypatch.setattr(classify, "run_classify", fake)
    out = tmp_path / "cv"
    test = ["--test", str(files / "test.jsonl")]
    assert main(_args(files, out, "--folds", "3", *test)) == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["complete"] and report["stopped_because"] == "SIGINT" and report["finished_folds"] == 1
    assert report["metrics"]["accuracy"]["folds"] == [pytest.approx(0.6)] and len(seen) == 2
    assert "stopped by SIGINT after 1" in capsys.readouterr().out

    seen.clear()
    assert main(_args(files, out, "--folds", "3", "--resume", *test)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["metrics"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert report["metrics"]["loss"]["folds"] == pytest.approx([1.0, 0.5, 1 / 3])
    splits = out / "splits"
    for j, cfg in enumerate(seen, 1):
        assert cfg.train.resume and cfg.out == str(out / f"fold-{j}")
        assert cfg.data.val == (str(splits / f"fold-{j}.jsonl"),)
        assert sorted(cfg.data.train) == sorted(str(splits / f"fold-{i}.jsonl") for i in (1, 2, 3) if i != j)
        assert cfg.classify.test == (str(splits / "test.jsonl"),) and cfg.classify.test_fraction == 0
    capsys.readouterr()
    assert main(_args(files, out, "--folds", "3", "--resume", "--train.seed=7", *test)) == 2  # other folds
    assert "its folds differ" in capsys.readouterr().err


def test_tune_over_k_fold_trials(files, tmp_path):
    """`haina tune --command "finetune classify" --folds 2`: each trial a k-fold run, valued by its folds' mean."""
    pytest.importorskip("optuna")
    import csv

    space = tmp_path / "space.yaml"
    space.write_text("train.warmup_steps: [1, 2]\n")
    out = tmp_path / "tune"
    args = _args(files, out, "--folds=2")[2:]  # the classify flags without "finetune classify"
    flags = [a for a in args if a not in ("--out", str(out), "--train.warmup_steps=1")]
    assert main(["tune", "--command", "finetune classify", "--space", str(space), "--trials", "2", "--out",
                 str(out), "--objective", "macro_f1", "--sampler", "grid", *flags]) == 0
    with open(out / "trials.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for r in rows:
        run = out / "trials" / f"trial-{int(r['number']):04d}"
        report = json.loads((run / "report.json").read_text())
        assert report["folds"] == 2 and (run / "fold-2" / "report.json").is_file()
        assert float(r["value"]) == pytest.approx(report["metrics"]["macro_f1"]["mean"])
