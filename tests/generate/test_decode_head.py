"""The decode step's LM head: a pre-packed copy on CPUs that must always compute what the module computes."""

import pytest
import torch
from torch import nn

from haina.generate import Engine, SamplingParams
from haina.generate.head import DecodeHead
from haina.model import ModelConfig, Transformer

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def head(vocab: int = 512, dim: int = 64, bias: bool = False, **kw) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(dim, vocab, bias=bias, **kw)


def holder(lm_head: nn.Module) -> nn.Module:
    """A model-like module whose `lm_head` is the given one."""
    model = nn.Module()
    model.lm_head = lm_head
    return model


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_packed_head_equals_the_module(rows):
    lin = head()
    h = DecodeHead(holder(lin))
    assert h.packed
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        torch.testing.assert_close(h(x), lin(x), rtol=1e-5, atol=1e-5)
        # Each row's logits do not depend on the rows beside it.
        assert torch.equal(h(x)[:1], h(x[:1]))


@needs_onednn
def test_packed_head_follows_weight_updates():
    lin = head()
    model = holder(lin)
    h = DecodeHead(model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place, as an optimizer step
    with torch.inference_mode():
        torch.testing.assert_close(h(x), lin(x), rtol=1e-5, atol=1e-5)
    lin.weight = nn.Parameter(torch.randn(512, 64))  # replaced, as a loaded checkpoint
    with torch.inference_mode():
        torch.testing.assert_close(h(x), lin(x), rtol=1e-5, atol=1e-5)
    model.lm_head = nn.Sequential(nn.Linear(64, 512))  # the module swapped, as by an adapter
    with torch.inference_mode():
        assert torch.equal(h(x), model.lm_head(x))
        assert not h.packed


@pytest.mark.parametrize("module", [
    head(bias=True),
    head(dtype=torch.bfloat16),
    nn.Sequential(nn.Linear(64, 512)),  # an adapter or wrapper in the head's place
], ids=["bias", "bf16", "wrapped"])
def test_other_heads_run_unchanged(module):
    h = DecodeHead(holder(module))
    assert not h.packed
    x = torch.randn(3, 64, dtype=next(module.parameters()).dtype)
    with torch.inference_mode():
        assert torch.equal(h(x), module(x))


def test_engine_greedy_matches_the_plain_head():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=256, block_size=64, n_layer=2, n_embd=64, init_std=0.3)
    model = Transformer(cfg).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    packed = Engine(model, max_batch_size=4)
    plain = Engine(model, max_batch_size=4)
    plain._head = model.lm_head.forward
    got = [r[0].token_ids for r in packed.generate(prompts, params)]
    assert got == [r[0].token_ids for r in plain.generate(prompts, params)]
