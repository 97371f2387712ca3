"""The step's loss is the exact mean over its supervised targets, however they fall into micro-batches."""

import torch

from haina.model import ModelConfig, Transformer
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer


class FixedBatches(Trainer):
    """Feeds given micro-batches in order and records the gradients each step computes."""

    def __init__(self, batches, *args, **kwargs):
        self.queue = list(batches)
        self.grads = None
        super().__init__(*args, **kwargs)

    def next_batch(self):
        return self.queue.pop(0)

    def clip_gradients(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return super().clip_gradients()


def _masked_batches(seed=0, n=4, T=16, V=64):
    """Micro-batches whose supervised spans differ wildly in length (1 target vs. nearly all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randint(0, V, (2, T), generator=g)
        y = torch.randint(0, V, (2, T), generator=g)
        keep = [1, T - 1, 3, T // 2][i % 4]
        y[:, keep:] = -100  # short and long "answers"
        out.append((x, y))
    return out


def _trainer(batches, accum, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(batch_size=2 * (4 // accum), block_size=16, grad_accum=accum, max_steps=1, warmup_steps=0,
                      device="cpu", tensorboard=False, grad_clip=0.0)
    return FixedBatches(batches, model, cfg, tmp_path, train_data=None)


def test_accumulated_masked_microbatches_match_one_batch(tmp_path):
    micro = _masked_batches()
    whole = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    accumulated = _trainer(micro, 4, tmp_path / "a")
    out_a = accumulated.train_step(lr=1e-3)
    single = _trainer([whole], 1, tmp_path / "b")
    out_b = single.train_step(lr=1e-3)
    assert abs(out_a["loss"] - out_b["loss"]) < 1e-5
    assert out_a["weight"] == out_b["weight"] == int((whole[1] != -100).sum())
    for name, g in single.grads.items():
        torch.testing.assert_close(accumulated.grads[name], g, rtol=1e-4, atol=1e-6)


def test_mean_of_means_would_differ(tmp_path):
    """The property is not vacuous: averaging the micro-batch means weights the 1-target batch 4x more."""
    micro = _masked_batches()
    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    from haina.model.transformer import lm_loss

    with torch.no_grad():
        means = torch.stack([lm_loss(model(x), y) for x, y in micro])
    counts = torch.tensor([float((y != -100).sum()) for _, y in micro])
    assert abs(float(means.mean()) - float((means * counts).sum() / counts.sum())) > 1e-3


def test_fully_masked_step_is_one_clear_error(tmp_path):
    micro = [(x, torch.full_like(y, -100)) for x, y in _masked_batches()]
    trainer = _trainer(micro, 4, tmp_path)
    import pytest

    from haina.core.errors import HainaError

    with pytest.raises(HainaError, match="every target"):
        trainer.train_step(lr=1e-3)


def test_a_fully_masked_microbatch_adds_nothing(tmp_path):
    micro = _masked_batches()
    micro[2] = (micro[2][0], torch.full_like(micro[2][1], -100))
    rest = [micro[i] for i in (0, 1, 3)]
    whole = (torch.cat([x for x, _ in rest]), torch.cat([y for _, y in rest]))
    accumulated = _trainer(micro, 4, tmp_path / "a")
    out = accumulated.train_step(lr=1e-3)
    assert out["verdict"] == "ok"
    single = _trainer([whole], 1, tmp_path / "b")
    single.train_step(lr=1e-3)
    for name, g in single.grads.items():
        torch.testing.assert_close(accumulated.grads[name], g, rtol=1e-4, atol=1e-6)
