"""A decode step that a CUDA graph can capture: fixed buckets, inputs and positions in device buffers.

On a GPU a small model's decode step is bound by launches, not arithmetic: GPT-2 124M in bf16 on an H200 decoded
229 tokens/s at batch 1, about 4 ms per token for some 150 kernels issued through some 330 Python calls, while its
weights stream from memory in well under 0.1 ms. A CUDA graph records a step's kernels once and replays them with
one launch. A graph fixes shapes and addresses, so the step here is written for that:

- Its inputs live in static buffers (token and position per row). The host writes the step's values into pinned
  memory and sends them in one non-blocking copy; nothing is read back.
- The batch is padded to a bucket (1, 2, 4, ... up to the cache's slots). The engine keeps its running rows packed
  at slots 0..n-1, so padded rows n..b-1 decode token 0 at position 0 of free slots: their writes land where no
  live row reads, and the next prefill of such a slot overwrites them.
- Keys are read over a bucket of lengths (128, 256, ... up to the cache's length) rather than the whole cache,
  with an additive mask built inside the step from the device positions: key j is visible to row i iff
  j <= position[i]. The mask is float (0 / -inf, the cache's dtype) rather than bool because attention converts
  a bool mask to that in every layer, an extra kernel per layer; once per step is enough.
- Each layer's new key and value are written with `index_put_` at the device positions; no Python int is ever
  taken from a device tensor, so nothing synchronizes with the host.

A graph is captured the first time its (batch, keys) bucket is used (after a warm-up run on a side stream, as
`torch.cuda.graphs` requires), all graphs sharing one memory pool, up to `max_graphs`; buckets beyond that run
the same step eagerly. The very same code runs eagerly (`use_graphs=False`), which is how the CPU tests check it
against `Transformer.decode` through `KVCache.bind/update/commit`.

Graphs read parameters by address: a weight updated in place (an optimizer step, `load_state_dict`) is seen by
the next replay, but a replaced one (a new Parameter, `param.data = ...`, a module swapped, a model moved or
cast) would leave a graph reading the old tensor (kept alive here, so never freed memory). So every call compares the model's parameters, buffers and
submodules with those the graphs were captured with (identity and data pointer: about 15 us for GPT-2 124M's
150 tensors on a slow CPU core) and captures again after any change.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.core.log import logger
from haina.generate.cache import KVCache
from haina.model.lora_serving import adapter_selection
from haina.model.transformer import Transformer

MIN_KEYS = 128  # the smallest key-length bucket: shorter buckets would save little reading and cost graphs
MAX_GRAPHS = 64  # 7 batch x 7 key buckets for 64 slots of 8k tokens; each graph keeps only its (b, V) logits
_DATA_PTR = torch.Tensor.data_ptr


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself: the sizes a step is padded to."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class StaticCacheView:
    """The `KVCacheLike` of a captured step: rows 0..b-1 of a `KVCache`'s tensors, written at device positions.

    `begin` fixes the bucket (b rows, L keys) and the positions (b, 1) for the next model call and builds the
    mask; each `update` then writes one layer's new keys and values and returns the keys and values of the rows
    over the first L positions. Slicing is by Python ints that depend only on the bucket, so a graph captured
    for a bucket stays valid for any positions.
    """

    def __init__(self, cache: KVCache):
        self._k_all, self._v_all = cache._k_all, cache._v_all  # (layers, slots, nkv, max_len, hs)
        self.dtype = cache.dtype
        self._rows_all = torch.arange(cache.max_batch, device=cache.device)[:, None]  # (slots, 1)
        self._keys_all = torch.arange(cache.max_len, device=cache.device)  # (max_len,)
        self._rows = self._pos = self._mask = None
        self._k = self._v = None

    def begin(self, b: int, L: int, positions: torch.Tensor) -> None:
        """Prepare a step over rows 0..b-1 at `positions` (b, 1), reading keys 0..L-1."""
        self._rows, self._pos = self._rows_all[:b], positions
        self._k, self._v = self._k_all[:, :b, :, :L], self._v_all[:, :b, :, :L]
        visible = (self._keys_all[:L] <= positions).view(b, 1, 1, L)
        self._mask = torch.full((b, 1, 1, L), float("-inf"), dtype=self.dtype,
                                device=positions.device).masked_fill_(visible, 0.0)

    def update(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (b, nkv, 1, hs) at each row's position; return keys/values (b, nkv, L, hs) and the mask."""
        kl, vl = self._k[layer], self._v[layer]
        kl[self._rows, :, self._pos] = k.transpose(1, 2)  # the indexed view is (b, 1, nkv, hs)
        vl[self._rows, :, self._pos] = v.transpose(1, 2)
        return kl, vl, self._mask


class DecodeGraphs:
    """One-token decode steps of rows 0..n-1 of a `KVCache`, replayed from CUDA graphs (or run eagerly).

    A stand-in for the engine's decode call (`KVCache.bind`, `Transformer.decode`, `KVCache.commit`) with the
    same results: `decode(last_tokens)` writes the rows' keys and values, advances `cache.lengths[:n]` by one and
    returns their logits.

    Args:
        model: the causal Transformer whose weights the cache holds keys and values of.
        cache: the engine's cache; the running rows are its slots 0..n-1.
        head: what computes logits from final hidden states (the engine's `DecodeHead`); None for the model's
            LM head.
        max_batch: the most rows a step decodes (default: the cache's slots).
        use_graphs: capture CUDA graphs; None captures iff the cache is on a CUDA device, False runs the same
            static step eagerly (what the CPU tests use).
        min_keys: the smallest key-length bucket.
        max_graphs: the most graphs kept; buckets past it run eagerly.
        warmup: eager runs of a bucket on a side stream before capturing it.
    """

    def __init__(self, model: Transformer, cache: KVCache, head: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 max_batch: int | None = None, use_graphs: bool | None = None, min_keys: int = MIN_KEYS,
                 max_graphs: int = MAX_GRAPHS, warmup: int = 2):
        if not isinstance(cache, KVCache):  # a paged cache reallocates as it grows: a graph would replay stale memory
            raise HainaError(f"CUDA graphs replay the fixed KV cache's tensors, not a {type(cache).__name__}; "
                             "use kv_cache='fixed'")
        max_batch = cache.max_batch if max_batch is None else max_batch
        if not 1 <= max_batch <= cache.max_batch:
            raise HainaError(f"max_batch must be 1..{cache.max_batch} (the cache's slots), got {max_batch}")
        if min_keys < 1:
            raise HainaError(f"min_keys must be at least 1, got {min_keys}")
        cuda = cache.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        if self.use_graphs and not cuda:
            raise HainaError(f"CUDA graphs need the KV cache on a CUDA device, and it is on {cache.device}; "
                             "pass use_graphs=False (or None) to run the static step eagerly")
        self.model, self.cache, self.head = model, cache, head
        self.max_batch, self.max_graphs, self.warmup = max_batch, max_graphs, warmup
        self.batch_buckets = buckets(max_batch)
        self.key_buckets = buckets(cache.max_len, min(min_keys, cache.max_len))
        device = cache.device
        # Inputs: row 0 the tokens, row 1 the positions. The host fills `_host` through a numpy view (cheaper
        # than building a tensor from a list); on a GPU it is pinned and copied over in one transfer.
        self._host = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=cuda)
        self._host_np = self._host.numpy()
        self._inputs = torch.zeros(2, max_batch, dtype=torch.long, device=device) if cuda else self._host
        self._tokens, self._positions = self._inputs[0, :, None], self._inputs[1, :, None]  # (max_batch, 1) each
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of `_host`, before it is rewritten
        self._view = StaticCacheView(cache)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._stream = None
        self._broken: str | None = None  # why capture failed once: the steps then run eagerly
        self.resets = 0  # how often the graphs were dropped because the weights changed
        self._watch()

    # ------------------------------------------------------------------ what it can run
    @property
    def supported(self) -> bool:
        """Whether `decode` can serve this model; `reason` (None when it can) says why not."""
        return self.reason is None

    def _check(self) -> str | None:
        model, cache = self.model, self.cache
        if not isinstance(model, Transformer):  # an Ensemble: its members' caches are views this step cannot make
            return f"{type(model).__name__} is not a single Transformer"
        if not model.cfg.causal:
            return "the model is an encoder (causal: false)"
        if adapter_selection(model) is not None:
            # A graph would freeze the adapter choice of the call it was captured in, and the selection's rows
            # must match the call's, which padding changes.
            return "the model holds stacked LoRA adapters, selected per row and per call"
        dtype = model.tok_emb.weight.dtype
        if dtype != cache.dtype:
            return f"the KV cache holds {cache.dtype} and the model computes in {dtype}"
        return None

    @property
    def graphs(self) -> int:
        """How many buckets have been captured."""
        return len(self._graphs)

    def bucket(self, n: int, keys: int) -> tuple[int, int]:
        """The (batch, key length) bucket of a step over n rows that reads `keys` keys (the longest row's)."""
        b = next(s for s in self.batch_buckets if s >= n)
        L = next(s for s in self.key_buckets if s >= keys)
        return b, L

    # ------------------------------------------------------------------ the step
    def decode(self, last_tokens: Sequence[int], n: int | None = None) -> torch.Tensor:
        """Logits (n, V) of one new token for each of rows 0..n-1, the token of row i at `cache.lengths[i]`.

        Writes the rows' keys and values and advances `cache.lengths[:n]` by one, as `KVCache.bind` and
        `commit` would. On a GPU the logits are a view of the graph's output buffer: valid until the next call.
        """
        n = len(last_tokens) if n is None else n
        cache = self.cache
        lengths = cache.lengths[:n]
        if not 1 <= n <= self.max_batch or len(last_tokens) != n:
            raise HainaError(f"decode takes 1..{self.max_batch} rows, one token each; got {len(last_tokens)} "
                             f"tokens for {n} rows")
        if max(lengths) >= cache.max_len:
            raise HainaError(f"KV cache overflow: a row already holds {max(lengths)} tokens, the most a slot of "
                             f"{cache.max_len} can take")
        if self.reason is not None:
            raise HainaError(f"this decode step cannot run here: {self.reason}; use Transformer.decode")
        if min(last_tokens) < 0 or max(last_tokens) >= self.model.cfg.vocab_size:
            # On a GPU an out-of-range embedding index is a device assertion that ends the process's CUDA context.
            raise HainaError(f"a token id is outside the vocabulary (0..{self.model.cfg.vocab_size - 1})")
        if not self._fresh():
            self.reset()
        b, L = self.bucket(n, max(lengths) + 1)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        host = self._host_np
        host[0, :n] = last_tokens
        host[1, :n] = lengths
        host[:, n:b] = 0  # padded rows: token 0 at position 0 of a free slot
        if self._copied is not None:
            self._inputs.copy_(self._host, non_blocking=True)
            self._copied.record()
        with torch.inference_mode(), _eval(self.model):
            logits = self._run(b, L)
        cache.lengths[:n] = [p + 1 for p in lengths]
        return logits[:n]

    def _step(self, b: int, L: int) -> torch.Tensor:
        """The step itself, on the static buffers: logits (b, V) of rows 0..b-1 reading L keys."""
        positions = self._positions[:b]
        self._view.begin(b, L, positions)
        return self.model.decode(self._tokens[:b], positions=positions, cache=self._view, head=self.head)

    def _run(self, b: int, L: int) -> torch.Tensor:
        captured = self._graphs.get((b, L))
        if captured is not None:
            graph, out = captured
            graph.replay()
            return out
        if not self.use_graphs or self._broken is not None or len(self._graphs) >= self.max_graphs:
            return self._step(b, L)
        try:
            return self._capture(b, L)
        except RuntimeError as err:  # an op that cannot be captured: stay correct, eagerly, and say so once
            self._broken = str(err).splitlines()[0]
            logger.warning(f"CUDA graph capture failed, decoding without graphs: {self._broken}")
            return self._step(b, L)

    def _capture(self, b: int, L: int) -> torch.Tensor:
        """Warm the bucket up on a side stream, capture it into the shared pool, replay it once.

        The warm-up runs are real steps: they write the same keys and values at the same positions as the
        replay that follows, so running the step more than once changes nothing.
        """
        device = self.cache.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):
                self._step(b, L)
        torch.cuda.current_stream(device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may use CUDA while this one captures.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            out = self._step(b, L)
        self._graphs[(b, L)] = (graph, out)
        graph.replay()
        return out

    # ------------------------------------------------------------------ weights that change
    def reset(self) -> None:
        """Drop every graph (and its memory) and look at the model afresh; the next steps capture again."""
        self._graphs.clear()
        self._pool = None
        self._broken = None
        self.resets += 1
        self._watch()

    def _watch(self) -> None:
        """Remember every parameter, buffer and submodule of the model, and where each tensor's data lives."""
        entries = [(store, name, obj) for m in self.model.modules()
                   for store in (m._parameters, m._buffers, m._modules)
                   for name, obj in store.items() if obj is not None]
        self._stores = [store for store, _, _ in entries]
        self._names = [name for _, name, _ in entries]
        self._objects = [obj for _, _, obj in entries]
        self._tensors = [obj for obj in self._objects if isinstance(obj, torch.Tensor)]
        self._tensors += [self.cache._k_all, self.cache._v_all]
        self._ptrs = tuple(map(_DATA_PTR, self._tensors))
        self.reason = self._check()

    def _fresh(self) -> bool:
        """Whether the model still holds the very tensors, at the very addresses, the graphs were captured with.

        About 150 tensors for GPT-2 124M: some 15 us on a slow CPU core, done with C-level maps.
        """
        return (all(map(operator.is_, map(dict.get, self._stores, self._names), self._objects))
                and tuple(map(_DATA_PTR, self._tensors)) == self._ptrs)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the step (no dropout in what is captured), restoring training mode after; free when in eval."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


__all__ = ["DecodeGraphs", "StaticCacheView", "buckets"]
