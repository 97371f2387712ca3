"""The generation engine: continuous batching over a slot-based KV cache, token ids in and out.

Each `step()` admits waiting requests into free cache slots and prefills them in one batched
forward pass (right-padded, causal mask), then runs one decode step (one token per row, a forward
of length 1) for every request that was already running. Rows keep their own lengths and
positions, so a prompt's greedy output does not depend on its batch neighbours. Finished requests
leave at once and the last running slot moves into the hole, keeping running slots packed at the
front of the cache.

On a CPU the KV cache is paged (`haina.generate.paged`): its memory follows the tokens held, and with
`kv_budget_mb` stays within a budget. Requests are admitted only while the running ones and they fit; when
the running ones outgrow the budget, the newest goes back to the front of the queue and later resumes by
prefilling its prompt and what it had generated (vLLM's preemption by recomputation). The fixed cache
(`haina.generate.cache.KVCache`) reserves every slot's whole context once; CUDA graphs need it, so on CUDA
it is the default without a budget.

A model holding several LoRA adapters (`haina.model.lora_serving.load_adapters`) serves each request with
its own one: before every model call the engine tells the adapter layers which adapter each row
uses, so requests for different adapters share a batch. A model without them costs nothing extra.

The engine knows nothing about tokenization (detokenization, stop strings and chat live in
`haina.generate.detok`, `text` and `chat`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from haina.core.errors import HainaError
from haina.generate.beam import beam_search
from haina.generate.cache import KVCache
from haina.generate.graphs import DecodeGraphs
from haina.generate.head import DecodeHead
from haina.generate.outputs import GenerationResult, StepEvent, TokenLogprob, token_logprobs
from haina.generate.paged import PagedKVCache
from haina.generate.sampling import RowState, SamplingParams, sample_tokens
from haina.model.lora_serving import adapter_selection
from haina.model.transformer import ENCODER_CANNOT_GENERATE, Transformer

__all__ = ["KV_CACHES", "Engine", "GenerationResult", "StepEvent", "TokenLogprob", "check_kv_options"]

KVCacheKind = Literal["auto", "paged", "fixed"]
KV_CACHES: tuple[str, ...] = get_args(KVCacheKind)


def check_kv_options(kind: str, budget_mb: float | None) -> None:
    """One line for a KV-cache kind or budget the engine would refuse (a server checks before loading)."""
    if kind not in KV_CACHES:
        raise HainaError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got '{kind}'")
    if budget_mb is not None and not budget_mb > 0:
        raise HainaError(f"kv_budget_mb must be positive, got {budget_mb}")
    if kind == "fixed" and budget_mb is not None:
        raise HainaError("kv_budget_mb bounds the paged KV cache; use kv_cache 'paged' (or 'auto') with it, "
                         "or drop the budget")


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # max_new_tokens clamped to the context
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    row: RowState
    output: list[int] = field(default_factory=list)
    slot: int = -1
    aborted: bool = False
    done: bool = False  # finished this step; leaves the running slots at the end of it
    adapter: int = -1  # the LoRA adapter it runs with (an index into the model's; -1: the base alone)


class Engine:
    """Continuous-batching generation for one `Transformer`.

    Args:
        model: the model (put in eval mode for each step, restored afterwards); an `Ensemble` of several
            (`haina.generate.ensemble`) runs the same way, its members sharing the one KV cache.
        max_batch_size: KV-cache slots, i.e. requests decoded together; more wait in a queue.
        max_seq_len: tokens per sequence, prompt included (default: the model's block size).
        eos_token_id: ends a request unless its params say `ignore_eos`; None for no EOS.
        device: where to run (default: where the model's parameters are).
        kv_cache: "paged" (memory follows the tokens held), "fixed" (every slot's whole context reserved up
            front; what CUDA graphs replay), or "auto": fixed on CUDA without a budget, else paged.
        kv_budget_mb: the most memory the paged KV cache may take, in MiB (None: as much as it needs); it
            also bounds one sequence's context.
    """

    def __init__(self, model: Transformer, *, max_batch_size: int = 16, max_seq_len: int | None = None,
                 eos_token_id: int | None = None, device: str | torch.device | None = None,
                 kv_cache: KVCacheKind = "auto", kv_budget_mb: float | None = None):
        cfg = model.cfg
        if not cfg.causal:
            raise HainaError(ENCODER_CANNOT_GENERATE)
        if device is not None:
            model.to(device)
        param = next(model.parameters())
        self.model, self.cfg = model, cfg
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = max_seq_len or cfg.block_size
        if cfg.pos == "learned" and self.max_seq_len > cfg.block_size:
            raise HainaError(f"max_seq_len {self.max_seq_len} exceeds the learned positions of the model "
                             f"({cfg.block_size}); use at most {cfg.block_size}")
        if max_batch_size < 1:
            raise HainaError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.eos_token_id = eos_token_id
        self.cache = self._make_cache(kv_cache, kv_budget_mb)
        self._paged = isinstance(self.cache, PagedKVCache)
        self._budgeted = self._paged and self.cache.budget_bytes is not None
        if self._paged:
            self.max_seq_len = self.cache.max_tokens_per_sequence  # a budget may hold less than the context
        self.num_preempted = 0  # requests sent back to the queue to stay within the KV budget, so far
        self._head = DecodeHead(model)
        self._adapters = adapter_selection(model)  # None for a model without stacked adapters: no work per call
        # On CUDA the decode step replays CUDA graphs (haina.generate.graphs) over the fixed cache's tensors;
        # on a CPU the eager step is faster.
        use_graphs = self.device.type == "cuda" and not self._paged
        self._graphs = DecodeGraphs(model, self.cache, self._head) if use_graphs else None
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # index == cache slot
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    def _make_cache(self, kind: str, budget_mb: float | None) -> KVCache | PagedKVCache:
        """The KV cache `kind` asks for (see the class doc), checked against the budget."""
        check_kv_options(kind, budget_mb)
        if kind == "fixed":
            return KVCache(self.cfg, self.max_batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)
        if kind == "auto" and self.device.type == "cuda" and budget_mb is None:
            return KVCache(self.cfg, self.max_batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)
        budget = None if budget_mb is None else int(budget_mb * 2**20)
        per_token = KVCache.bytes_per_token(self.cfg, self.dtype)
        if budget is not None and budget < 2 * per_token:
            raise HainaError(f"a KV budget of {budget_mb} MiB holds fewer than 2 tokens of this model ({per_token:,} "
                             "bytes each); raise kv_budget_mb (--kv-budget-mb)")
        return PagedKVCache(self.cfg, self.max_batch_size, self.max_seq_len, device=self.device, dtype=self.dtype,
                            budget_bytes=budget)

    # ------------------------------------------------------------------ queue
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_adapters(self) -> int:
        """LoRA adapters the model holds (`haina.model.lora_serving.load_adapters`), selectable per request."""
        return 0 if self._adapters is None else self._adapters.count

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: int = -1) -> None:
        """Validate and queue one sequence; it starts at the next `step()` with a free slot.

        One request is one sequence: for `n > 1` add n requests (with seeds seed, seed+1, ...)
        or use `generate`; beam search runs through `generate`. `adapter` is the index of the LoRA
        adapter to run it with (see `num_adapters`); -1 is the base alone.
        """
        if request_id in self._requests:
            raise HainaError(f"request id '{request_id}' is already in use; give each request a unique id")
        params.validate(self.cfg.vocab_size)
        if params.n != 1 or params.num_beams != 1:
            raise HainaError("add_request runs one sequence: add n requests for n samples, and use generate() for "
                             "beam search")
        self._requests[request_id] = self._make_request(request_id, prompt_ids, params, adapter=adapter)
        self._waiting.append(self._requests[request_id])

    def _make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      seed_offset: int = 0, adapter: int = -1) -> _Request:
        self.check_adapter(adapter)
        prompt = self.check_prompt(prompt_ids, params)
        max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        stop = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop.add(self.eos_token_id)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed + seed_offset)
        row = RowState(params=params, tokens=list(prompt), prompt_len=len(prompt))
        return _Request(request_id, prompt, params, max_new, frozenset(stop), gen, row, adapter=adapter)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Validate params and prompt (HainaError naming the problem); returns the prompt as a list."""
        params.validate(self.cfg.vocab_size)
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise HainaError("the prompt is empty; give at least one token (e.g. the BOS or EOS token)")
        if len(prompt) >= self.max_seq_len:
            fix = "shorten the prompt"
            if self.max_seq_len < self.cache.max_len:  # the KV budget, not the model, sets the context
                fix += f" or raise kv_budget_mb (its {self.cache.budget_bytes / 2**20:g} MiB hold {self.max_seq_len} tokens)"
            raise HainaError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}, "
                             f"leaving no room to generate; {fix}")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise HainaError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        return prompt

    def check_adapter(self, adapter: int) -> None:
        """A one-line HainaError unless `adapter` is -1 (the base) or the index of an adapter the model holds."""
        if adapter != -1 and not 0 <= adapter < self.num_adapters:
            raise HainaError(f"adapter {adapter} is not loaded: the model holds {self.num_adapters} adapter(s) "
                             "(haina.model.lora_serving.load_adapters stacks them); -1 runs the base alone")

    def _select(self, adapters: int | list[int]) -> None:
        """Tell the adapter layers which adapter each row of the next model call uses."""
        if self._adapters is not None:
            self._adapters.select(adapters, self.device)

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot frees and it reports finish_reason "abort" at the next step."""
        req = self._requests.get(request_id)
        if req is not None:
            req.aborted = True

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepEvent]:
        """Admit waiting requests (batched prefill), decode one token for the others, report events."""
        events: list[StepEvent] = []
        with torch.inference_mode(), _eval(self.model):
            self._drop_aborted(events)
            if self._budgeted:
                self._preempt_to_fit()
            old = len(self._running)
            newcomers = self._admit(self.max_batch_size - old)
            for req in newcomers:
                req.slot = len(self._running)
                self._running.append(req)
            if old:
                self._forward(self._running[:old], prefill=False, events=events)
            if newcomers:
                self._forward(newcomers, prefill=True, events=events)
            self._retire()
        return events

    def _admit(self, free: int) -> list[_Request]:
        """Take up to `free` requests from the front of the queue, in order, as long as the KV budget holds them.

        Room is checked for the step after this one too (every row one token longer), so that a request
        admitted now is not sent back before it has decoded.
        """
        if not self._budgeted:
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        n = len(self._running)
        longest = max(self.cache.lengths[:n]) + 1 if n else 0  # after this step's decode
        taken: list[_Request] = []
        while self._waiting and len(taken) < free:
            longest = max(longest, len(self._waiting[0].prompt) + len(self._waiting[0].output))
            if not self.cache.fits(n + len(taken) + 1, longest + 1):
                break
            taken.append(self._waiting.popleft())
        return taken

    def _preempt_to_fit(self) -> None:
        """Send the newest running requests back to the front of the queue until a decode step fits the budget.

        A request alone always fits (the budget bounds `max_seq_len`). One sent back keeps its tokens and its
        sampling state, and on readmission prefills its prompt and its output so far, then goes on as before.
        """
        lengths, n = self.cache.lengths, len(self._running)
        while n > 1 and not self.cache.fits(n, max(lengths[:n]) + 1):
            req = self._running.pop()
            self.cache.reset(req.slot)
            req.slot = -1
            self._waiting.appendleft(req)
            self.num_preempted += 1
            n -= 1

    def _drop_aborted(self, events: list[StepEvent]) -> None:
        aborted = [r for r in self._waiting if r.aborted]
        if aborted:
            self._waiting = deque(r for r in self._waiting if not r.aborted)
        aborted += [r for r in self._running if r.aborted]
        for req in aborted:
            events.append(self._event(req, [], None, "abort"))
        if any(r.aborted for r in self._running):
            self._retire()
        for req in aborted:
            self._requests.pop(req.request_id, None)

    def _retire(self) -> None:
        """Remove finished rows; the last running slot moves into each hole (highest hole first)."""
        done = [r.slot for r in self._running if r.done or r.aborted]
        for slot in sorted(done, reverse=True):
            last = len(self._running) - 1
            if slot != last:
                self.cache.move(last, slot)
                self._running[slot] = self._running[last]
                self._running[slot].slot = slot
            else:
                self.cache.reset(slot)
            self._running.pop()
        if self._paged and done:
            self.cache.trim()  # memory goes back as requests leave

    def _forward(self, reqs: list[_Request], *, prefill: bool, events: list[StepEvent]) -> None:
        """One forward pass over the contiguous slots of `reqs`, then sample one token per row."""
        model, row0 = self.model, reqs[0].slot
        if self._adapters is not None:
            self._adapters.select([r.adapter for r in reqs], self.device)
        if prefill:
            # A request sent back to the queue (`_preempt_to_fit`) prefills its output so far after its prompt.
            ctx = [r.prompt + r.output if r.output else r.prompt for r in reqs]
            lens = [len(c) for c in ctx]
            T = max(lens)
            idx = torch.tensor([c + [0] * (T - len(c)) for c in ctx], device=self.device)
            positions = self.cache.bind(row0, [0] * len(reqs), T)
            h = model.hidden_states(idx, positions=positions, cache=self.cache)  # (B, T, C)
            last = h[torch.arange(len(reqs), device=self.device), torch.tensor(lens, device=self.device) - 1]
            self.cache.commit(row0, lens)
            logits = model.lm_head(last)  # (B, V)
        elif self._graphs is not None and self._graphs.supported:  # decoding rows are slots 0..n-1
            logits = self._graphs.decode([r.output[-1] for r in reqs])  # (B, V); advances the cache lengths
        else:
            idx = torch.tensor([[r.output[-1]] for r in reqs], device=self.device)
            starts = self.cache.lengths[row0:row0 + len(reqs)]
            positions = self.cache.bind(row0, starts, 1)
            logits = model.decode(idx, positions=positions, cache=self.cache, head=self._head)  # (B, V)
            self.cache.commit(row0, [1] * len(reqs))
        # Sampling and log-probabilities in fp32, whatever the model's dtype.
        logits = logits.float()
        want_lp = [r.params.logprobs for r in reqs]
        raw_lp = logits.log_softmax(dim=-1) if any(k is not None for k in want_lp) else None
        tokens = sample_tokens(logits, [r.row for r in reqs], [r.generator for r in reqs]).tolist()
        token_lps = token_logprobs(raw_lp, tokens, want_lp) if raw_lp is not None else [None] * len(reqs)
        prompt_lps = [None] * len(reqs)
        if prefill and any(r.params.prompt_logprobs is not None and not r.output for r in reqs):
            for b, r in enumerate(reqs):
                if r.params.prompt_logprobs is not None and not r.output:  # not again after a preemption
                    full = model.lm_head(h[b, :len(r.prompt) - 1]).float().log_softmax(dim=-1)
                    prompt_lps[b] = [None] + token_logprobs(full, r.prompt[1:],
                                                             [r.params.prompt_logprobs] * (len(r.prompt) - 1))
        for b, (req, tok) in enumerate(zip(reqs, tokens)):
            req.output.append(tok)
            req.row.tokens.append(tok)
            reason = "stop" if tok in req.stop_ids else "length" if len(req.output) >= req.max_new else None
            lps = [token_lps[b]] if token_lps[b] is not None else None
            events.append(self._event(req, [tok], lps, reason, prompt_lps[b]))
            if reason is not None:
                req.done = True
                self._requests.pop(req.request_id, None)

    def _event(self, req: _Request, new: list[int], lps: list[TokenLogprob] | None, reason: str | None,
               prompt_lps: list[TokenLogprob | None] | None = None) -> StepEvent:
        if req.params.logprobs is not None and lps is None:
            lps = []
        return StepEvent(request_id=req.request_id, new_token_ids=new, logprobs=lps, prompt_logprobs=prompt_lps,
                         finished=reason is not None, finish_reason=reason, num_prompt_tokens=len(req.prompt),
                         num_generated_tokens=len(req.output))

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[list[GenerationResult]]:
        """Run prompts to completion: per prompt, its n samples (or its num_beams best beams, best first).

        Sample i of a seeded request uses seed + i. Drives `step()` itself: do not mix with
        step-level use of the same engine.
        """
        plist = list(params) if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise HainaError(f"got {len(plist)} sampling params for {len(prompts)} prompts; give one or one each")
        results: list[list[GenerationResult]] = [[] for _ in prompts]
        tag = next(self._ids)
        keys: dict[str, tuple[int, int]] = {}
        reqs: list[_Request] = []
        for p, (prompt, sp) in enumerate(zip(prompts, plist)):
            if sp.num_beams > 1:
                self.check_prompt(prompt, sp)
                continue
            for i in range(sp.n):
                rid = f"_generate-{tag}-{p}-{i}"
                reqs.append(self._make_request(rid, prompt, sp, seed_offset=i))
                keys[rid] = (p, i)
        for p, (prompt, sp) in enumerate(zip(prompts, plist)):
            if sp.num_beams > 1:
                self._select(-1)  # beam search calls the model itself: with the base, as these requests ask
                results[p] = beam_search(self, prompt, sp)
        for req in reqs:
            self._requests[req.request_id] = req
            self._waiting.append(req)
        collected = {rid: _Collector() for rid in keys}
        remaining = len(collected)
        while remaining:
            for ev in self.step():
                if ev.request_id in collected:
                    collected[ev.request_id].add(ev)
                    remaining -= ev.finished
        for rid, (p, _) in keys.items():  # keys are in sample order
            results[p].append(collected[rid].result())
        return results

    def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: int = -1) -> Iterator[StepEvent]:
        """Yield the events of one request as its tokens arrive (n = 1, no beams), run with `adapter`.

        Closing the iterator early aborts the request. Drives `step()` itself.
        """
        rid = f"_stream-{next(self._ids)}"
        self.add_request(rid, prompt_ids, params, adapter=adapter)
        finished = False
        try:
            while not finished:
                for ev in self.step():
                    if ev.request_id == rid:
                        finished = ev.finished
                        yield ev
        finally:
            if not finished and rid in self._requests:
                req = self._requests.pop(rid)
                if req in self._waiting:
                    self._waiting.remove(req)
                else:
                    req.aborted = True
                    self._retire()

    def prompt_logprobs(self, prompt_ids: list[int], k: int, adapter: int = -1) -> list[TokenLogprob | None]:
        """Log-probability of each prompt token given those before it, with k alternatives (entry 0 None).

        `adapter`: the LoRA adapter to score with (-1: the base alone).
        """
        prompt = list(prompt_ids)
        self.check_adapter(adapter)
        self._select(adapter)
        with torch.inference_mode(), _eval(self.model):
            lp = self.model(torch.tensor([prompt], device=self.device))[0, :-1].float().log_softmax(dim=-1)
            return [None] + token_logprobs(lp, prompt[1:], [k] * (len(prompt) - 1))

    def score(self, sequences: list[list[int]], adapter: int = -1) -> list[list[float | None]]:
        """log p(token_i | tokens before i) for every token of every sequence (entry 0 is None).

        `adapter`: the LoRA adapter to score with (-1: the base alone).
        """
        self.check_adapter(adapter)
        out: list[list[float | None]] = []
        for seq in sequences:
            if not seq:
                raise HainaError("cannot score an empty sequence")
            if len(seq) > self.max_seq_len:
                raise HainaError(f"sequence of {len(seq)} tokens exceeds the context of {self.max_seq_len}")
        self._select(adapter)
        with torch.inference_mode(), _eval(self.model):
            for i in range(0, len(sequences), self.max_batch_size):
                chunk = sequences[i:i + self.max_batch_size]
                T = max(len(s) for s in chunk)
                idx = torch.tensor([list(s) + [0] * (T - len(s)) for s in chunk], device=self.device)
                # Right padding is harmless under the causal mask: no real token sees it.
                lp = self.model(idx).float().log_softmax(dim=-1)  # (B, T, V)
                nxt = idx[:, 1:].unsqueeze(-1)
                picked = lp[:, :-1].gather(-1, nxt).squeeze(-1).tolist()  # (B, T-1)
                for b, s in enumerate(chunk):
                    out.append([None] + picked[b][:len(s) - 1])
        return out


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout), restoring training mode after."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class _Collector:
    """Accumulates the events of one request into a GenerationResult."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.reason: str | None = None
        self.done = False

    def add(self, ev: StepEvent) -> None:
        self.tokens += ev.new_token_ids
        if ev.logprobs is not None:
            self.logprobs = (self.logprobs or []) + ev.logprobs
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finished:
            self.done, self.reason = True, ev.finish_reason

    def result(self) -> GenerationResult:
        return GenerationResult(token_ids=self.tokens, finish_reason=self.reason or "length",
                                logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)
