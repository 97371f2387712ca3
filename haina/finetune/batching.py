"""Batches of tokenized SFT examples: length-bucketed padding, or packing without cross-document attention.

A batch is a dict:

- `x` (B, T) input ids and `y` (B, T) targets, -100 where a token is not a training target or is padding;
  for one example x = ids[:-1] and y = ids[1:] kept where supervised[1:];
- `segments` (B, T): each token's document index within its row, -1 for padding (packed batches), or
  None (padded batches, where plain causal attention is right because padding comes last);
- `row_tokens` (B,): each row's real (non-padding) input tokens, and `tokens` their sum over the batch as drawn.
  The trainer counts `row_tokens`: under torchrun a rank keeps its rows of the global batch (`RankRows`
  slices the tensors with a row per example), and its share of the tokens must come with them.

T ≤ block_size. As for pretraining shards, all randomness of batch choice comes from the generator passed to
`get_batch`, so a run resumed with the generator's saved state draws exactly the batches it would have drawn.
`segment_positions_and_mask` turns segments into the `positions` and `attn_mask` the model takes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from haina.core.errors import HainaError
from haina.finetune.sft_data import Example
from haina.model.transformer import segment_positions_and_mask  # the model's side of packing (classifiers use it too)

__all__ = ["IGNORE_INDEX", "PackedBatches", "PaddedBatches", "segment_positions_and_mask"]

IGNORE_INDEX = -100  # the targets cross-entropy skips (`lm_loss`'s default)


class _Examples:
    """Examples held as three flat tensors rather than Python lists: ~5 bytes a token instead of ~40."""

    def __init__(self, examples: Sequence[Example], pad_id: int):
        if not examples:
            raise HainaError("no SFT examples to batch; check the data's rejects")
        lengths = [len(e.ids) for e in examples]
        if min(lengths) < 2:
            raise HainaError("an SFT example has fewer than 2 tokens: it has no target to train on")
        self.pad_id = pad_id
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])
        self.ids = torch.tensor([t for e in examples for t in e.ids], dtype=torch.int32)
        self.supervised = torch.tensor([s for e in examples for s in e.supervised], dtype=torch.bool)
        first = torch.zeros_like(self.supervised)
        first[self.starts] = True  # an example's first token is never a target
        self.supervised_tokens = int((self.supervised & ~first).sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def pair(self, i: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example i as (x, y), at most block_size long."""
        start = int(self.starts[i])
        n = min(int(self.lengths[i]), block_size + 1)
        ids = self.ids[start:start + n].long()
        y = ids[1:].masked_fill(~self.supervised[start + 1:start + n], IGNORE_INDEX)
        return ids[:-1], y

    def padded(self, indices: Sequence[int], block_size: int) -> dict:
        """Examples as rows padded on the right to the longest of them."""
        pairs = [self.pair(i, block_size) for i in indices]
        T = max(len(x) for x, _ in pairs)
        x = torch.full((len(pairs), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
        for row, (xi, yi) in enumerate(pairs):
            x[row, :len(xi)], y[row, :len(yi)] = xi, yi
        row_tokens = torch.tensor([len(xi) for xi, _ in pairs], dtype=torch.long)
        return {"x": x, "y": y, "segments": None, "row_tokens": row_tokens, "tokens": int(row_tokens.sum())}

    def packed(self, rows: list[list[int]], block_size: int) -> dict:
        """Rows of examples laid end to end in block_size tokens, each row padded at its end."""
        x = torch.full((len(rows), block_size), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.long)
        segments = torch.full((len(rows), block_size), -1, dtype=torch.long)
        row_tokens = torch.zeros(len(rows), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for doc, i in enumerate(row):
                xi, yi = self.pair(i, block_size)
                x[r, at:at + len(xi)], y[r, at:at + len(yi)], segments[r, at:at + len(xi)] = xi, yi, doc
                at += len(xi)
            row_tokens[r] = at
        return {"x": x, "y": y, "segments": segments, "row_tokens": row_tokens, "tokens": int(row_tokens.sum())}

    def width(self, i: int, block_size: int) -> int:
        """How many input positions example i takes in a row."""
        return min(int(self.lengths[i]), block_size + 1) - 1


class PaddedBatches:
    """Length-bucketed padding: batches of examples of similar length, padded to their longest.

    The examples sorted by length are cut into consecutive chunks of batch_size; a training batch is one
    chunk drawn uniformly (so each example is equally likely), in a random order. Padding only to the
    chunk's longest wastes little compute, and padding at the ends of rows needs no attention mask.

    Args:
        examples: tokenized examples (`tokenize_sft`).
        pad_id: the id put in padding positions (never a target, so any valid id works).
    """

    def __init__(self, examples: Sequence[Example], pad_id: int):
        self.data = _Examples(examples, pad_id)
        self.order = torch.argsort(self.data.lengths, stable=True)
        self._chunks: dict[int, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.data)

    @property
    def supervised_tokens(self) -> int:
        """Training targets in all the examples (before any cut to a smaller block_size)."""
        return self.data.supervised_tokens

    def chunks(self, batch_size: int) -> list[torch.Tensor]:
        """The length-sorted example indices cut into batches (the last may be smaller)."""
        if batch_size not in self._chunks:
            self._chunks[batch_size] = list(self.order.split(batch_size))
        return self._chunks[batch_size]

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
        chunks = self.chunks(batch_size)
        chunk = chunks[int(torch.randint(len(chunks), (1,), generator=generator))]
        chunk = chunk[torch.randperm(len(chunk), generator=generator)]
        return self.data.padded(chunk.tolist(), block_size)

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Every example once, in order, batch_size at a time (up to max_batches batches)."""
        for b, start in enumerate(range(0, len(self.data), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.data.padded(range(start, min(start + batch_size, len(self.data))), block_size)


class PackedBatches:
    """Packing: rows of exactly block_size tokens holding several examples, each attending only to itself.

    Examples are drawn uniformly at random (with replacement) and laid greedily into rows; one that does not
    fit the rest of a row starts the next row, and the row is padded at its end. The trainer turns
    `segments` into positions restarting at 0 per example and a block-diagonal causal mask
    (`segment_positions_and_mask`), so each example is computed exactly as if it ran alone.

    Args:
        examples: tokenized examples (`tokenize_sft`).
        pad_id: the id put in padding positions.
    """

    DRAW = 64  # examples drawn from the generator at a time

    def __init__(self, examples: Sequence[Example], pad_id: int):
        self.data = _Examples(examples, pad_id)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def supervised_tokens(self) -> int:
        """Training targets in all the examples (before any cut to a smaller block_size)."""
        return self.data.supervised_tokens

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
        rows: list[list[int]] = [[]]
        room = block_size
        while True:
            for i in torch.randint(len(self.data), (self.DRAW,), generator=generator).tolist():
                width = self.data.width(i, block_size)
                if width > room:
                    if len(rows) == batch_size:
                        return self.data.packed(rows, block_size)
                    rows.append([])
                    room = block_size
                rows[-1].append(i)
                room -= width

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Every example once, in order, packed greedily; batch_size rows at a time (up to max_batches)."""
        rows: list[list[int]] = []
        room = 0
        done = 0
        for i in range(len(self.data)):
            width = self.data.width(i, block_size)
            if not rows or width > room:
                if len(rows) == batch_size:
                    yield self.data.packed(rows, block_size)
                    done += 1
                    if max_batches is not None and done >= max_batches:
                        return
                    rows = []
                rows.append([])
                room = block_size
            rows[-1].append(i)
            room -= width
        if rows and (max_batches is None or done < max_batches):
            yield self.data.packed(rows, block_size)
