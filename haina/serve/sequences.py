"""The sequences of one HTTP request: their text state (`Seq`) and their run through the engine loop (`Run`).

A request becomes one `Seq` per (prompt, sample); `Run` submits them to the engine loop and yields their events
as they come back, measuring latencies and aborting what is left when the client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from haina.core.errors import HainaError
from haina.generate.outputs import StepEvent, TokenLogprob
from haina.generate.sampling import SamplingParams
from haina.generate.text import SequenceDecoder
from haina.serve.loop import EngineFailure, EngineLoop, QueueFull, Sequence
from haina.serve.protocol import APIError
from haina.tokenizer import Tokenizer

if TYPE_CHECKING:
    from haina.serve.service import Service

__all__ = ["DISCONNECT_POLL_S", "Disconnected", "Run", "Seq"]

DISCONNECT_POLL_S = 0.5  # how often a request checks that its client is still there
Disconnected = Callable[[], Awaitable[bool]]


class Seq:
    """One sequence of a request: its text state (detokenizer, stop strings) and what it produced."""

    def __init__(self, index: int, request_id: str, prompt_index: int, tok: Tokenizer, stops: list[str],
                 stop_ids: frozenset[int], want_logprobs: bool, echo_text: str | None = None):
        self.index, self.request_id, self.prompt_index = index, request_id, prompt_index
        self.decoder = SequenceDecoder(tok, stops, stop_ids)
        self.want_logprobs = want_logprobs
        self.echo_text = echo_text
        self.num_tokens = 0
        self.logprobs: list[TokenLogprob | None] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.last_time: float | None = None

    @property
    def text(self) -> str:
        return self.decoder.text

    @property
    def all_logprobs(self) -> list[TokenLogprob | None]:
        """The log-probabilities of every generated token, a final stop token (EOS) included (`logprobs` leaves
        it out, as the text does)."""
        return (self.decoder.logprobs or []) if self.want_logprobs else []

    def feed(self, ev: StepEvent) -> tuple[str, list[TokenLogprob | None]]:
        """Take one engine event; return (new text, log-probabilities of the tokens behind it)."""
        self.num_tokens += len(ev.new_token_ids)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        out, hit, lps = self.decoder.feed(ev)
        new_lps = lps if self.want_logprobs else []
        self.logprobs += new_lps
        if hit:
            self.finish_reason = "stop"
        elif ev.finished:
            self.finish_reason = "length" if ev.finish_reason == "length" else "stop"
        return out, new_lps


class Run:
    """The sequences of one HTTP request in the engine, and their events as they come back."""

    def __init__(self, service: Service, loop: EngineLoop,
                 items: list[tuple[Seq, list[int], SamplingParams]], arrival: float, adapter: int = -1):
        self.service, self.loop, self.arrival = service, loop, arrival
        self.metrics = service.metrics
        self.pending = {s.request_id: s for s, _, _ in items}
        self.queue: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()

        def sink(item) -> None:
            aloop.call_soon_threadsafe(self.queue.put_nowait, item)

        if len(items) > loop.max_queue:  # could never be admitted: a 429 would be retried forever
            raise APIError(400, f"the request needs {len(items)} sequences (prompts x n), more than the server's "
                           f"queue of {loop.max_queue}; send fewer prompts or a smaller n", param="n")
        try:
            loop.submit([Sequence(s.request_id, ids, p, adapter) for s, ids, p in items], sink)
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for _, ids, _ in items))

    async def events(self, disconnected: Disconnected | None = None
                     ) -> AsyncIterator[tuple[Seq, str, list[TokenLogprob | None]]]:
        """Yield (sequence, new text, new logprobs) per engine event until every sequence has finished.

        Leaving early (client gone, cancelled) aborts what is still running, freeing the slots.
        """
        m = self.metrics
        check_at = time.perf_counter() + DISCONNECT_POLL_S
        try:
            while self.pending:
                try:  # the common case, an event already queued, without wait_for's timer
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
                    except TimeoutError:
                        if disconnected is not None and await disconnected():
                            return
                        continue
                if isinstance(item, EngineFailure):
                    raise APIError(500, str(item))
                if isinstance(item, BaseException):
                    raise APIError(400, str(item)) if isinstance(item, HainaError) else item
                seq = self.pending.get(item.request_id)
                if seq is None:
                    continue  # the abort event after a stop-string hit
                now = time.perf_counter()
                # Events keep coming while tokens flow, so the timeout above never fires: a non-streaming
                # client that left is noticed here (a stream also notices when its next send fails).
                if disconnected is not None and now >= check_at:
                    check_at = now + DISCONNECT_POLL_S
                    if await disconnected():
                        return
                if seq.last_time is None:
                    m.ttft.observe(now - self.arrival)
                elif item.new_token_ids:
                    m.itl.observe(now - seq.last_time)
                seq.last_time = now
                m.generation_tokens.inc(len(item.new_token_ids))
                text, lps = seq.feed(item)
                if seq.finish_reason is not None:
                    del self.pending[seq.request_id]
                    m.requests.labels(seq.finish_reason).inc()
                    if not item.finished:  # a stop string: the engine would go on
                        self.loop.abort([seq.request_id])
                yield seq, text, lps
            m.e2e.observe(time.perf_counter() - self.arrival)
        finally:
            if self.pending:
                self.loop.abort(list(self.pending))
                for _ in self.pending:
                    m.requests.labels("abort").inc()
                self.pending = {}
