"""`haina classify`: one JSON object per input, in input order, streamed a chunk at a time."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from haina.cli import main
from haina.finetune import predict
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer.train import train_bpe

FILL = ["the", "a", "film", "day", "meal", "story", "was", "felt", "seemed", "quite", "very", "really", "so", "and"]
MOOD = {"pos": "good", "neg": "bad", "mid": "meh"}


def _records(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["pos"] * 6 + ["neg"] * 3 + ["mid"])
        words = rng.choices(FILL, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), MOOD[label])
        out.append({"id": f"r{i}", "text": " ".join(words), "label": label})
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tok = train_bpe([" ".join(FILL + list(MOOD.values())) * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=64, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False)
    save_model(root / "base", Transformer(cfg), tok)
    data = _jsonl(root / "train.jsonl", _records(0, 240))
    assert main(["finetune", "classify", "--base", str(root / "base"), "--data", str(data), "--out", str(root / "run"),
                 "--train.max_steps=40", "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=5",
                 "--train.eval_every=20", "--train.save_every=20", "--train.device=cpu",
                 "--train.tensorboard=false"]) == 0
    return root


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_in_order_with_probabilities(run, tmp_path, monkeypatch):
    rows = _records(5, 50)
    rows[7] = {"id": "no-text", "body": "good"}  # still gets its line, saying why
    src = _jsonl(tmp_path / "in.jsonl", rows)
    assert main(["classify", "--checkpoint", str(run / "run"), "--input", str(src), "--out", str(tmp_path / "a.jsonl"),
                 "--batch-size", "4"]) == 0
    out = _lines(tmp_path / "a.jsonl")
    assert [o["id"] for o in out] == [r["id"] for r in rows]
    assert out[7]["label"] is None and "no 'text' field" in out[7]["error"]
    scored = [(o, r) for o, r in zip(out, rows, strict=True) if "error" not in o]
    for o, _ in scored:
        assert set(o["probabilities"]) == {"mid", "neg", "pos"}
        assert sum(o["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
    assert sum(o["label"] == r["label"] for o, r in scored) >= 0.9 * len(scored)

    # Streaming: tiny chunks give the same lines as one big chunk.
    monkeypatch.setattr(predict, "CHUNK", 3)
    assert main(["classify", "--checkpoint", str(run / "run"), "--input", str(src), "--out", str(tmp_path / "b.jsonl"),
                 "--batch-size", "2"]) == 0
    small = _lines(tmp_path / "b.jsonl")
    assert [o["label"] for o in small] == [o["label"] for o in out]
    for a, b in zip(small, out, strict=True):
        if a["probabilities"] is not None:
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_text_txt_and_parquet_inputs(run, tmp_path, capsys):
    assert main(["classify", "--checkpoint", str(run / "run"), "--text", "a really good meal"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["label"] == "pos"
    (tmp_path / "in.txt").write_text("so bad\nthe meh day\n\nvery good\n")
    assert main(["classify", "--checkpoint", str(run / "run"), "--input", str(tmp_path / "in.txt")]) == 0
    labels = [json.loads(x)["label"] for x in capsys.readouterr().out.splitlines()]
    assert len(labels) == 4 and labels[0] == "neg" and labels[1] == "mid" and labels[3] == "pos"
    pq.write_table(pa.Table.from_pylist([{"body": "good film"}, {"body": "bad film"}]), tmp_path / "in.parquet")
    assert main(["classify", "--checkpoint", str(run / "run"), "--input", str(tmp_path / "in.parquet"),
                 "--text-field", "body"]) == 0
    assert [json.loads(x)["label"] for x in capsys.readouterr().out.splitlines()] == ["pos", "neg"]


def test_one_line_errors(run, tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"body": "good"}])
    cases = [
        (["--checkpoint", str(run / "base"), "--text", "x"], "has no classifier head"),
        (["--checkpoint", str(run / "run")], "give one of --text"),
        (["--checkpoint", str(run / "run"), "--input", str(src)], "--text-field"),
        (["--checkpoint", str(run / "run"), "--input", str(src), "--out", str(src)], "is the --input file"),
    ]
    for args, message in cases:
        assert main(["classify", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert src.read_text() == '{"body": "good"}\n'
