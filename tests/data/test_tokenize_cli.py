"""`haina tokenizer train` and `haina data tokenize` end to end, through a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from haina.data.shards import TokenShards
from haina.tokenizer import Tokenizer


def _haina(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], check=False, capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _corpus(tmp_path) -> Path:
    """200,000 characters of Python's own documentation: varied enough for a 400-token BPE, and always there."""
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(topics[key] for key in sorted(topics))[:200_000], encoding="utf-8")
    return corpus


def test_train_and_tokenize(tmp_path):
    corpus = _corpus(tmp_path)
    r = _haina("tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 400
    text = corpus.read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text

    r = _haina("data", "tokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out",
               str(tmp_path / "data"), "--val-fraction", "0.1", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stderr and "tokens/s" in r.stderr  # the one-line summary
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tok.hash() and meta["split_method"] == "tail"
    train, val = TokenShards(tmp_path / "data", "train"), TokenShards(tmp_path / "data", "val")
    ids = np.concatenate([train.window(0, len(train)), val.window(0, len(val))]).tolist()
    assert ids == tok.encode(text) + [tok.eos_id]
    assert abs(len(val) / len(ids) - 0.1) < 0.01


def test_char_tokenizer_and_prepare_split_via_cli(tmp_path):
    prepared = tmp_path / "prepared"
    (prepared / "train").mkdir(parents=True)
    (prepared / "val").mkdir()
    (prepared / "report.json").write_text("{}")
    (prepared / "train" / "00000.jsonl").write_text("".join(json.dumps({"text": f"train doc {i}"}) + "\n"
                                                            for i in range(30)))
    (prepared / "val" / "00000.jsonl").write_text(json.dumps({"text": "the val doc"}) + "\n")
    r = _haina("tokenizer", "train", "--input", str(prepared / "train"), "--out", str(tmp_path / "tok"),
               "--kind", "char")
    assert r.returncode == 0, r.stderr
    r = _haina("data", "tokenize", "--input", str(prepared), "--tokenizer", str(tmp_path / "tok"), "--out",
               str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["split_method"] == "given"
    assert meta["splits"]["train"]["documents"] == 30 and meta["splits"]["val"]["documents"] == 1
    tok = Tokenizer.load(tmp_path / "tok")
    val = TokenShards(tmp_path / "data", "val")
    # 'h', 'e', 'v' and 'l' never occur in training: the char tokenizer maps them to <|unk|> rather than failing.
    unk = "<|unk|>"
    assert tok.decode(val.window(0, len(val)).tolist()) == f"t{unk}{unk} {unk}a{unk} doc<|endoftext|>"


def test_errors_are_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    r = _haina("data", "tokenize", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "none"),
               "--out", str(tmp_path / "data"))
    assert r.returncode == 2 and "error:" in r.stderr and "tokenizer" in r.stderr
    assert "Traceback" not in r.stderr
    r = _haina("tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "tok"))
    assert r.returncode == 2 and "error: input not found" in r.stderr and "Traceback" not in r.stderr
    r = _haina("tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "tok"),
               "--vocab-size", "100")
    assert r.returncode == 2 and "too small" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tok").exists() and not (tmp_path / "data").exists()
