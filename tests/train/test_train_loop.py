"""The training loop: bit-exact resume, gradient accumulation, learning, stopping, checkpoints."""

import json
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from train_fixtures import text_dataset

from haina.data.shards import TokenShards
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model
from haina.train import checkpoint as ckpt
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d, tok = text_dataset(tmp_path_factory.mktemp("shards"))
    return TokenShards(d, "train"), TokenShards(d, "val"), tok


def small_model(seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    cfg = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": dropout}
    return Transformer(ModelConfig(**{**cfg, **kw}))


def config(**kw):
    base = {"batch_size": 4, "block_size": 32, "max_steps": 8, "warmup_steps": 2, "eval_every": 3, "eval_batches": 2,
            "log_every": 2, "save_every": 0, "tensorboard": False, "device": "cpu", "seed": 5, "lr": 3e-3}
    return TrainConfig(**{**base, **kw})


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


class Crash(RuntimeError):
    pass


class CrashingTrainer(Trainer):
    """Dies at the start of step `crash_at`, like a preempted job."""

    crash_at = 6

    def train_step(self, lr):
        if self.step == self.crash_at:
            raise Crash(f"killed at step {self.step}")
        return super().train_step(lr)


class ScriptedEval(Trainer):
    """Validation losses from a script, to drive early stopping and best-checkpoint choice exactly."""

    script: ClassVar[list[float]] = []

    def evaluate(self):
        return self.script.pop(0) if self.script else 9.0


def test_resume_after_crash_is_bit_exact(data, tmp_path):
    train, val, tok = data
    cfg = config(grad_accum=2, save_every=4)
    straight = Trainer(small_model(dropout=0.1), cfg, tmp_path / "a", train_data=train, val_data=val, tokenizer=tok)
    report_a = straight.fit()

    crashing = CrashingTrainer(small_model(dropout=0.1), cfg, tmp_path / "b", train_data=train, val_data=val,
                               tokenizer=tok)
    with pytest.raises(Crash):
        crashing.fit()
    assert ckpt.read_index(tmp_path / "b")["latest"] == "step-0000004"
    # A new process would build the model from another seed; resuming must overwrite all of it.
    resumed = Trainer(small_model(seed=99, dropout=0.1), config(grad_accum=2, save_every=4, resume=True),
                      tmp_path / "b", train_data=train, val_data=val, tokenizer=tok)
    report_b = resumed.fit()

    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    assert report_a["val_loss"] == report_b["val_loss"] and report_b["steps"] == 8
    assert report_b["steps_this_run"] == 4 and report_b["train_tokens"] == report_a["train_tokens"]
    # tokens/s is this run's tokens over this run's time, not over the crashed attempt's time as well
    state = ckpt.load_state(tmp_path / "b" / "checkpoints" / "step-0000008")
    first = ckpt.load_state(tmp_path / "b" / "checkpoints" / "step-0000004")
    this_run = state["train_seconds"] - first["train_seconds"]
    assert report_b["tokens_per_sec"] == pytest.approx(4 * cfg.tokens_per_step / this_run, rel=0.05)
    # metrics.jsonl reads as one run: no duplicated steps from the attempt that crashed.
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [2, 4, 6, 8]


class FixedBatches(Trainer):
    """Serves the given micro-batches in turn: the loop's data step, overridden."""

    def __init__(self, *args, batches, **kw):
        super().__init__(*args, **kw)
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def build_optimizer(self):  # plain SGD so the comparison is not blurred by Adam's normalization
        return torch.optim.SGD([p for _, p in self.trainable_parameters()], lr=0.1)


def test_grad_accumulation_matches_a_bigger_batch(data, tmp_path):
    train, _, _ = data
    x, y = train.get_batch(8, 32, torch.Generator().manual_seed(1))
    cfg = {"max_steps": 3, "grad_clip": 0.0, "warmup_steps": 0, "schedule": "constant", "lr": 0.1}
    split = FixedBatches(small_model(), config(grad_accum=2, **cfg), tmp_path / "a", train_data=train,
                         batches=[(x[:4], y[:4]), (x[4:], y[4:])])
    whole = FixedBatches(small_model(), config(grad_accum=1, batch_size=8, **cfg), tmp_path / "b", train_data=train,
                         batches=[(x, y)])
    ra, rb = split.fit(), whole.fit()
    start = small_model().state_dict()
    wa, wb = weights(split), weights(whole)
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # the weights did move
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert ra["train_tokens"] == rb["train_tokens"] == 3 * 8 * 32


def test_loss_falls_on_real_text(data, tmp_path):
    train, val, tok = data
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=64, block_size=64))
    cfg = config(batch_size=8, block_size=64, max_steps=40, warmup_steps=5, eval_every=20, eval_batches=4,
                 log_every=10, tensorboard=True)
    report = Trainer(model, cfg, tmp_path, train_data=train, val_data=val, tokenizer=tok).fit()
    assert report["val_loss"] < report["initial_val_loss"] - 1.0, report
    assert report["val_ppl"] == pytest.approx(torch.tensor(report["val_loss"]).exp().item(), rel=1e-5)
    for key in ("steps", "train_tokens", "val_loss", "val_ppl", "best_val_loss", "initial_val_loss",
                "tokens_per_sec", "mfu", "wall_seconds", "params", "vocab_size", "stopped_because"):
        assert key in report
    assert report["stopped_because"] == "max_steps" and report["tokens_per_sec"] > 0 and 0 < report["mfu"] < 1
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 40
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 20, 40]
    # The checkpoint is usable for inference, with its tokenizer and the full config.
    loaded, loaded_tok = load_model(tmp_path)
    assert loaded_tok == tok and torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


def test_early_stopping(data, tmp_path):
    train, val, _ = data
    ScriptedEval.script = [3.0, 2.5, 2.6, 2.7, 1.0]
    report = ScriptedEval(small_model(), config(max_steps=20, eval_every=1, early_stopping_patience=2), tmp_path,
                          train_data=train, val_data=val).fit()
    assert report["stopped_because"] == "early_stopping" and report["steps"] == 3
    assert report["best_val_loss"] == 2.5 and report["val_loss"] == 2.7
    assert ckpt.read_index(tmp_path)["latest"] == "step-0000003"


def test_time_budget_stops_cleanly(data, tmp_path):
    train, val, _ = data
    report = Trainer(small_model(), config(max_steps=1000, max_minutes=1e-6), tmp_path, train_data=train,
                     val_data=val).fit()
    assert report["stopped_because"] == "max_minutes" and report["steps"] == 1
    assert report["val_loss"] is not None and ckpt.read_index(tmp_path)["latest"] == "step-0000001"


def test_fit_to_budget_anneals_within_the_time_budget(data, tmp_path):
    train, val, _ = data
    cfg = config(max_steps=1_000_000, max_minutes=0.05, fit_to_budget=True, warmup_steps=5, log_every=1,
                 min_lr=1e-5, eval_every=1000)
    t0 = time.perf_counter()
    report = Trainer(small_model(), cfg, tmp_path, train_data=train, val_data=val).fit()
    assert time.perf_counter() - t0 < 0.05 * 60 + 3  # the budget (3 s) plus saving and the final evaluation
    assert report["stopped_because"] == "max_minutes" and 5 < report["steps"] < 1_000_000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.5 * cfg.lr  # the cosine ran (most of) its course by the budget, not by max_steps


def test_pruning_keeps_last_k_and_best(data, tmp_path):
    train, val, _ = data
    ScriptedEval.script = [5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ScriptedEval(small_model(), config(max_steps=6, eval_every=1, save_every=1, keep_last=2), tmp_path,
                 train_data=train, val_data=val).fit()
    index = ckpt.read_index(tmp_path)
    assert index["best"] == "step-0000001" and index["best_val_loss"] == 1.0
    assert index["latest"] == "step-0000006"
    assert index["all"] == ["step-0000001", "step-0000005", "step-0000006"]
    on_disk = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert on_disk == index["all"]


def test_state_loads_with_weights_only(data, tmp_path):
    train, val, _ = data
    Trainer(small_model(), config(max_steps=2), tmp_path, train_data=train, val_data=val).fit()
    state = torch.load(tmp_path / "checkpoints" / "step-0000002" / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and state["tokens_seen"] == 2 * 4 * 32 and "optimizer" in state


def test_activation_checkpointing_and_bf16(data, tmp_path):
    train, val, _ = data
    plain = Trainer(small_model(), config(max_steps=2), tmp_path / "a", train_data=train, val_data=val)
    plain.fit()
    ac = Trainer(small_model(), config(max_steps=2, activation_checkpointing=True), tmp_path / "b",
                 train_data=train, val_data=val)
    ac.fit()
    assert ac.model.gradient_checkpointing
    wa, wb = weights(plain), weights(ac)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])
    report = Trainer(small_model(), config(max_steps=2, precision="bf16"), tmp_path / "c", train_data=train,
                     val_data=val).fit()
    assert report["precision"] == "bf16" and report["val_loss"] < 10


@pytest.mark.slow
def test_compile(data, tmp_path):
    train, val, _ = data
    report = Trainer(small_model(), config(max_steps=3, compile=True), Path(tmp_path), train_data=train,
                     val_data=val).fit()
    assert report["steps"] == 3 and report["val_loss"] < 10


def test_resume_hides_the_crashed_attempts_tensorboard_steps(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val, _ = data
    cfg = config(save_every=4, tensorboard=True)
    with pytest.raises(Crash):
        CrashingTrainer(small_model(), cfg, tmp_path, train_data=train, val_data=val).fit()  # logs step 6, saved 4
    Trainer(small_model(), config(save_every=4, tensorboard=True, resume=True), tmp_path, train_data=train,
            val_data=val).fit()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
