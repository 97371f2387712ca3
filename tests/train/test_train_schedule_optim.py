"""Learning-rate schedules at their key steps, and AdamW's decay groups."""

import math

import pytest
import torch

from haina.model import ModelConfig, Transformer
from haina.train.config import TrainConfig
from haina.train.optim import build_adamw, param_groups
from haina.train.schedule import LRSchedule

LR, MIN, WARM, TOTAL = 1e-3, 1e-4, 100, 1100  # decay spans steps 100..1100, midpoint 600


def sched(kind, **kw):
    return LRSchedule.from_config(TrainConfig(lr=LR, min_lr=MIN, warmup_steps=WARM, max_steps=TOTAL, schedule=kind,
                                              **kw))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "step", "plateau"])
def test_warmup_is_linear_and_ends_at_lr(kind):
    s = sched(kind)
    assert s(0) == pytest.approx(LR / WARM)
    assert s(49) == pytest.approx(LR * 50 / WARM)
    assert s(WARM - 1) == pytest.approx(LR)
    assert s(WARM) == pytest.approx(LR)


def test_cosine_and_linear_mid_and_end():
    cos, lin = sched("cosine"), sched("linear")
    assert cos(600) == pytest.approx((LR + MIN) / 2)
    assert lin(600) == pytest.approx((LR + MIN) / 2)
    assert cos(350) == pytest.approx(MIN + 0.5 * (1 + math.cos(math.pi / 4)) * (LR - MIN))  # a quarter in
    assert lin(350) == pytest.approx(LR - 0.25 * (LR - MIN))
    for s in (cos, lin):
        assert s(TOTAL) == pytest.approx(MIN)
        assert s(TOTAL + 500) == pytest.approx(MIN)  # stays at the floor past the horizon
    assert sched("cosine", decay_steps=600)(600) == pytest.approx(MIN)  # decay_steps overrides max_steps


def test_constant_and_step():
    const = sched("constant")
    assert const(600) == const(TOTAL) == pytest.approx(LR)
    step = sched("step", step_size=200, gamma=0.5)
    assert step(WARM + 199) == pytest.approx(LR)
    assert step(WARM + 200) == pytest.approx(LR * 0.5)
    assert step(WARM + 400) == pytest.approx(LR * 0.25)
    assert step(WARM + 10_000) == pytest.approx(MIN)  # never below min_lr


def test_plateau_reduces_after_patience_and_round_trips():
    s = sched("plateau", plateau_patience=2, plateau_factor=0.5)
    for loss in (3.0, 2.5, 2.6, 2.55):  # two evaluations without beating 2.5
        s.observe(loss)
    assert s(600) == pytest.approx(LR * 0.5)
    s.observe(2.0)  # an improvement resets the count
    s.observe(2.1)
    assert s(600) == pytest.approx(LR * 0.5)
    s2 = sched("plateau", plateau_patience=2, plateau_factor=0.5)
    s2.load_state_dict(s.state_dict())
    s.observe(2.2)
    s2.observe(2.2)
    assert s(600) == s2(600) == pytest.approx(LR * 0.25)
    assert s(50) == pytest.approx(LR * 51 / WARM)  # warmup is untouched by reductions


def test_decay_only_on_matrices_and_embeddings():
    model = Transformer(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) in ids and id(model.pos_emb.weight) in ids  # embeddings decay too
    assert id(model.blocks[0].attn.qkv.bias) not in ids and id(model.norm_f.weight) not in ids
    # The tied head is the embedding: counted once, and every parameter is in exactly one group.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = Transformer(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("blocks.0.mlp"))
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                      device=torch.device("cpu"))
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.blocks[0].mlp.parameters())


def test_resume_keeps_a_moved_horizon_but_not_over_a_new_one():
    moved = sched("cosine")
    moved.decay_steps = 700  # as train.fit_to_budget shortens it
    same = sched("cosine")
    same.load_state_dict(moved.state_dict())
    assert same.decay_steps == 700  # an exact resume
    longer = LRSchedule.from_config(TrainConfig(lr=LR, min_lr=MIN, warmup_steps=WARM, max_steps=2 * TOTAL))
    longer.load_state_dict(sched("cosine").state_dict())
    assert longer.decay_steps == 2 * TOTAL  # --resume --train.max_steps=... raised: decay to the new end
    assert longer(TOTAL) > 2 * MIN
