"""Grouped-query attention through SDPA's own head sharing gives what copying K/V to every query head gives."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from haina.generate.cache import KVCache
from haina.model import ModelConfig, Transformer, layers

GQA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": False}


def make_model(n_kv_head: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32,
                                n_kv_head=n_kv_head, **GQA)
    return Transformer(cfg)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's key head count and whether it asked for grouped heads."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    return calls


def copied(monkeypatch):
    """Switch attention to the repeat_interleave formulation (the reference)."""
    monkeypatch.setattr(layers, "_native_gqa", lambda q, mask: False)


def run_with_cache(model: Transformer, ids: torch.Tensor, lens: list[int]) -> list[torch.Tensor]:
    """Prefill rows of `lens` tokens, then 3 decode steps through `decode` and 1 through `forward`."""
    cache = KVCache(model.cfg, 2, 32)
    out = []
    with torch.inference_mode():
        T = max(lens)
        out.append(model(ids[:, :T], positions=cache.bind(0, [0, 0], T), cache=cache))
        cache.commit(0, lens)
        for step in range(4):
            tok = torch.stack([ids[b, n] for b, n in enumerate(cache.lengths[:2])])[:, None]
            pos = cache.bind(0, cache.lengths[:2], 1)
            out.append(model.decode(tok, positions=pos, cache=cache) if step < 3
                       else model(tok, positions=pos, cache=cache)[:, -1])
            cache.commit(0, [1, 1])
    return out


@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_training_forward_and_gradients_match_copied_heads(n_kv_head, monkeypatch, sdpa_calls):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for reference in (False, True):
        if reference:
            copied(monkeypatch)
        model = make_model(n_kv_head)
        logits = model(ids)
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (native, g_native), (ref, g_ref) = results
    torch.testing.assert_close(native, ref, atol=1e-6, rtol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_native[name], g_ref[name], atol=1e-6, rtol=1e-6)
    # The first model's calls passed n_kv key heads with enable_gqa; the reference's passed copies.
    assert sdpa_calls[:2] == [(n_kv_head, True)] * 2
    assert sdpa_calls[2:] == [(4, False)] * 2


@pytest.mark.parametrize("lens", [[6, 6], [3, 7]], ids=["same-length", "ragged"])
def test_prefill_and_decode_through_the_cache_match_copied_heads(lens, monkeypatch, sdpa_calls):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    native = run_with_cache(make_model(2).eval(), ids, lens)
    assert sdpa_calls and all(call == (2, True) for call in sdpa_calls)  # masked (ragged) calls included on CPU
    copied(monkeypatch)
    ref = run_with_cache(make_model(2).eval(), ids, lens)
    for a, b in zip(native, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_multi_head_attention_never_asks_for_grouping(sdpa_calls):
    make_model(4)(torch.zeros(1, 5, dtype=torch.long))
    assert sdpa_calls == [(4, False)] * 2


def test_on_cuda_half_precision_skips_the_copies():
    # Measured on an H200: grouped heads are faster in bf16/fp16 with or without a mask, slower in fp32.
    def cuda_q(dtype):
        return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)

    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert layers._native_gqa(cuda_q(torch.bfloat16), None)
    assert layers._native_gqa(cuda_q(torch.float16), None)
    assert layers._native_gqa(cuda_q(torch.bfloat16), mask)
    assert not layers._native_gqa(cuda_q(torch.float32), None)
    assert layers._native_gqa(torch.zeros(1), mask)  # the CPU kernel takes masks and fp32
