"""The KV cache: memory as predicted, masks, slot moves."""

import pytest
import torch

from haina.core.errors import HainaError
from haina.generate import Engine, KVCache
from haina.model import ModelConfig, Transformer


@pytest.mark.parametrize("kw, dtype", [({}, torch.float32), ({"n_kv_head": 2}, torch.bfloat16),
                                       ({"n_kv_head": 1, "n_layer": 3}, torch.float16)])
def test_bytes_equal_the_formula_and_the_allocation(kw, dtype):
    cfg = ModelConfig.from_name("tiny", **kw)
    cache = KVCache(cfg, max_batch=3, max_len=40, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    predicted = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 3 * 40 * elem
    assert cache.bytes == predicted
    assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == predicted
    assert KVCache.bytes_per_token(cfg, dtype) * 3 * 40 == predicted


def test_engine_cache_is_sized_by_batch_and_context():
    cfg = ModelConfig.from_name("tiny", vocab_size=64, n_layer=2, n_embd=64, n_kv_head=2)
    engine = Engine(Transformer(cfg), max_batch_size=5, max_seq_len=100, kv_cache="fixed")
    assert engine.cache.bytes == 2 * 2 * 2 * 16 * 5 * 100 * 4


def test_masks_positions_and_overflow():
    cfg = ModelConfig.from_name("tiny", n_layer=1, n_embd=32, n_head=2)
    cache = KVCache(cfg, max_batch=2, max_len=8)
    pos = cache.bind(0, [0, 0], 3)
    k = torch.randn(2, 2, 3, 16)
    _, _, mask = cache.update(0, k, k)
    assert pos.tolist() == [[0, 1, 2]] * 2 and mask[0, 0].tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()
    cache.commit(0, [3, 2])
    pos = cache.bind(0, cache.lengths[:2], 1)
    k1 = torch.randn(2, 2, 1, 16)
    keys, _, mask = cache.update(0, k1, k1)
    assert pos.tolist() == [[3], [2]] and keys.shape == (2, 2, 4, 16)
    assert mask[:, 0, 0].tolist() == [[True] * 4, [True, True, True, False]]
    torch.testing.assert_close(keys[1, :, 2], k1[1, :, 0])  # row 1 wrote at its own position
    cache.commit(0, [1, 1])
    # Rows of one length decode without a mask.
    cache.lengths[:2] = [4, 4]
    cache.bind(0, [4, 4], 1)
    assert cache.update(0, k1, k1)[2] is None
    with pytest.raises(HainaError, match="overflow"):
        cache.bind(0, [7, 7], 2)


def test_move_and_reorder_copy_slots():
    cfg = ModelConfig.from_name("tiny", n_layer=2, n_embd=32, n_head=2)
    cache = KVCache(cfg, max_batch=3, max_len=6)
    for layer in range(2):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    cache.lengths[:] = [2, 5, 3]
    before = [t.clone() for t in cache.k]
    cache.move(1, 0)
    assert cache.lengths == [5, 0, 3]
    torch.testing.assert_close(cache.k[1][0, :, :5], before[1][1, :, :5])
    cache.reorder([2, 2, 0])
    assert cache.lengths == [3, 3, 5]
    torch.testing.assert_close(cache.k[0][1, :, :3], before[0][2, :, :3])
