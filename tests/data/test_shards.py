"""TokenShards: one memory-mapped array per split, batches from a caller-owned generator, clear errors."""

import json

import numpy as np
import pytest
import torch

from haina.core.errors import HainaError
from haina.data.shards import TokenShards, find_tokenizer, read_meta


def _write(tmp_path, splits, dtype="uint16", shard_tokens=1000, vocab_size=1000, meta_extra=None):
    meta = {"format": "haina-shards/1", "dtype": dtype, "vocab_size": vocab_size, "eos_id": 0,
            "tokenizer_hash": "", "splits": {}}
    for split, ids in splits.items():
        ids = np.asarray(ids, dtype="<u2" if dtype == "uint16" else "<u4")
        names = []
        for i, start in enumerate(range(0, len(ids), shard_tokens)):
            names.append(f"{split}-{i:05d}.bin")
            ids[start : start + shard_tokens].tofile(tmp_path / names[-1])
        meta["splits"][split] = {"tokens": len(ids), "documents": 1, "shards": names}
    meta.update(meta_extra or {})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_split_reads_as_one_array_across_shards(tmp_path):
    ids = np.arange(2500) % 1000
    shards = TokenShards(_write(tmp_path, {"train": ids}, shard_tokens=1000), "train")
    assert len(shards) == 2500 and shards.vocab_size == 1000 and shards.dtype == np.dtype("<u2")
    # A window that straddles two shard boundaries comes back whole and in order.
    assert shards.window(990, 1020).tolist() == (np.arange(990, 2010) % 1000).tolist()
    assert shards.window(990, 20).dtype == np.int64


def test_uint32_ids_above_65535(tmp_path):
    ids = np.array([70_000, 1, 2, 99_999, 5])
    shards = TokenShards(_write(tmp_path, {"train": ids}, dtype="uint32", vocab_size=100_000), "train")
    assert shards.window(0, 5).tolist() == ids.tolist()


def test_get_batch_shapes_shift_and_determinism(tmp_path):
    shards = TokenShards(_write(tmp_path, {"train": np.arange(5000) % 997}, shard_tokens=777), "train")
    x, y = shards.get_batch(6, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # every row is a contiguous window of the data, y one token ahead
        start = int(row_x[0])
        assert row_x.tolist() == [(start + i) % 997 for i in range(32)]
        assert int(row_y[-1]) == (int(row_x[-1]) + 1) % 997
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = shards.get_batch(4, 16, g1), shards.get_batch(4, 16, g2)
    assert torch.equal(a[0], b[0])
    # The generator's state is the position in the data: restoring it replays the same batch.
    state = g1.get_state()
    nxt = shards.get_batch(4, 16, g1)
    g1.set_state(state)
    assert torch.equal(shards.get_batch(4, 16, g1)[0], nxt[0])
    assert not torch.equal(nxt[0], a[0])


def test_eval_batches_are_fixed_and_non_overlapping(tmp_path):
    shards = TokenShards(_write(tmp_path, {"val": np.arange(1000)}), "val")
    batches = list(shards.eval_batches(4, 10, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    starts = [int(r[0]) for x, _ in batches for r in x]
    assert len(set(starts)) == 12 and all(s % 10 == 0 for s in starts)  # aligned, distinct → disjoint inputs
    assert starts[-1] > 900  # spread over the split, not just its beginning
    again = [x for x, _ in shards.eval_batches(4, 10, max_batches=3)]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, batches))
    everything = list(shards.eval_batches(8, 10))
    assert sum(len(x) for x, _ in everything) == 99  # (1000 - 1) // 10 windows
    for x, y in everything:
        assert torch.equal(y, x + 1)


def test_errors_are_clear(tmp_path):
    with pytest.raises(HainaError, match="data directory not found"):
        TokenShards(tmp_path / "nope", "train")
    with pytest.raises(HainaError, match="no meta.json"):
        TokenShards(tmp_path, "train")
    _write(tmp_path, {"train": np.arange(10)}, meta_extra={"format": "other/2"})
    with pytest.raises(HainaError, match="expected 'haina-shards/1'"):
        read_meta(tmp_path)
    _write(tmp_path, {"train": np.arange(10)})
    with pytest.raises(HainaError, match="no split 'val'"):
        TokenShards(tmp_path, "val")
    shards = TokenShards(tmp_path, "train")
    with pytest.raises(HainaError, match="fewer than block_size"):
        shards.get_batch(2, 10, torch.Generator())
    (tmp_path / "train-00000.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(HainaError, match="truncated"):
        TokenShards(tmp_path, "train")


def test_tokenizer_hash_is_checked(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from haina.tokenizer import EOT, Tokenizer

    tok = Tokenizer(HFTokenizer(models.BPE(vocab={EOT: 0, "a": 1}, merges=[])))
    _write(tmp_path, {"train": np.arange(10) % 2}, meta_extra={"tokenizer_hash": "0123456789abcdef"})
    assert find_tokenizer(tmp_path) is None
    tok.save(tmp_path / "tokenizer")
    with pytest.raises(HainaError, match="not the one .* was tokenized with"):
        find_tokenizer(tmp_path)
    _write(tmp_path, {"train": np.arange(10) % 2}, meta_extra={"tokenizer_hash": tok.hash()})
    assert find_tokenizer(tmp_path) == tok
