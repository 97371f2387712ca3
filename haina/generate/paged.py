"""A KV cache whose memory follows the tokens it holds, allocated in blocks on demand, within an optional budget.

`KVCache` reserves every slot's whole context up front: 16 slots of 4,096 tokens of a 7B model are 64 GiB in
float32 before the first token. `PagedKVCache` keeps the same layout, (layers, slots, nkv, length, hs), but
allocates only `rows × length` of it: rows are the slots in use (the engine keeps them packed at the front),
length the longest sequence held, rounded up to whole blocks of `block` tokens. It grows when a pass needs
more, by at least half again (so a long generation copies the cache O(log n) times, not once per block), and
shrinks when what is held falls to a quarter of what is allocated; with nothing held it holds no memory.

Why not a pool of blocks with a table per slot (vLLM's layout)? Attention (SDPA) reads a batch's keys as one
(B, nkv, S, hs) tensor, so a paged slot has to be gathered into one every layer of every step. Measured on
2 CPU cores (decode of 128 tokens after a 128-token prompt, 5 interleaved rounds, the gather as one
`index_select` of the blocks per layer), that copy cost 23-33% of decode speed on the tiny preset and 5-14%
on the small one. This layout reads views, as `KVCache` does: through the engine (tiny and small presets, batch
1 and 8, short and long prompts, requests joining and leaving; 9 rounds of 1-thread CPU time) its speed was
within the machine's noise of the fixed cache's (medians 0.97-1.15x), its only own cost being the resizes
(at most 1.3% of the time, on the tiny preset), for 38-56% of the memory on the small one. The price: memory is
(sequences running) × (the longest of them), not the sum of their lengths, so sequences of very different
lengths waste the difference. Compared with `KVCache`, a short prompt no longer reserves the whole context.

With `budget_bytes`, the allocation never exceeds it: a pass that would need more raises a one-line
HainaError, and `fits` lets the engine check beforehand (it admits requests that fit and sends the newest
back to the queue when the running ones outgrow the budget). A resize briefly holds the old and the new
tensors together.
"""

from __future__ import annotations

import math

import torch

from haina.core.errors import HainaError
from haina.generate.cache import KVCacheBase
from haina.model.config import ModelConfig

__all__ = ["DEFAULT_BLOCK", "PagedKVCache"]

DEFAULT_BLOCK = 16  # tokens; growth is geometric, so the block only sets the smallest step (see the module doc)
_GROWTH = 1.5  # each axis grows to at least this times its capacity: amortized copies stay O(1) per token
_SHRINK_AT = 4  # shrink once the allocation is this many times what is held (hysteresis against regrowth)


class PagedKVCache(KVCacheBase):
    """Keys and values of up to `max_batch` sequences of up to `max_len` tokens, allocated as they grow.

    Args:
        cfg: the model's config (layers, key/value heads, head size).
        max_batch: number of slots.
        max_len: tokens per slot.
        device: where to allocate.
        dtype: element type (the model's parameter dtype).
        block: tokens per block: the length axis is allocated in whole blocks.
        budget_bytes: the most memory keys and values may take (None: grow as needed, up to
            max_batch × max_len).
    """

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, *, block: int = DEFAULT_BLOCK, budget_bytes: int | None = None):
        super().__init__(cfg, max_batch, max_len, device, dtype)
        if block < 1:
            raise HainaError(f"the KV cache block must hold at least 1 token, got {block}")
        self.block = block
        self.token_bytes = self.bytes_per_token(cfg, dtype)
        if budget_bytes is not None and budget_bytes < self.token_bytes:
            raise HainaError(f"a KV-cache budget of {budget_bytes} bytes holds no token of this model "
                             f"({self.token_bytes} bytes each); raise the budget")
        self.budget_bytes = budget_bytes
        # The budget in slot-tokens: rows × length of the allocation may not exceed it.
        self.budget_tokens = None if budget_bytes is None else budget_bytes // self.token_bytes
        self.resizes = 0
        self._resize(0, 0)  # empty storage until the first pass
        self.resizes = 0  # reallocations so far, growth and shrinking (the empty start not counted)

    # ------------------------------------------------------------------ what is held and what fits
    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, tokens per slot) allocated now."""
        return self._k_all.shape[1], self._k_all.shape[3]

    @property
    def tokens_held(self) -> int:
        """Tokens stored over all slots."""
        return sum(self.lengths)

    @property
    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the cache can hold alone: max_len, or less when the budget is smaller."""
        return self.max_len if self.budget_tokens is None else min(self.max_len, self.budget_tokens)

    def in_use(self) -> tuple[int, int]:
        """(slots up to the last one holding tokens, the longest length held): what a resize must keep."""
        rows = next((i + 1 for i in range(len(self.lengths) - 1, -1, -1) if self.lengths[i]), 0)
        return rows, max(self.lengths[:rows], default=0)

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` slots of `length` tokens each stay within the budget (always, without one)."""
        return self.budget_tokens is None or rows * length <= self.budget_tokens

    # ------------------------------------------------------------------ growth and shrinking
    def reserve(self, rows: int, length: int) -> None:
        """Make room for slots 0..rows-1 of `length` tokens each, keeping everything held.

        Raises:
            HainaError: when that, with what is held, exceeds the budget.
        """
        used_rows, used_len = self.in_use()
        need_rows, need_len = max(min(rows, self.max_batch), used_rows), max(min(length, self.max_len), used_len)
        cap_rows, cap_len = self.capacity
        if need_rows <= cap_rows and need_len <= cap_len:
            return
        if not self.fits(need_rows, need_len):
            raise HainaError(f"the KV cache needs {_mib(need_rows * need_len * self.token_bytes)} for {need_rows} "
                             f"sequence(s) of {need_len} tokens, over its budget of {_mib(self.budget_bytes)}; "
                             "raise the budget (--kv-budget-mb) or run fewer sequences at once")
        new_rows = cap_rows if need_rows <= cap_rows else _grown(cap_rows, need_rows, 1, self.max_batch)
        new_len = cap_len if need_len <= cap_len else _grown(cap_len, need_len, self.block, self.max_len)
        if self.budget_tokens is not None and new_rows * new_len > self.budget_tokens:
            # Give up growth headroom, never what is needed (which fits: checked above).
            new_len = max(need_len, min(new_len, self.budget_tokens // new_rows))
            new_rows = max(need_rows, min(new_rows, self.budget_tokens // new_len))
        self._resize(new_rows, new_len)

    def trim(self) -> None:
        """Give memory back once what is held is a small part of the allocation (all of it when nothing is)."""
        cap_rows, cap_len = self.capacity
        if not cap_rows * cap_len:
            return
        used_rows, used_len = self.in_use()
        if not used_rows:
            self._resize(0, 0)
        elif cap_rows * cap_len > _SHRINK_AT * used_rows * used_len:
            self._resize(used_rows, min(cap_len, _round_up(used_len, self.block)))

    def _resize(self, rows: int, length: int) -> None:
        """Reallocate to `rows` slots of `length` tokens, copying what is held."""
        shape = (self.n_layer, rows, self.n_kv, length, self.head_dim)
        # Zeros, not uninitialized memory: cells past a row's length are masked in attention, but a NaN
        # there would still poison the masked product.
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        r, n = self.in_use()
        if r and n:
            k[:, :r, :, :n] = self._k_all[:, :r, :, :n]
            v[:, :r, :, :n] = self._v_all[:, :r, :, :n]
        self._store(k, v)
        self.resizes += 1

    # ------------------------------------------------------------------ KVCacheBase, growing first
    def bind(self, row0: int, starts: list[int], T: int) -> torch.Tensor:
        """`KVCacheBase.bind`, after making room for the pass (see `reserve`)."""
        rows, end = row0 + len(starts), max(starts) + T
        cap_rows, cap_len = self.capacity
        if rows > cap_rows or end > cap_len:
            self.reserve(rows, end)  # beyond max_batch or max_len, bind's own check names the overflow
        return super().bind(row0, starts, T)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (to keep running slots packed when one leaves)."""
        if dst >= self.capacity[0]:
            self.reserve(dst + 1, self.lengths[src])
        super().move(src, dst)

    def reorder(self, rows: list[int]) -> None:
        """Slot b takes the contents of slot rows[b] for b < len(rows) (beam search's reshuffle)."""
        self.reserve(len(rows), max(self.lengths[r] for r in rows))
        super().reorder(rows)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _grown(cap: int, need: int, unit: int, limit: int) -> int:
    """A new capacity for `need`: at least half again the old one, in whole units, at most `limit`."""
    return min(limit, _round_up(max(need, math.ceil(cap * _GROWTH)), unit))


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:,.1f} MiB"
