"""With train.compile the pretraining loss is compiled together with the model, and equals the eager loss."""

import copy

import pytest
import torch

from haina.model import ModelConfig, Transformer
from haina.model.transformer import lm_loss
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer, next_token_loss

VOCAB, T = 97, 16
# Inductor itself calls a deprecated torch.jit decorator on import.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class RandomWindows:
    """Random token windows; one fixed validation batch."""

    def get_batch(self, batch_size, block_size, generator):
        buf = torch.randint(VOCAB, (batch_size, block_size + 1), generator=generator)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def eval_batches(self, batch_size, block_size, max_batches=None):
        yield self.get_batch(batch_size, block_size, torch.Generator().manual_seed(9))


def make_trainer(tmp_path, compile: bool) -> Trainer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=VOCAB, block_size=T, n_layer=1, n_embd=32))
    cfg = TrainConfig(batch_size=2, block_size=T, compile=compile, device="cpu", tensorboard=False)
    return Trainer(model, cfg, tmp_path, train_data=RandomWindows(), val_data=RandomWindows())


def test_without_compile_the_loss_is_the_eager_one(tmp_path):
    trainer = make_trainer(tmp_path, compile=False)
    assert trainer._compiled_loss is None and trainer.forward_model is trainer.model
    x, y = trainer.next_batch()
    assert torch.equal(trainer.compute_loss(trainer.forward_model, (x, y)), lm_loss(trainer.model(x), y))
    assert torch.equal(next_token_loss(trainer.model, x, y), lm_loss(trainer.model(x), y))


def test_compiled_loss_equals_eager_loss_and_gradients(tmp_path):
    trainer = make_trainer(tmp_path, compile=True)
    eager = copy.deepcopy(trainer.model)
    calls = []
    compiled = trainer._compiled_loss
    trainer._compiled_loss = lambda *a: calls.append(1) or compiled(*a)
    x, y = trainer.next_batch()

    loss = trainer.compute_loss(trainer.forward_model, (x, y))
    loss.backward()
    ref = lm_loss(eager(x), y)
    ref.backward()
    assert calls == [1]  # the model and its loss ran as one compiled function
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-5)

    # Any other model (a teacher, the bare module) is scored eagerly.
    trainer.compute_loss(trainer.model, (x, y))
    assert calls == [1]
    # A whole step and an evaluation (no grad, eval mode) go through the compiled loss too.
    trainer.optimizer.zero_grad(set_to_none=True)
    out = trainer.train_step(1e-3)
    assert out["verdict"] == "ok" and out["loss"] == pytest.approx(ref.item(), rel=0.2)
    val = trainer.evaluate()
    assert calls == [1, 1, 1] and val is not None and 0 < val < 10


def test_attention_kernel_choice_is_for_cuda_only(tmp_path):
    from haina.core.errors import HainaError

    model = Transformer(ModelConfig.from_name("tiny", vocab_size=VOCAB, block_size=T, n_layer=1, n_embd=32))
    cfg = TrainConfig(batch_size=2, block_size=T, device="cpu", tensorboard=False, attention="cudnn")
    with pytest.raises(HainaError, match="train.attention=cudnn selects a CUDA attention kernel"):
        Trainer(model, cfg, tmp_path, train_data=RandomWindows())
