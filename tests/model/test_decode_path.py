"""`Transformer.decode`, the engine's lean one-token step, computes exactly what `forward` does."""

import pytest
import torch
from torch import nn

from haina.generate.cache import KVCache
from haina.model import ModelConfig, Transformer

VARIANTS = {
    "gpt2": {},
    "llama-gqa": {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                  "tie_embeddings": False},
    "mqa-sinusoidal-relu": {"pos": "sinusoidal", "mlp": "relu", "n_kv_head": 1},
}


def make_model(variant: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=97, block_size=32, n_layer=2, n_embd=32, **VARIANTS[variant])
    return Transformer(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lens", [[5, 5], [3, 7]], ids=["same-length", "ragged"])
def test_decode_equals_forward_through_the_cache(variant, lens):
    model = make_model(variant)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 12), generator=gen)
    # Two identical caches: one advanced by forward, one by decode (ragged rows take the masked path).
    caches = [KVCache(model.cfg, 2, 32), KVCache(model.cfg, 2, 32)]
    with torch.inference_mode():
        T = max(lens)
        for cache in caches:
            model.hidden_states(ids[:, :T], positions=cache.bind(0, [0, 0], T), cache=cache)
            cache.commit(0, lens)
        for _ in range(4):
            tok = torch.stack([ids[b, n] for b, n in enumerate(caches[0].lengths[:2])])[:, None]  # (2, 1)
            ref_cache, fast_cache = caches
            ref = model(tok, positions=ref_cache.bind(0, ref_cache.lengths[:2], 1), cache=ref_cache)[:, -1]
            got = model.decode(tok, positions=fast_cache.bind(0, fast_cache.lengths[:2], 1), cache=fast_cache)
            assert got.shape == (2, 97)
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
            for cache in caches:
                cache.commit(0, [1, 1])


def test_decode_calls_replaced_layers_normally():
    # An adapter that replaced a Linear (any other module type) must still run, hooks included.
    model = make_model("gpt2")
    calls = []

    class Adapter(nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    old = model.blocks[0].mlp.fc
    new = Adapter(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.blocks[0].mlp.fc = new
    hooked = []
    new.register_forward_hook(lambda *_: hooked.append(1))
    cache = KVCache(model.cfg, 1, 32)
    with torch.inference_mode():
        model.decode(torch.tensor([[3]]), positions=cache.bind(0, [0], 1), cache=cache)
    assert calls == [(1, 1, 32)] and hooked == [1]
