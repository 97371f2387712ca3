"""SFT batching: deterministic draws, packing that equals running examples alone, length-bucketed padding."""

import pytest
import torch
import torch.nn.functional as F

from haina.finetune.batching import IGNORE_INDEX, PackedBatches, PaddedBatches, segment_positions_and_mask
from haina.finetune.sft_data import Example
from haina.model import ModelConfig, Transformer

V, BLOCK, PAD = 97, 24, 0


def make_examples(n: int = 40, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 30, (1,), generator=g))  # some longer than BLOCK + 1: cut when batched
        ids = torch.randint(1, V, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Example(ids, [False] * prompt + [True] * (length - prompt)))
    return out


def pair(ex: Example, block_size: int = BLOCK) -> tuple[list[int], list[int]]:
    ids, sup = ex.ids[:block_size + 1], ex.supervised[:block_size + 1]
    return ids[:-1], [t if s else IGNORE_INDEX for t, s in zip(ids[1:], sup[1:], strict=True)]


def segments_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """The (x, y) of every document in a packed batch, row by row."""
    out = []
    for x, y, seg in zip(batch["x"], batch["y"], batch["segments"], strict=True):
        for doc in range(int(seg.max()) + 1):
            keep = seg == doc
            assert keep.nonzero().flatten().diff().eq(1).all()  # contiguous
            out.append((x[keep].tolist(), y[keep].tolist()))
        pad = seg == -1
        assert (y[pad] == IGNORE_INDEX).all() and (x[pad] == PAD).all()
        assert pad.sum() == 0 or pad.nonzero().min() > (seg >= 0).nonzero().max()  # padding only at the end
    return out


@pytest.mark.parametrize("cls", [PackedBatches, PaddedBatches])
def test_batches_depend_only_on_the_generator_state(cls):
    data = cls(make_examples(), PAD)
    g = torch.Generator().manual_seed(7)
    data.get_batch(4, BLOCK, g)
    saved = g.get_state()
    first = data.get_batch(4, BLOCK, g)
    torch.manual_seed(123)  # global randomness plays no part
    resumed = torch.Generator()
    resumed.set_state(saved)
    again = data.get_batch(4, BLOCK, resumed)
    for k in ("x", "y", "segments", "tokens"):
        assert (first[k] is None and again[k] is None) or torch.equal(torch.as_tensor(first[k]),
                                                                      torch.as_tensor(again[k]))
    other = data.get_batch(4, BLOCK, torch.Generator().manual_seed(8))
    assert not torch.equal(first["x"][:, :5], other["x"][:, :5])


def test_packed_rows_hold_whole_examples_with_their_targets():
    examples = make_examples()
    data = PackedBatches(examples, PAD)
    g = torch.Generator().manual_seed(0)
    for block in (BLOCK, 64):  # examples cut to BLOCK + 1 tokens; several examples per row
        known = {tuple(pair(e, block)[0]): pair(e, block)[1] for e in examples}
        docs = []
        for _ in range(5):
            batch = data.get_batch(3, block, g)
            assert batch["x"].shape == batch["y"].shape == batch["segments"].shape == (3, block)
            assert batch["tokens"] == int((batch["segments"] >= 0).sum())
            docs += segments_of(batch)
        for x, y in docs:
            assert known[tuple(x)] == y
    assert len(docs) > 2 * 5 * 3  # short examples share rows


def test_packed_eval_covers_every_example_once_in_order():
    examples = make_examples(37)
    data = PackedBatches(examples, PAD)
    batches = list(data.eval_batches(4, BLOCK))
    assert [d for b in batches for d in segments_of(b)] == [pair(e) for e in examples]
    assert len(list(data.eval_batches(4, BLOCK, max_batches=2))) == 2
    assert len(data) == 37
    assert data.supervised_tokens == sum(sum(e.supervised[1:]) for e in examples)


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=V, block_size=BLOCK, n_layer=2, n_embd=32, **kw)
    return Transformer(cfg).eval()


def loss_sum(model: Transformer, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    logits = model(x, **kw)
    return F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("kw", [{"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}, {"pos": "learned"}])
def test_packed_loss_equals_the_examples_run_alone(kw):
    model = tiny_model(**kw)
    examples = make_examples(20)
    data = PackedBatches(examples, PAD)
    with torch.no_grad():
        packed = torch.zeros(())
        for batch in data.eval_batches(3, BLOCK):
            positions, mask = segment_positions_and_mask(batch["segments"])
            packed += loss_sum(model, batch["x"], batch["y"], positions=positions, attn_mask=mask)
        alone = sum(loss_sum(model, torch.tensor([x]), torch.tensor([y])) for x, y in map(pair, examples))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)


def test_segment_positions_and_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1, -1]])
    positions, mask = segment_positions_and_mask(seg)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0],   # padding sees itself only
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_padded_batches_are_bucketed_by_length():
    examples = make_examples(60)
    data = PaddedBatches(examples, PAD)
    g = torch.Generator().manual_seed(1)
    spreads = []
    for _ in range(10):
        batch = data.get_batch(6, 64, g)
        real = (batch["x"] != PAD).sum(1)  # ids are never PAD in these examples
        spreads.append(int(real.max() - real.min()))
        assert batch["segments"] is None and batch["x"].shape[1] == int(real.max())  # the longest, not block_size
        assert batch["tokens"] == int(real.sum())
        for x, y, n in zip(batch["x"], batch["y"], real, strict=True):
            assert (y[n:] == IGNORE_INDEX).all()
            assert (x[:n].tolist(), y[:n].tolist()) in [pair(e, 64) for e in examples]
    lengths = [len(e) for e in examples]
    assert max(spreads) < (max(lengths) - min(lengths)) / 3


def test_padded_batches_cut_to_block_size_and_eval_in_order():
    examples = make_examples(23)
    data = PaddedBatches(examples, PAD)
    batch = data.get_batch(23, BLOCK, torch.Generator().manual_seed(0))
    assert batch["x"].shape == (23, BLOCK)
    batches = list(data.eval_batches(5, BLOCK))
    assert [b["x"].shape[0] for b in batches] == [5, 5, 5, 5, 3]
    got = [(x.tolist(), y.tolist()) for b in batches for x, y in zip(b["x"], b["y"], strict=True)]
    for (x, y), e in zip(got, examples, strict=True):
        px, py = pair(e)
        assert x[:len(px)] == px and y[:len(py)] == py and all(t == IGNORE_INDEX for t in y[len(py):])
    assert len(list(data.eval_batches(5, BLOCK, max_batches=1))) == 1


def test_padded_loss_equals_the_examples_run_alone():
    model = tiny_model()
    examples = make_examples(12)
    data = PaddedBatches(examples, PAD)
    with torch.no_grad():
        padded = sum(loss_sum(model, b["x"], b["y"]) for b in data.eval_batches(4, BLOCK))
        alone = sum(loss_sum(model, torch.tensor([x]), torch.tensor([y])) for x, y in map(pair, examples))
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-5)
