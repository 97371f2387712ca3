"""The engine loop: one thread owns the `Engine` and steps it for every request of the server.

The engine is not thread-safe, so everything that touches it (adding, aborting, stepping,
scoring) happens on this thread. Other threads talk to it through an inbox; events go back
through each request's sink (a callable the asyncio side gives, which hops onto its event loop).
New requests join the running batch at the next step: the engine admits them into free slots.
Requests past their deadline (`request_timeout`) and, at the end of a drain, all requests are
cancelled here too: aborted in the engine and failed with `Cancelled`, which the HTTP layer answers.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from haina.core.log import logger
from haina.generate.engine import Engine
from haina.generate.outputs import StepEvent
from haina.generate.sampling import SamplingParams
from haina.serve.metrics import ServeMetrics

__all__ = ["Cancelled", "EngineFailure", "EngineLoop", "QueueFull", "Sequence"]

Sink = Callable[[StepEvent | BaseException], None]

# A request cut off by the server's own time limit is a 504, not a 408: RFC 9110 gives 408 to a client that was
# too slow to *send* its request (clients then resend it on a new connection as if it was never seen), while
# here the request arrived whole and the server failed to answer in time, its engine acting as the upstream that
# did not respond. A 5xx also puts the failure where monitoring looks for the server's own.
TIMEOUT_STATUS = 504


class QueueFull(Exception):
    """Admitting the request would put more than `max_queue` sequences in the waiting queue."""


class EngineFailure(Exception):
    """The engine raised while stepping; every request in flight fails with this."""


class Cancelled(Exception):
    """The server cancelled a request on purpose (its deadline passed, a drain ran out of time).

    Args:
        message: what the client is told.
        status: the HTTP status it is told with (the response, or a stream's error event).
    """

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class Sequence:
    """One engine request: its id, prompt ids, sampling params and LoRA adapter (-1: the base alone)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int = -1


class EngineLoop:
    """Runs `engine.step()` on a background thread while there is work, and sleeps on the inbox otherwise.

    Args:
        make_engine: builds the engine (called again to start afresh if a step ever raises).
        metrics: gauges and the queue-time histogram are updated from the loop.
        max_queue: most sequences waiting for a slot; more is refused with `QueueFull`.
        request_timeout: seconds from `submit` until a request's sequences are aborted and it fails with
            `Cancelled` (status 504); checked between engine steps, so one long step (a huge prefill, or a
            prompt-scoring `call`) finishes first. None: no limit.
    """

    def __init__(self, make_engine: Callable[[], Engine], metrics: ServeMetrics, max_queue: int = 256,
                 request_timeout: float | None = None):
        self._make_engine = make_engine
        self.engine = make_engine()
        self.metrics = metrics
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._deadlines: dict[str, float] = {}  # request id -> time.monotonic() past which it is cancelled
        self._submitted: dict[str, float] = {}  # queued request id -> submit time (not yet admitted)
        self._lock = threading.Lock()
        self._waiting = 0
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="haina-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def submit(self, seqs: list[Sequence], sink: Sink) -> None:
        """Queue sequences (all or none); raise `QueueFull` when the waiting queue has no room for them."""
        with self._lock:
            self._reserve(len(seqs))
            now = time.perf_counter()
            for s in seqs:
                self._submitted[s.request_id] = now
        self.metrics.waiting.set(self._waiting)
        # The clock starts here, in the caller's thread, so time spent in the inbox counts too.
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        self._inbox.put(("add", (seqs, sink, deadline)))

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests; their slots free at the next step."""
        if request_ids:
            self._inbox.put(("abort", list(request_ids)))

    def cancel_all(self, error: Cancelled) -> None:
        """Abort every request the engine holds, running or waiting, and fail each with `error`."""
        self._inbox.put(("cancel_all", error))

    def call(self, fn: Callable[[Engine], Any], queued: bool = False) -> Future:
        """Run `fn(engine)` on the loop thread between steps; its result comes as a Future.

        queued: the call is request work (scoring a prompt) and counts as one waiting sequence until it runs,
        so that a flood of such requests meets `QueueFull` like any other.
        """
        if queued:
            with self._lock:
                self._reserve(1)
        fut: Future = Future()
        self._inbox.put(("call", (fn, fut, queued)))
        return fut

    def _reserve(self, n: int) -> None:
        """Count n more waiting sequences, or raise `QueueFull`; the caller holds the lock."""
        if self._waiting + n > self.max_queue:
            raise QueueFull(f"the server queue is full ({self._waiting} sequences waiting, limit "
                            f"{self.max_queue}); retry later")
        self._waiting += n

    def close(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        while not self._stop:
            try:
                self._drain(block=not self.engine.has_unfinished())
                if self._stop:
                    break
                if self._deadlines:
                    self._expire()
                if self.engine.has_unfinished():
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the thread silently: fail what is in flight
                logger.exception("engine loop error")
                self._fail_all(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineFailure("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        """Handle every message in the inbox; wait for the first one when there is nothing to step."""
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "stop":
                return
            if kind == "add":
                self._add(*payload)
            elif kind == "abort":
                for rid in payload:
                    self.engine.abort(rid)
            elif kind == "cancel_all":
                # Abort in the engine too (unlike a failed step, the engine is sound and stays): the slots free
                # at the next step, whose abort events find no sink and go nowhere.
                for rid in self._sinks:
                    self.engine.abort(rid)
                self._fail_all(payload)
            elif kind == "call":
                fn, fut, queued = payload
                if queued:
                    with self._lock:
                        self._waiting = max(0, self._waiting - 1)  # _fail_all may have zeroed it meanwhile
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.engine))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                        fut.set_exception(e)

    def _add(self, seqs: list[Sequence], sink: Sink, deadline: float | None) -> None:
        for s in seqs:
            try:
                self.engine.add_request(s.request_id, s.prompt_ids, s.params, adapter=s.adapter)
            except Exception as e:  # noqa: BLE001 - validated before submit: unexpected; fail this request only
                self._admitted(s.request_id, None)
                _deliver(sink, e)
                continue
            self._sinks[s.request_id] = sink
            if deadline is not None:
                self._deadlines[s.request_id] = deadline

    def _expire(self) -> None:
        """Abort the sequences past their deadline and fail their requests (once each) with a 504."""
        now = time.monotonic()
        expired = [rid for rid, t in self._deadlines.items() if t <= now]
        failed: dict[int, Sink] = {}
        for rid in expired:
            del self._deadlines[rid]
            self.engine.abort(rid)  # its abort event at the next step finds no sink and goes nowhere
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                failed[id(sink)] = sink
        for sink in failed.values():
            self.metrics.timeouts.inc()
            _deliver(sink, Cancelled(f"the request took longer than the server's limit of {self.request_timeout:g} s "
                                     "(--request-timeout) and was cancelled; ask for fewer tokens or retry later",
                                     status=TIMEOUT_STATUS))

    def _admitted(self, rid: str, step_start: float | None) -> None:
        with self._lock:
            t = self._submitted.pop(rid, None)
            if t is not None:
                self._waiting -= 1
        if t is not None and step_start is not None:
            self.metrics.queue_time.observe(max(0.0, step_start - t))

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001
            # The engine's state is unknown after a failed step: fail its requests and start afresh.
            logger.exception("engine step failed")
            failure = EngineFailure(f"the engine failed: {type(e).__name__}: {e}")
            self.engine = self._make_engine()  # before failing the requests, so their retries meet the new one
            self._fail_all(failure)
            return
        for ev in events:
            self._admitted(ev.request_id, start)
            sink = self._sinks.get(ev.request_id)
            if ev.finished:
                self._sinks.pop(ev.request_id, None)
                self._deadlines.pop(ev.request_id, None)
            if sink is not None:
                _deliver(sink, ev)
        self.metrics.running.set(self.engine.num_running)
        self.metrics.waiting.set(self._waiting)

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        self._deadlines.clear()
        with self._lock:
            self._submitted.clear()
            self._waiting = 0
        for sink in set(sinks.values()):
            _deliver(sink, error)
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)


def _deliver(sink: Sink, item: StepEvent | BaseException) -> None:
    try:
        sink(item)
    except RuntimeError:  # the receiving event loop is closed (server shutting down)
        pass
