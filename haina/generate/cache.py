"""The slot-based KV cache that the engine owns, and its fixed, pre-allocated form.

Keys and values live in one (layers, slots, nkv, length, hs) tensor each. Each slot (row) is one
sequence with its own length, so requests join and leave independently. A forward pass covers a
contiguous run of slots: `bind` says which rows, where each row's new tokens start and how many
there are; the model then calls `update` once per layer; `commit` advances the lengths. The engine
keeps its running slots packed at the front (`move`), so the keys a step reads are a plain view of
the cache, never a gather. `KVCache` allocates every slot's whole length once (CUDA graphs need
its fixed addresses); `haina.generate.paged.PagedKVCache` grows and shrinks with the tokens held.
"""

from __future__ import annotations

import torch

from haina.core.errors import HainaError
from haina.model.config import ModelConfig


class KVCacheBase:
    """Slots of keys and values in one (layers, slots, nkv, length, hs) tensor each, and a forward pass over them.

    What the model, the engine, beam search and ensembles use (`bind`, `update`, `update_narrow`, `commit`,
    `move`, `reorder`, `reset`, `lengths`, `bytes`), over storage a subclass provides by calling `_store`:
    `KVCache` allocates every slot's whole length up front; `haina.generate.paged.PagedKVCache` grows it with
    the tokens held. `max_batch` and `max_len` are the logical limits; the storage may be smaller.
    """

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        if max_batch < 1 or max_len < 1:
            raise HainaError(f"KV cache needs max_batch >= 1 and max_len >= 1, got {max_batch} and {max_len}")
        self.n_layer, self.n_kv, self.head_dim = cfg.n_layer, cfg.kv_heads, cfg.head_dim
        self.max_batch, self.max_len, self.dtype = max_batch, max_len, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.lengths = [0] * max_batch  # tokens stored per slot
        # Set by `bind` for the forward pass in progress.
        self._row0, self._rows, self._T = 0, 0, 0
        self._starts: list[int] = []
        self._same_start = True
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._S = 0
        # Views over all layers, sliced once per pass: (k write, v write, k read, v read) when the rows
        # start at one position, else (k read, v read, row index) for per-row scattered writes.
        self._windows: tuple[torch.Tensor, ...] = ()

    def _store(self, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """Use k_all, v_all (layers, slots, nkv, length, hs) as the storage from now on."""
        # One tensor for all layers, so a step's write and read windows are sliced once (in `bind`)
        # rather than once per layer: the per-token Python overhead is what single-stream decode pays.
        self._k_all, self._v_all = k_all, v_all
        self.k = list(k_all.unbind(0))  # per-layer views (slots, nkv, length, hs)
        self.v = list(v_all.unbind(0))

    @property
    def bytes(self) -> int:
        """Memory of the keys and values allocated now."""
        return 2 * self._k_all.numel() * self._k_all.element_size()

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        """KV bytes one token of one sequence occupies: 2 · layers · kv_heads · head_dim · element size."""
        return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ a forward pass
    def bind(self, row0: int, starts: list[int], T: int) -> torch.Tensor:
        """Prepare a forward pass over slots row0 .. row0+len(starts)-1 with T new tokens each.

        Row b's tokens go to positions starts[b] .. starts[b]+T-1 (padding of a shorter row may
        write past its real end: those cells are masked now and overwritten later). Returns the
        positions (B, T) to give the model.
        """
        B = len(starts)
        end = max(starts) + T
        if row0 < 0 or row0 + B > self.max_batch or end > self.max_len:
            raise HainaError(f"KV cache overflow: rows {row0}..{row0 + B - 1} up to position {end} do not fit "
                             f"{self.max_batch} slots of {self.max_len} tokens")
        self._row0, self._rows, self._T, self._starts, self._S = row0, B, T, starts, end
        self._same_start = all(s == starts[0] for s in starts)
        ar = torch.arange(T, device=self.device)
        if self._same_start:
            pos = (ar + starts[0]).expand(B, T)
        else:
            pos = torch.tensor(starts, device=self.device)[:, None] + ar  # (B, T)
        self._pos = pos
        r1 = row0 + B
        if self._same_start:
            s = starts[0]
            self._windows = (self._k_all[:, row0:r1, :, s:s + T], self._v_all[:, row0:r1, :, s:s + T],
                             self._k_all[:, row0:r1, :, :end], self._v_all[:, row0:r1, :, :end])
        else:
            rows = torch.arange(B, device=self.device)[:, None]  # (B, 1), within the read window
            self._windows = (self._k_all[:, row0:r1, :, :end], self._v_all[:, row0:r1, :, :end], rows)
        # Key j is visible to query i of row b iff j <= starts[b] + i: causal within the new tokens,
        # everything before them, nothing of the row's stale tail. A single-token step over rows of
        # one length needs no mask at all.
        if T == 1 and self._same_start:
            self._mask = None
        else:
            keys = torch.arange(end, device=self.device)
            self._mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B or 1, 1, T, S)
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
        """Store k, v (B, nkv, T, hs) of `layer`; return all keys/values (B, nkv, S, hs) and the mask."""
        if self._same_start:
            kw, vw, kr, vr = self._windows
            kw[layer].copy_(k)
            vw[layer].copy_(v)
            if self._starts[0] == 0:  # a fresh prefill attends only to its own keys: skip reading them back
                return k, v, self._mask
            return kr[layer], vr[layer], self._mask
        kr, vr, rows = self._windows
        kr[layer][rows, :, self._pos] = k.transpose(1, 2)  # the indexed view is (B, T, nkv, hs)
        vr[layer][rows, :, self._pos] = v.transpose(1, 2)
        return kr[layer], vr[layer], self._mask

    def update_narrow(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor | None]:
        """`update` for keys and values with fewer heads or a smaller head size than the cache holds.

        They go into the leading heads and dimensions of the layer, and come back as views of that part.
        An ensemble's members share one cache (`haina.generate.ensemble`), shaped for the widest of them;
        kept apart from `update` so that a single model's step pays for no shape test.
        """
        nkv, hs = k.shape[1], k.shape[3]
        if self._same_start:
            kw, vw, kr, vr = self._windows
            kw[layer][:, :nkv, :, :hs].copy_(k)
            vw[layer][:, :nkv, :, :hs].copy_(v)
            if self._starts[0] == 0:
                return k, v, self._mask
            return kr[layer][:, :nkv, :, :hs], vr[layer][:, :nkv, :, :hs], self._mask
        kr, vr, rows = self._windows
        kr[layer][rows, :nkv, self._pos, :hs] = k.transpose(1, 2)  # indexed as (B, T, nkv, hs)
        vr[layer][rows, :nkv, self._pos, :hs] = v.transpose(1, 2)
        return kr[layer][:, :nkv, :, :hs], vr[layer][:, :nkv, :, :hs], self._mask

    def commit(self, row0: int, counts: list[int]) -> None:
        """Advance the lengths of slots row0.. by counts (the real, unpadded tokens of the pass)."""
        for b, c in enumerate(counts):
            self.lengths[row0 + b] = self._starts[b] + c

    # ------------------------------------------------------------------ slot management
    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (to keep running slots packed when one leaves)."""
        n = self.lengths[src]
        self._k_all[:, dst, :, :n] = self._k_all[:, src, :, :n]
        self._v_all[:, dst, :, :n] = self._v_all[:, src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def reorder(self, rows: list[int]) -> None:
        """Slot b takes the contents of slot rows[b] for b < len(rows) (beam search's reshuffle)."""
        n = max(self.lengths[r] for r in rows)
        idx = torch.tensor(rows, device=self.device)
        self._k_all[:, :len(rows), :, :n] = self._k_all[:, idx, :, :n]
        self._v_all[:, :len(rows), :, :n] = self._v_all[:, idx, :, :n]
        self.lengths[:len(rows)] = [self.lengths[r] for r in rows]

    def reset(self, slot: int) -> None:
        """Mark a slot empty (its memory is simply overwritten by the next user)."""
        self.lengths[slot] = 0


class KVCache(KVCacheBase):
    """Keys and values of `max_batch` sequences of up to `max_len` tokens each, allocated once.

    Its tensors never move, which CUDA graphs need (`haina.generate.graphs` captures their addresses).

    Args:
        cfg: the model's config (layers, key/value heads, head size).
        max_batch: number of slots.
        max_len: tokens per slot.
        device: where to allocate.
        dtype: element type (the model's parameter dtype).
    """

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(cfg, max_batch, max_len, device, dtype)
        shape = (cfg.n_layer, max_batch, self.n_kv, max_len, self.head_dim)
        self._store(torch.zeros(shape, device=self.device, dtype=dtype), torch.zeros(shape, device=self.device,
                                                                                      dtype=dtype))

    @property
    def bytes(self) -> int:
        """Memory of keys and values: 2 · layers · kv_heads · head_dim · max_batch · max_len · element size."""
        return super().bytes
