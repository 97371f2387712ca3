"""The engine loop: one thread owns the `Engine` and steps it for every request of the server.

The engine is not thread-safe, so everything that touches it (adding, aborting, stepping,
scoring) happens on this thread. Other threads talk to it through an inbox; events go back
through each request's sink (a callable the asyncio side gives, which hops onto its event loop).
New requests join the running batch at the next step: the engine admits them into free slots.
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

__all__ = ["EngineFailure", "EngineLoop", "QueueFull", "Sequence"]

Sink = Callable[[StepEvent | BaseException], None]


class QueueFull(Exception):
    """Admitting the request would put more than `max_queue` sequences in the waiting queue."""


class EngineFailure(Exception):
    """The engine raised while stepping; every request in flight fails with this."""


@dataclass
class Sequence:
    """One engine request: its id, prompt ids and sampling params."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class EngineLoop:
    """Runs `engine.step()` on a background thread while there is work, and sleeps on the inbox otherwise.

    Args:
        make_engine: builds the engine (called again to start afresh if a step ever raises).
        metrics: gauges and the queue-time histogram are updated from the loop.
        max_queue: most sequences waiting for a slot; more is refused with `QueueFull`.
    """

    def __init__(self, make_engine: Callable[[], Engine], metrics: ServeMetrics, max_queue: int = 256):
        self._make_engine = make_engine
        self.engine = make_engine()
        self.metrics = metrics
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
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
        self._inbox.put(("add", (seqs, sink)))

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests; their slots free at the next step."""
        if request_ids:
            self._inbox.put(("abort", list(request_ids)))

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

    def _add(self, seqs: list[Sequence], sink: Sink) -> None:
        for s in seqs:
            try:
                self.engine.add_request(s.request_id, s.prompt_ids, s.params)
            except Exception as e:  # noqa: BLE001 - validated before submit: unexpected; fail this request only
                self._admitted(s.request_id, None)
                _deliver(sink, e)
                continue
            self._sinks[s.request_id] = sink

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
            if sink is not None:
                _deliver(sink, ev)
        self.metrics.running.set(self.engine.num_running)
        self.metrics.waiting.set(self._waiting)

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
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
