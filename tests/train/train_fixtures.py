"""Helpers for the training tests: shard directories written by a tiny numpy writer, a char tokenizer."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from haina.tokenizer import EOT, Tokenizer

# The training tests' text: the language reference that ships with Python (pydoc topics), folded onto a fixed
# alphabet. Nothing beside the checkout is read, so a bare clone trains on the same kind of text as a dev machine.
# 59 characters plus EOT = 60 tokens on every Python version: the tests' models have vocab_size 64, and the CLI
# test's "small-vocab" case names that count.
ALPHABET = string.ascii_lowercase + string.digits + " \n" + ".,:;!?'\"()[]<>_*=+-/|"
FOLD = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u2026": "..."}


def sample_text(chars: int = 60_000) -> str:
    """Real prose, `chars` long: Python's own documentation lowercased onto ALPHABET, each character of which occurs."""
    from pydoc_data.topics import topics  # a dict of strings; imports nothing else

    pieces, n = [], 0
    for key in sorted(topics):
        text = "".join(c if c in ALPHABET else FOLD.get(c, "") for c in topics[key].lower())
        pieces.append(text)
        n += len(text)
        if n >= chars:
            break
    # The last line spells the alphabet, so the character set (and the vocabulary built from it) never depends on
    # which topics a Python version ships.
    return "".join(pieces)[: chars - len(ALPHABET) - 1] + "\n" + ALPHABET.replace("\n", "") + "\n"


def char_tokenizer(text: str) -> Tokenizer:
    """A character-level tokenizer: a BPE model with no merges over the text's characters, plus EOT."""
    vocab = {EOT: 0}
    for ch in sorted(set(text)):
        vocab.setdefault(ch, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()  # characters join without spaces
    tok.add_special_tokens([EOT])
    return Tokenizer(tok)


def write_shards(out: Path, splits: dict[str, np.ndarray], *, vocab_size: int, eos_id: int = 0,
                 dtype: str = "uint16", shard_tokens: int = 1 << 20, tokenizer_hash: str = "") -> Path:
    """Write the haina-shards/1 format: meta.json plus <split>-NNNNN.bin raw little-endian ids."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "haina-shards/1", "dtype": dtype, "vocab_size": vocab_size, "eos_id": eos_id,
            "tokenizer_hash": tokenizer_hash, "splits": {}}
    for split, ids in splits.items():
        ids = np.asarray(ids, dtype="<u2" if dtype == "uint16" else "<u4")
        names = []
        for i, start in enumerate(range(0, max(len(ids), 1), shard_tokens)):
            name = f"{split}-{i:05d}.bin"
            ids[start : start + shard_tokens].tofile(out / name)
            names.append(name)
        meta["splits"][split] = {"tokens": len(ids), "documents": int((ids == eos_id).sum()) + 1,
                                 "shards": names}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def text_dataset(root: Path, text: str | None = None, val_fraction: float = 0.1,
                 save_tokenizer: bool = True) -> tuple[Path, Tokenizer]:
    """Char-tokenize `text` into ROOT/data (train/val shards) with the tokenizer at ROOT/data/tokenizer."""
    text = sample_text() if text is None else text
    tok = char_tokenizer(text)
    ids = np.array(tok.encode(text), dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    data = write_shards(root / "data", {"train": ids[:-n_val], "val": ids[-n_val:]}, vocab_size=tok.vocab_size,
                        eos_id=tok.eos_id, shard_tokens=20_000, tokenizer_hash=tok.hash())
    if save_tokenizer:
        tok.save(data / "tokenizer")
    return data, tok


# ----------------------------------------------------------------- distributed jobs
# The tiny job of the torchrun tests (test_distributed, test_multinode, test_sharded_checkpoints, test_tp_pretrain):
# batch_size is per rank, so 2 ranks × 2 rows make the global batch of 4 that the one-process reference uses.
DIST_STEPS = 20
DIST_RECIPE = {
    "model": {"preset": "tiny", "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
              "dropout": 0.0},
    "data": {"dir": "unused"},
    "train": {"batch_size": 2, "max_steps": DIST_STEPS, "warmup_steps": 2, "lr": 3e-3, "eval_every": 100,
              "eval_batches": 1, "log_every": 1, "save_every": 0, "device": "cpu", "tensorboard": False, "seed": 7},
}


def recipe_setup(root: Path, recipe: dict) -> tuple[Path, Path, Path]:
    """(root, the text dataset's shard directory, the recipe written as ROOT/recipe.yaml)."""
    import yaml

    data, _ = text_dataset(root)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return root, data, path


def dist_env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a 2-core runner


def train_losses(run: Path) -> list[float]:
    """The logged training loss of every step of a run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_trajectory(a: Path, b: Path, steps: int = DIST_STEPS, tol: float = 1e-5) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == len(lb) == steps, (la, lb)
    worst = max(abs(x - y) for x, y in zip(la, lb))
    assert worst <= tol, f"loss trajectories differ by {worst:.3g}:\n{la}\n{lb}"


def one_process_run(setup: tuple[Path, Path, Path], name: str = "one", *overrides: str) -> Path:
    """The reference run: one process with the global batch of 4 rows (2 ranks × 2), in ROOT/NAME."""
    from haina.train.pretrain import load_pretrain_config, run_pretrain

    root, data, recipe = setup
    cfg = load_pretrain_config(str(recipe), data=str(data), out=str(root / name),
                               overrides=["train.batch_size=4", *overrides])
    run_pretrain(cfg, claim=True)
    return root / name
