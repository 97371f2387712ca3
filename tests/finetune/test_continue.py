"""`haina finetune continue`: new data learned, forgetting reported, replay mixed in proportion, exact resume."""

import inspect
import json
import shlex
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from haina.cli import main
from haina.data.shards import TokenShards
from haina.data.tokenize import tokenize_to_shards
from haina.finetune.continued import ReplayMix
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import read_weights, save_model
from haina.tokenizer import EOT
from haina.tokenizer.train import train_bpe
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer

BLOCK = 32


def old_documents(chars: int = 60_000) -> list[str]:
    """The 'original' data: the language reference that ships with Python (pydoc topics), one document each."""
    from pydoc_data.topics import topics

    docs, n = [], 0
    for key in sorted(topics):
        docs.append(topics[key])
        n += len(topics[key])
        if n >= chars:
            break
    return docs


def new_documents() -> list[str]:
    """The 'new' data: Python source code, a different distribution, cut at blank lines into documents."""
    source = "".join(inspect.getsource(m) for m in (textwrap, json.decoder, string, shlex))
    docs, current = [], ""
    for part in source.split("\n\n"):
        current += part + "\n\n"
        if len(current) > 1500:
            docs.append(current)
            current = ""
    return docs + ([current] if current else [])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models this small gain nothing from more threads, and on a busy machine torch's threads wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer of both corpora, their shards, a base model trained briefly on the old data, and foreign shards."""
    root = tmp_path_factory.mktemp("continue")
    old, new = old_documents(), new_documents()
    tok = train_bpe(old + new, vocab_size=320, special_tokens=(EOT,))
    tokenize_to_shards(old, tok, root / "old", val_fraction=0.1)
    tokenize_to_shards(new, tok, root / "new", val_fraction=0.1)
    other = train_bpe(new, vocab_size=300, special_tokens=(EOT,))
    tokenize_to_shards(new, other, root / "foreign", val_fraction=0.1)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(batch_size=8, block_size=BLOCK, max_steps=40, warmup_steps=5, lr=3e-3, min_lr=3e-4,
                      eval_every=1000, save_every=0, tensorboard=False, device="cpu", log_every=100)
    Trainer(model, cfg, root / "pretrain", train_data=TokenShards(root / "old", "train"), tokenizer=tok).fit()
    save_model(root / "base", model, tok)
    return root


def continue_args(world: Path, out: Path, *more: str, data: str = "new") -> list[str]:
    return ["finetune", "continue", "--base", str(world / "base"), "--data", str(world / data), "--out", str(out),
            "--train.max_steps=30", "--train.batch_size=8", "--train.warmup_steps=5", "--train.lr=3e-3",
            "--train.min_lr=3e-4", "--train.eval_every=10", "--train.eval_batches=4", "--train.device=cpu",
            "--train.tensorboard=false", "--train.save_every=0", *more]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_new_data_is_learned_and_forgetting_is_reported(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(continue_args(world, out, "--replay", str(world / "old"), "--replay-fraction", "0.25")) == 0
    forgetting = report(out)["forgetting"]
    new, old = forgetting["new"], forgetting["old"]
    assert new["after"] < new["before"] - 0.3, new
    assert all(isinstance(v, float) for v in (old["before"], old["after"]))
    assert old["before"] < new["before"]  # the base was trained on the old data
    assert report(out)["data"]["replay_rows_per_batch"] == 2
    printed = capsys.readouterr().out
    assert "forgetting, val loss before → after: new data" in printed and "old data" in printed


def test_without_replay_old_is_null_and_lora_checkpoints_hold_adapters(world, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(continue_args(world, out, "--lora.r=4", "--train.max_steps=4")) == 0
    r = report(out)
    assert r["lora"] is True and r["forgetting"]["old"] is None
    assert r["forgetting"]["new"]["after"] is not None
    ckpt = Path(r["checkpoint"])
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").is_file()
    assert "old data not measured" in capsys.readouterr().out


class Tagged:
    """Rows filled with one tag, each drawn from the generator, so draws and their order show."""

    def __init__(self, tag: int):
        self.tag = tag

    def get_batch(self, batch_size, block_size, generator):
        draw = torch.randint(1000, (batch_size, 1), generator=generator)
        x = torch.full((batch_size, block_size), self.tag) + 0 * draw
        return x, draw.expand(batch_size, block_size)


@pytest.mark.parametrize(("batch_size", "fraction", "replayed"), [(8, 0.25, 2), (10, 0.3, 3), (4, 0.5, 2), (7, 0.0, 0)])
def test_replay_takes_its_share_of_every_batch(batch_size, fraction, replayed):
    mix = ReplayMix(Tagged(1), Tagged(2), fraction)
    x, y = mix.get_batch(batch_size, 5, torch.Generator().manual_seed(0))
    assert x[:, 0].tolist() == [1] * (batch_size - replayed) + [2] * replayed
    # All randomness from the generator: the same state draws the same batch, the next draw another.
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mix.get_batch(batch_size, 5, g)[1], y)
    assert not torch.equal(mix.get_batch(batch_size, 5, g)[1], y)


def test_replay_rows_come_from_the_old_shards(world):
    new, old = TokenShards(world / "new", "train"), TokenShards(world / "old", "train")
    x, y = ReplayMix(new, old, 0.25).get_batch(8, BLOCK, torch.Generator().manual_seed(3))

    def windows(shards):
        ids = np.concatenate([shards.window(0, len(shards))])
        return torch.from_numpy(np.lib.stride_tricks.sliding_window_view(ids, BLOCK).copy())

    def found(row, table):
        return bool((table == row).all(dim=1).any())

    new_w, old_w = windows(new), windows(old)
    assert [found(r, new_w) for r in x] == [True] * 6 + [False] * 2
    assert [found(r, old_w) for r in x] == [False] * 6 + [True] * 2
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(("more", "data", "expected"), [
    ((), "foreign", "was tokenized with another tokenizer"),
    (("--replay", "OLD", "--replay-fraction", "0.05"), "new", "replay rows"),
    (("--replay-fraction", "0.25"), "new", "needs the original data's shards"),
])
def test_bad_inputs_are_one_line(world, tmp_path, capsys, more, data, expected):
    more = tuple(str(world / "old") if m == "OLD" else m for m in more)
    assert main(continue_args(world, tmp_path / "run", *more, data=data)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def test_resume_equals_an_uninterrupted_run(world, tmp_path):
    replay = ("--replay", str(world / "old"), "--replay-fraction", "0.25", "--train.decay_steps=8")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(continue_args(world, straight, *replay, "--train.max_steps=8")) == 0
    assert main(continue_args(world, stopped, *replay, "--train.max_steps=4")) == 0
    assert main(continue_args(world, stopped, *replay, "--train.max_steps=8", "--resume")) == 0
    a, b = report(straight), report(stopped)
    assert b["steps"] == 8 and b["steps_this_run"] == 4
    wa, wb = (read_weights(Path(r["checkpoint"]) / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed run's weights differ from the uninterrupted run's"
    assert a["val_loss"] == b["val_loss"] and a["forgetting"] == b["forgetting"]
