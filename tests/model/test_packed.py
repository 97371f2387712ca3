"""haina.model.packed: inference Linear products through oneDNN-packed weights equal the plain ones."""

from __future__ import annotations

import copy

import pytest
import torch

from haina.model import ModelConfig, Transformer, packed
from haina.model.packed import MIN_ROWS, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False)
    return Transformer(cfg).eval()


def _packed_layers(model) -> int:
    return sum(1 for m in model.modules() if "_haina_pack" in m.__dict__)


def test_packed_logits_equal_plain_and_unpack_restores():
    model = _model()
    idx = torch.randint(0, 300, (4, 48))
    with torch.no_grad():
        plain = model(idx)
        n = pack_linears(model)
        assert n == _packed_layers(model) == 2 * 4 + 1  # qkv, proj, two MLP products per block; the head
        assert pack_linears(model) == n  # idempotent
        packed = model(idx)
        assert all(m._haina_pack.packed is not None for m in model.modules() if "_haina_pack" in m.__dict__)
        unpack_linears(model)
        again = model(idx)
    assert _packed_layers(model) == 0
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, plain)


def test_state_dict_training_and_small_products_stay_plain():
    model = _model()
    keys = sorted(model.state_dict())
    pack_linears(model)
    assert sorted(model.state_dict()) == keys  # nothing of the packing is saved
    # With autograd the plain path runs, so gradients flow as ever.
    idx = torch.randint(0, 300, (2, 32))
    model(idx).float().pow(2).mean().backward()
    assert model.lm_head.weight.grad is not None
    assert all(m._haina_pack.packed is None for m in model.modules() if "_haina_pack" in m.__dict__)
    # Fewer than MIN_ROWS rows: plain too (a decode step).
    with torch.no_grad():
        model(torch.randint(0, 300, (1, MIN_ROWS - 1)))
    assert all(m._haina_pack.packed is None for m in model.modules() if "_haina_pack" in m.__dict__)


def test_weight_updated_in_place_is_packed_again():
    model = _model()
    pack_linears(model)
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        model(idx)
        model.lm_head.weight.mul_(2.0)  # e.g. a training step between evaluations
        got = model(idx)
        unpack_linears(model)
        want = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_deepcopy_computes_with_its_own_weights():
    model = _model()
    pack_linears(model)
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        model(idx)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.5)
        got = twin(idx)
        unpack_linears(twin)
        want = twin(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_budget_and_non_float32_layers_are_left_alone():
    model = _model()
    assert pack_linears(model, max_bytes=0) == 0
    half = _model().to(torch.bfloat16)
    assert pack_linears(half) == 0


def test_packed_linears_block_packs_for_its_duration_only():
    from haina.model.packed import packed_linears

    model = _model()
    pack_linears(model.blocks[0])  # packed before the block: stays packed after it
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad(), packed_linears(model) as n:
        assert n == _packed_layers(model) == 9
        model(idx)
    assert _packed_layers(model) == 4


@pytest.mark.parametrize("bias, frozen", [(True, False), (False, False), (True, True)])
def test_training_products_give_the_plain_gradients(bias, frozen, monkeypatch):
    monkeypatch.setattr(packed, "TRAIN_MIN_ROWS", 16)  # these small products take the training path too
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    twin = copy.deepcopy(layer)
    if frozen:  # a LoRA base: no weight gradient, the input's still flows
        layer.weight.requires_grad_(False)
        twin.weight.requires_grad_(False)
    assert pack_linears(layer, train=True) == 1
    x = torch.randn(3, 20, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 20, 80)
    (layer(x) * g).sum().backward()
    (twin(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_a_model_trains_the_same_packed_or_plain(monkeypatch):
    monkeypatch.setattr(packed, "TRAIN_MIN_ROWS", 16)
    model, twin = _model(), _model()
    pack_linears(model, train=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, twin)]
    idx = torch.randint(0, 300, (4, 32))
    for _ in range(3):
        for m, opt in zip((model, twin), opts, strict=True):
            m.train()
            loss = torch.nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_a_model_packed_for_training_evaluates_with_its_current_weights(monkeypatch):
    monkeypatch.setattr(packed, "TRAIN_MIN_ROWS", 16)
    # A fused AdamW step updates the weights without bumping their version counters: an evaluation between
    # steps must still see the new weights.
    model = _model()
    pack_linears(model, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    idx = torch.randint(0, 300, (4, 32))
    for _ in range(2):
        model.train()
        model(idx).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            got = model(idx)
            unpack_linears(model)
            want = model(idx)
            pack_linears(model, train=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_short_training_batches_stay_plain():
    # Below TRAIN_MIN_ROWS rows a training product is plain: packing at each call did not pay off there.
    layer = torch.nn.Linear(48, 80)
    pack_linears(layer, train=True)
    layer(torch.randn(4, 20, 48, requires_grad=True)).sum().backward()
    assert layer._haina_pack.stamp is None  # never packed


def test_a_layer_meeting_many_row_counts_computes_the_rest_plainly():
    layer = torch.nn.Linear(32, 48)
    pack_linears(layer)
    with torch.no_grad():
        for t in range(packed.MAX_SHAPES + 3):
            x = torch.randn(MIN_ROWS + t, 32)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                       rtol=1e-4, atol=1e-4)
        layer(torch.randn(MIN_ROWS, 32))  # a row count it packed before: still packed
    assert len(layer._haina_pack.rows) == packed.MAX_SHAPES
