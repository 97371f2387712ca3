"""Training survives what training meets: NaN steps, loss spikes, signals, time budgets and a full disk.

Faults are injected through the loop's overridable steps (`compute_loss`, `next_batch`, `train_step`):
the trainer's own seams, no mocks of its internals.
"""

import errno
import json
import os
import signal
from typing import ClassVar

import pytest
import torch
from train_fixtures import text_dataset

import haina.model.checkpoint as model_ckpt
from haina.core.errors import HainaError
from haina.data.shards import TokenShards
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import load_model
from haina.train import checkpoint as ckpt
from haina.train.config import TrainConfig
from haina.train.guard import StepGuard
from haina.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d, tok = text_dataset(tmp_path_factory.mktemp("shards"))
    return TokenShards(d, "train"), TokenShards(d, "val"), tok


def small_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def config(**kw):
    base = {"batch_size": 4, "block_size": 32, "max_steps": 10, "warmup_steps": 2, "eval_every": 1000,
            "eval_batches": 2, "log_every": 1, "save_every": 2, "tensorboard": False, "device": "cpu", "seed": 5,
            "lr": 3e-3}
    return TrainConfig(**{**base, **kw})


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Faulty(Trainer):
    """Multiplies the training loss of chosen attempts by `factor` (NaN, or a spike) and records the data served.

    Attempts are counted per `train_step` call (grad_accum is 1 here), not by step number, so the fault
    does not follow the run back after a rollback: like bad data, which the rollback steps past.
    """

    faults: ClassVar[dict[int, float]] = {}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.attempt, self.served = 0, []

    def next_batch(self):
        x, y = super().next_batch()
        self.attempt += 1
        self.served.append(x.clone())
        return x, y

    def compute_loss(self, model, batch):
        loss = super().compute_loss(model, batch)
        return loss * self.faults.get(self.attempt, 1.0) if model.training else loss


def test_guard_rules():
    g = StepGuard(max_bad_steps=2, spike_factor=3.0, spike_window=3, max_rollbacks=1)
    assert g.judge(1, 9.0, 1.0) == "ok"  # no spike check before the window is full
    assert [g.judge(s, 3.0, 1.0) for s in (2, 3)] == ["ok", "ok"]
    assert g.judge(4, 30.0, 1.0) == "rollback" and "spike" in g.reason
    assert g.judge(5, float("nan"), 1.0) == "skip"
    assert g.judge(6, 2.0, float("inf")) == "rollback"  # 2 bad in a row
    assert g.skipped == [{"step": 5, "loss": "nan", "grad_norm": 1.0, "reason": "non-finite"},
                         {"step": 6, "loss": 2.0, "grad_norm": "inf", "reason": "non-finite"}]
    g.rolled_back(6, 4)
    with pytest.raises(HainaError, match="after 1 rollbacks"):
        g.rolled_back(8, 4)
    with pytest.raises(HainaError, match="no checkpoint to roll back to"):
        StepGuard(max_bad_steps=1, spike_factor=0, spike_window=1, max_rollbacks=3).rolled_back(1, None)
    # With nothing to roll back to, a spike is skipped; so many in a row still call for a rollback.
    early = StepGuard(max_bad_steps=2, spike_factor=3.0, spike_window=1, max_rollbacks=1)
    assert early.judge(1, 3.0, 1.0, can_roll_back=False) == "ok"
    assert early.judge(2, 30.0, 1.0, can_roll_back=False) == "skip" and early.skipped[-1]["reason"] == "loss spike"
    assert early.judge(3, 30.0, 1.0, can_roll_back=False) == "rollback" and "loss spike" in early.reason
    # Near zero loss, a relative jump alone is noise, not a spike: it must also be a nat above the mean.
    low = StepGuard(max_bad_steps=2, spike_factor=3.0, spike_window=2, max_rollbacks=1)
    assert [low.judge(s, x, 1.0) for s, x in enumerate([0.01, 0.02, 0.5], 1)] == ["ok", "ok", "ok"]
    restored = StepGuard(max_bad_steps=2, spike_factor=3.0, spike_window=3, max_rollbacks=1)
    restored.load_state_dict(g.state_dict())
    assert restored.state_dict() == g.state_dict()
    with pytest.raises(HainaError, match="spike_factor must be above 1"):
        TrainConfig(spike_factor=0.5)


def test_nan_step_is_skipped_not_applied(data, tmp_path):
    train, val, tok = data
    Faulty.faults = {1: float("nan")}
    one = Faulty(small_model(), config(max_steps=1, save_every=0), tmp_path / "one", train_data=train)
    start = weights(one)
    report = one.fit()
    assert same_weights(weights(one), start)  # the only step was bad: nothing moved
    assert report["skipped_steps"] == [{"step": 1, "loss": "nan", "grad_norm": "nan", "reason": "non-finite"}]

    Faulty.faults = {3: float("nan")}
    t = Faulty(small_model(), config(max_steps=6), tmp_path / "six", train_data=train, val_data=val, tokenizer=tok)
    report = t.fit()
    assert [s["step"] for s in report["skipped_steps"]] == [3] and report["rollbacks"] == []
    assert report["steps"] == 6 and all(torch.isfinite(v).all() for v in weights(t).values())
    assert t.optimizer.state_dict()["state"][0]["step"] == 5  # AdamW took five updates in six steps
    saved = json.loads((tmp_path / "six" / "report.json").read_text())
    assert saved["skipped_steps"] == report["skipped_steps"]
    rows = [json.loads(line) for line in (tmp_path / "six" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows if r.get("step") == 3 and "lr" in r] == [1]
    assert [r["loss"] for r in rows if r.get("step") == 3 and "lr" in r] == [None]


def test_consecutive_nan_steps_roll_back_past_the_bad_data(data, tmp_path):
    train, val, tok = data
    Faulty.faults = {5: float("nan"), 6: float("nan"), 7: float("nan")}
    t = Faulty(small_model(dropout=0.1), config(max_bad_steps=3), tmp_path, train_data=train, val_data=val,
               tokenizer=tok)
    report = t.fit()
    assert [s["step"] for s in report["skipped_steps"]] == [5, 6, 7]
    (rb,) = report["rollbacks"]
    assert rb["step"] == 7 and rb["to_step"] == 4 and rb["skipped_data_steps"] == 3 and "non-finite" in rb["reason"]
    assert report["steps"] == 10 and t.attempt == 13  # 4 good, 3 bad, then steps 5-10 again
    # The data window of the bad attempts is skipped, not replayed: attempt 8 (step 5 again) sees new data.
    assert not torch.equal(t.served[7], t.served[4])
    assert all(torch.isfinite(v).all() for v in weights(t).values())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["rollback_from"]) for e in events if "rollback_from" in e] == [(4, 7)]


def test_loss_spike_rolls_back(data, tmp_path):
    train, val, _ = data
    Faulty.faults = {6: 100.0}
    cfg = config(spike_factor=3.0, spike_window=3)
    report = Faulty(small_model(), cfg, tmp_path, train_data=train, val_data=val).fit()
    (rb,) = report["rollbacks"]
    assert rb["step"] == 6 and rb["to_step"] == 4 and "spike" in rb["reason"]
    assert report["skipped_steps"] == [] and report["steps"] == 10
    # Before the first checkpoint there is nothing to roll back to: the spiking step is skipped instead.
    Faulty.faults = {2: 100.0}
    report = Faulty(small_model(), config(spike_factor=3.0, spike_window=1, max_steps=3), tmp_path / "early",
                    train_data=train).fit()
    assert [(s["step"], s["reason"]) for s in report["skipped_steps"]] == [(2, "loss spike")]
    assert report["rollbacks"] == []


@pytest.mark.parametrize("case", ["no-checkpoint", "too-many"])
def test_rollback_that_cannot_help_is_one_line(data, tmp_path, case):
    train, _, _ = data
    Faulty.faults = {i: float("nan") for i in range(1 if case == "no-checkpoint" else 3, 100)}
    cfg = config(max_bad_steps=2, max_rollbacks=1, save_every=0 if case == "no-checkpoint" else 2)
    expected = "no checkpoint to roll back to" if case == "no-checkpoint" else r"after 1 rollbacks"
    with pytest.raises(HainaError, match=expected) as e:
        Faulty(small_model(), cfg, tmp_path, train_data=train).fit()
    assert "\n" not in str(e.value) and "train.lr" in str(e.value)


class SelfSignal(Trainer):
    """Sends SIGINT to its own process during step `at`, as Ctrl-C would."""

    at = 3

    def train_step(self, lr):
        if self.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().train_step(lr)


def test_sigint_saves_at_the_step_boundary_and_resumes_bit_exactly(data, tmp_path):
    train, val, tok = data
    cfg = config(max_steps=6, save_every=0, eval_every=2)
    straight = Trainer(small_model(dropout=0.1), cfg, tmp_path / "a", train_data=train, val_data=val, tokenizer=tok)
    straight.fit()

    report = SelfSignal(small_model(dropout=0.1), cfg, tmp_path / "b", train_data=train, val_data=val,
                        tokenizer=tok).fit()
    assert report["stopped_because"] == "SIGINT" and report["steps"] == 3
    assert ckpt.read_index(tmp_path / "b")["latest"] == "step-0000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    resumed = Trainer(small_model(seed=9, dropout=0.1), config(max_steps=6, save_every=0, eval_every=2, resume=True),
                      tmp_path / "b", train_data=train, val_data=val, tokenizer=tok)
    assert resumed.fit()["steps"] == 6
    assert same_weights(weights(straight), weights(resumed))


class FakeClock:
    """The trainer's clock in the time-budget test: it moves only when a step says so, so the test is exact."""

    now = 0.0

    @classmethod
    def perf_counter(cls):
        return cls.now


class Ticking(Trainer):
    """Each step takes 1 s of FakeClock time; `later` seconds once fit_to_budget has settled."""

    later = 1.0

    def train_step(self, lr):
        FakeClock.now += 1.0 if self.settled_steps is None else self.later
        return super().train_step(lr)


class Slowing(Ticking):
    later = 3.0  # slower than measured: the budget cuts the run short of the steps it settled on


def test_time_budget_run_resumes_to_the_step_count_it_settled_on(data, tmp_path, monkeypatch):
    import haina.train.trainer as trainer_module

    train, _, tok = data
    monkeypatch.setattr(trainer_module, "time", FakeClock)
    FakeClock.now = 0.0
    cfg = config(max_steps=100_000, max_minutes=1.0, fit_to_budget=True, warmup_steps=5, save_every=0, log_every=10)
    first = Slowing(small_model(dropout=0.1), cfg, tmp_path / "budget", train_data=train, tokenizer=tok).fit()
    # Fitted after 10 steps of 1 s: 10 + 0.97 x 50 s left = 58 steps. At 3 s a step the 60 s run out at step 27.
    assert first["max_steps"] == 58 and first["steps"] == 27 and first["stopped_because"] == "max_minutes"
    assert ckpt.load_state(tmp_path / "budget" / "checkpoints" / "step-0000027")["settled_steps"] == 58

    FakeClock.now = 0.0
    resumed = Trainer(small_model(seed=9, dropout=0.1), config(**{**cfg.__dict__, "resume": True}),
                      tmp_path / "budget", train_data=train, tokenizer=tok)
    assert resumed.fit()["steps"] == 58  # no new fit: the count and the decay horizon it settled on
    # The same weights as a run that settled on the same count and was not cut short.
    FakeClock.now = 0.0
    whole = Ticking(small_model(dropout=0.1), cfg, tmp_path / "whole", train_data=train, tokenizer=tok)
    assert whole.fit()["steps"] == 58
    assert same_weights(weights(whole), weights(resumed))


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fails", ["weights", "trainer-state", "index"])
def test_full_disk_keeps_the_previous_checkpoint_and_stops_in_one_line(data, tmp_path, monkeypatch, fails):
    train, val, tok = data
    target, name = {"weights": (model_ckpt, "save_file"), "trainer-state": (ckpt.torch, "save"),
                    "index": (ckpt, "write_json")}[fails]
    real, calls = getattr(target, name), []

    def second_call_fails(*a, **k):
        calls.append(1)
        return enospc() if len(calls) == 2 else real(*a, **k)

    monkeypatch.setattr(target, name, second_call_fails)
    with pytest.raises(HainaError) as e:
        Trainer(small_model(), config(max_steps=3, save_every=1), tmp_path, train_data=train, val_data=val,
                tokenizer=tok).fit()
    line = str(e.value)
    assert "\n" not in line and "No space left on device" in line and "step-0000002" in line
    assert "step-0000001 is still the latest checkpoint" in line and "--resume" in line
    index = ckpt.read_index(tmp_path)
    assert index["latest"] == "step-0000001" and index["all"] == ["step-0000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["index.json", "step-0000001"]
    assert ckpt.load_state(tmp_path / "checkpoints" / "step-0000001")["step"] == 1
    load_model(tmp_path)  # checksums and all: the previous checkpoint is whole

    monkeypatch.setattr(target, name, real)  # room again: the run continues from step 1
    report = Trainer(small_model(), config(max_steps=3, save_every=1, resume=True), tmp_path, train_data=train,
                     val_data=val, tokenizer=tok).fit()
    assert report["steps"] == 3 and report["steps_this_run"] == 2


def test_pruning_and_fresh_starts_remove_only_our_checkpoints(data, tmp_path):
    train, _, _ = data
    mine = {"checkpoints/step-final/notes.txt": "keep", "checkpoints/step-0000099/weights.bin": "a copy of mine",
            "checkpoints/README": "mine", "tb/my-plot.txt": "mine"}
    for rel, text in mine.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    Trainer(small_model(), config(max_steps=4, save_every=1, keep_last=1), tmp_path, train_data=train).fit()
    assert ckpt.read_index(tmp_path)["all"] == ["step-0000004"]
    Trainer(small_model(), config(max_steps=2, save_every=1, keep_last=1), tmp_path, train_data=train).fit()  # afresh
    assert ckpt.read_index(tmp_path)["all"] == ["step-0000002"]
    assert all((tmp_path / rel).read_text() == text for rel, text in mine.items())
    # An index naming a path outside the run is never followed.
    (tmp_path / "checkpoints" / "index.json").write_text(json.dumps({"latest": "../../x", "all": ["../../x"]}))
    with pytest.raises(HainaError, match="not a checkpoint name"):
        ckpt.latest_checkpoint(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_nan_step_is_skipped_beside_the_grad_scaler(data, tmp_path):
    train, _, _ = data
    Faulty.faults = {3: float("nan")}
    t = Faulty(small_model(), config(max_steps=6, save_every=0, device="cuda", precision="fp16"), tmp_path,
               train_data=train)
    report = t.fit()
    assert [s["step"] for s in report["skipped_steps"]] == [3] and report["steps"] == 6
    assert t.scaler.get_scale() < 65536.0  # the scaler saw the non-finite gradients too and backed off
    assert all(torch.isfinite(v).all() for v in weights(t).values())
