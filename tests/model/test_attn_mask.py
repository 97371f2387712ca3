"""`attn_mask`: documents packed into one row see only themselves, exactly as if each ran alone."""

import pytest
import torch

from haina.model import ModelConfig, Transformer

CONFIGS = {
    "llama-like": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                   "tie_embeddings": False},
    "gpt2-like": {"pos": "learned"},
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=97, block_size=32, n_layer=2, n_embd=32, **kw)


def packed(lengths: list[int], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (1, T) restarting at 0 per document and the block-diagonal causal mask (1, 1, T, T).

    Padding at the end attends to itself only, so no query row is fully masked.
    """
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.arange(-1, -pad - 1, -1)])
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])
    T = len(doc)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return positions[None], (causal & (doc[:, None] == doc[None, :]))[None, None]


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_match_running_each_alone(name):
    torch.manual_seed(0)
    model = Transformer(tiny(**CONFIGS[name])).eval()
    docs = [torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 12))]
    positions, mask = packed([7, 12], pad=3)
    row = torch.cat([*docs, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(row, positions=positions, attn_mask=mask)
        alone = [model(d) for d in docs]
    torch.testing.assert_close(logits[:, :7], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 7:19], alone[1], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()  # padding rows attend to themselves: no NaN from an empty softmax
    # Without the mask the second document would see the first: the mask is what makes them equal.
    with torch.no_grad():
        leaky = model(row, positions=positions)
    assert not torch.allclose(leaky[:, 7:19], alone[1], atol=1e-3)


def test_a_plain_causal_mask_equals_the_default():
    torch.manual_seed(0)
    model = Transformer(tiny(**CONFIGS["llama-like"])).eval()
    x = torch.randint(0, 97, (2, 10))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].expand(2, 1, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x, attn_mask=mask), model(x), atol=1e-5, rtol=1e-5)


def test_mask_works_under_gradient_checkpointing():
    torch.manual_seed(0)
    model = Transformer(tiny(**CONFIGS["llama-like"]))
    positions, mask = packed([5, 6])
    x = torch.randint(0, 97, (1, 11))
    model.gradient_checkpointing = True
    model(x, positions=positions, attn_mask=mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = False
    model(x, positions=positions, attn_mask=mask).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_mask_and_cache_are_exclusive():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.zeros(1, 2, dtype=torch.long), attn_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), cache=object())
