"""No command destroys what haina did not make (issue 10 §1), through the real command line.

The reproduced cases first (each deleted user files before), then every command that writes a
directory against an --out that is its input, an ancestor of its input, a stranger's directory
and a file: the command must refuse with exit code 2 and one line on stderr, and every byte under
the workspace must be exactly as it was. Last, what must still work: a command replaces its own
earlier output, and --overwrite replaces a stranger's directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from haina.core.output import MANIFEST, read_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = ["river", "mill", "town", "children", "ball", "water", "parents", "weather", "harvest", "baker", "bread",
         "evening", "lamps", "summer", "mayor", "letters", "villages", "travellers", "stories", "mountains", "north",
         "week", "morning", "autumn", "fields", "golden"]


def haina(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, check=False)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under `root`, hidden ones included, by relative path."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = Path(dirpath, f)
            out[os.path.relpath(p, root)] = p.read_bytes()
    return out


def make_stranger(path: Path) -> Path:
    """A user's directory: files and nested directories, one of them named like an output's."""
    (path / "src" / "deep").mkdir(parents=True)
    (path / "train").mkdir()
    (path / "notes.md").write_text("my notes, not haina's\n")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "src" / "deep" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (path / "train" / "a.jsonl").write_text('{"text": "a document of my own"}\n')
    return path


def write_corpus(d: Path, n: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    (d / "train").mkdir(parents=True)
    for part in range(2):
        docs = [{"text": "The " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 40))) + " and the end.",
                 "label": rng.choice(["pos", "neg"])} for _ in range(n // 2)]
        (d / "train" / f"part{part}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: proj/ holds every command's inputs, beside a stranger's directory and a file."""
    import torch

    from haina.data.prepare.command import PrepareConfig, prepare_documents
    from haina.data.tokenize import tokenize_command
    from haina.export.hf import export_hf
    from haina.model import ModelConfig, Transformer
    from haina.model.checkpoint import save_model
    from haina.tokenizer import Tokenizer
    from haina.tokenizer.train import train_command

    root = tmp_path_factory.mktemp("ws")
    proj = root / "proj"
    write_corpus(proj / "corpus")
    prepare_documents([str(proj / "corpus")], proj / "prepared",
                      PrepareConfig(workers=1, filters=(), dedup=(), val_fraction=0.2))
    train_command([str(proj / "corpus")], str(proj / "tok"), vocab_size=300)
    tokenize_command([str(proj / "corpus")], str(proj / "tok"), str(proj / "shards"), workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16))
    tok = Tokenizer.load(proj / "tok")
    save_model(proj / "ckpt", model, tok)
    export_hf(model, tok, proj / "hf")
    (root / "tiny.yaml").write_text(
        "model: {preset: tiny, vocab_size: 320, block_size: 16, n_layer: 1, n_head: 2, n_embd: 16}\n"
        "train: {batch_size: 2, max_steps: 2, warmup_steps: 0, eval_every: 1, eval_batches: 1, save_every: 0,\n"
        "        device: cpu, tensorboard: false}\n")
    make_stranger(root / "stranger")
    (root / "file.txt").write_text("a file, not a directory\n")
    return root


def command_args(ws: Path, command: str, out: Path) -> list:
    """The command line of `command` on the workspace's inputs, writing `out`."""
    proj = ws / "proj"
    args = {
        "data prepare": ["data", "prepare", "--input", proj / "corpus", "--workers", "1"],
        "data augment": ["data", "augment", "--input", proj / "prepared"],
        "data tokenize": ["data", "tokenize", "--input", proj / "corpus", "--tokenizer", proj / "tok",
                          "--workers", "1"],
        "tokenizer train": ["tokenizer", "train", "--input", proj / "corpus", "--vocab-size", "300"],
        "export hf": ["export", "hf", "--checkpoint", proj / "ckpt"],
        "import hf": ["import", "hf", "--path", proj / "hf"],
        "pretrain": ["pretrain", "--config", ws / "tiny.yaml", "--data", proj / "shards"],
        "quickstart": ["quickstart", "--max-minutes", "1"],
    }[command]
    return [*args, "--out", out]


def command_input(ws: Path, command: str) -> Path | None:
    """The input directory of `command` in the workspace (None for quickstart, which has none)."""
    proj = ws / "proj"
    return {"data prepare": proj / "corpus", "data augment": proj / "prepared", "data tokenize": proj / "corpus",
            "tokenizer train": proj / "corpus", "export hf": proj / "ckpt", "import hf": proj / "hf",
            "pretrain": proj / "shards", "quickstart": None}[command]


WITH_INPUTS = ["data prepare", "data augment", "data tokenize", "tokenizer train", "export hf", "import hf", "pretrain"]
CASES = [(c, t, o) for c in WITH_INPUTS for t in ("input", "ancestor", "file") for o in (False, True)]
CASES += [(c, "stranger", False) for c in WITH_INPUTS]
CASES += [("data tokenize", "tokenizer", o) for o in (False, True)]  # its second input
CASES += [("quickstart", t, False) for t in ("stranger", "file")] + [("quickstart", "file", True)]


def assert_refused(r: subprocess.CompletedProcess, *, names_overwrite: bool) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: --out "), r.stderr[-2000:]
    assert ("--overwrite" in lines[0]) == names_overwrite, lines[0]


@pytest.mark.parametrize("command, target, overwrite", CASES)
def test_no_command_replaces_an_input_a_stranger_or_a_file(ws, command, target, overwrite):
    """The property: whatever --out points at that is not the command's, every byte stays where it was."""
    out = {"input": command_input(ws, command), "ancestor": ws / "proj", "stranger": ws / "stranger",
           "file": ws / "file.txt", "tokenizer": ws / "proj" / "tok"}[target]
    args = command_args(ws, command, out)
    before = tree(ws)
    r = haina(*args, *(["--overwrite"] if overwrite else []))
    assert tree(ws) == before  # nothing removed, changed or added (no temporary directory left behind)
    assert_refused(r, names_overwrite=target == "stranger")


# --------------------------------------------------------------------------------------- the reproduced cases
def test_export_hf_keeps_a_project_folder_that_has_a_config_json(ws, tmp_path):
    proj = make_stranger(tmp_path / "my-project")  # it has a config.json, as a Hugging Face directory does
    before = tree(tmp_path)
    r = haina("export", "hf", "--checkpoint", ws / "proj" / "ckpt", "--out", proj)
    assert tree(tmp_path) == before
    assert_refused(r, names_overwrite=True)


def test_prepare_into_the_parent_of_its_input_keeps_the_input(tmp_path):
    write_corpus(tmp_path / "raw")
    (tmp_path / "raw" / "val").mkdir()
    (tmp_path / "raw" / "val" / "b.jsonl").write_text('{"text": "held out by hand"}\n')
    before = tree(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        r = haina("data", "prepare", "--input", tmp_path / "raw" / "train", "--out", tmp_path / "raw", "--workers",
                  "1", *overwrite)
        assert tree(tmp_path) == before
        assert_refused(r, names_overwrite=False)
        assert "contains the input" in r.stderr


def test_augment_into_its_input_keeps_the_input(tmp_path):
    write_corpus(tmp_path / "raw")
    r = haina("data", "prepare", "--input", tmp_path / "raw", "--out", tmp_path / "P", "--filters", "none",
              "--dedup", "none", "--workers", "1", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "P" / "val").iterdir())
    before = tree(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        r = haina("data", "augment", "--input", tmp_path / "P", "--out", tmp_path / "P", *overwrite)
        assert tree(tmp_path) == before
        assert_refused(r, names_overwrite=False)
        assert "is the input" in r.stderr


# --------------------------------------------------------------------------------------- what still works
REPLACING = ["data prepare", "data augment", "data tokenize", "tokenizer train", "export hf", "import hf"]


@pytest.mark.parametrize("command", REPLACING)
def test_a_command_replaces_its_own_earlier_output(ws, tmp_path, command):
    out = tmp_path / "out"
    args = command_args(ws, command, out)
    r = haina(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(out)["command"] == command
    (out / "stale.txt").write_text("from an earlier run")
    r = haina(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "stale.txt").exists() and read_manifest(out)["command"] == command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no working or old directory left beside


@pytest.mark.parametrize("command", REPLACING)
def test_overwrite_replaces_a_strangers_directory(ws, tmp_path, command):
    out = make_stranger(tmp_path / "theirs")
    args = command_args(ws, command, out)
    r = haina(*args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "notes.md").exists() and (out / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_another_commands_output_is_not_replaced_without_overwrite(ws, tmp_path):
    """A haina output of another kind is someone's work too: `tokenizer train` must not replace a `data prepare`."""
    r = haina("data", "prepare", "--input", ws / "proj" / "corpus", "--out", tmp_path / "out", "--workers", "1")
    assert r.returncode == 0, r.stderr
    before = tree(tmp_path)
    r = haina("tokenizer", "train", "--input", ws / "proj" / "corpus", "--out", tmp_path / "out")
    assert tree(tmp_path) == before
    assert_refused(r, names_overwrite=True)
    assert "'haina data prepare'" in r.stderr


def test_interrupted_prepare_leaves_the_earlier_output_whole_and_resumes(tmp_path, monkeypatch):
    """The working state lives beside --out: a crash leaves the previous output as it was, --resume finishes."""
    from haina.data.prepare import pipeline
    from haina.data.prepare.command import PrepareConfig, prepare_documents

    write_corpus(tmp_path / "raw")
    out, cfg = tmp_path / "out", PrepareConfig(workers=1, val_fraction=0.2)
    prepare_documents([str(tmp_path / "raw")], out, cfg)
    before = tree(out)
    (tmp_path / "raw" / "train" / "part2.jsonl").write_text('{"text": "The late addition to the corpus, a document '
                                                            'long enough to pass every filter there is today."}\n')
    real = pipeline.process_unit

    def crash_on_last(unit, uid, *args):
        if uid == "00002":
            raise KeyboardInterrupt
        return real(unit, uid, *args)

    monkeypatch.setattr(pipeline, "process_unit", crash_on_last)
    with pytest.raises(KeyboardInterrupt):
        prepare_documents([str(tmp_path / "raw")], out, cfg)
    assert tree(out) == before
    assert sorted(p.name for p in (tmp_path / ".out.haina-partial" / "_done").iterdir()) == ["00000.json", "00001.json"]
    monkeypatch.setattr(pipeline, "process_unit", real)
    report = prepare_documents([str(tmp_path / "raw")], out, cfg, resume=True)
    assert report["documents"]["in"] == 61 and json.loads((out / "report.json").read_text())["documents"] == report["documents"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]
