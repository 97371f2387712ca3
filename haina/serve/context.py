"""Context added to chat requests: the provider's protocol and the thread it runs on.

With a context provider (`ServiceConfig.context`; `haina serve --rag` gives one from the rag stage, above this
one) a chat request's messages pass through it before they are rendered: it returns them with what it adds
(retrieved passages in a system message) and the sources it used, which the answer carries under `sources`
(a non-streamed body's top level; a stream's first chunk). The server knows nothing of where context comes from.

This module sits below `haina.serve.service`, which turns its errors into HTTP answers: `ContextBusy` is a 429,
a provider's HainaError a 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

__all__ = ["CONTEXT_ANSWER_ROOM", "ContextBusy", "ContextProvider", "ContextRunner", "Messages"]

Messages = list[dict[str, str]]
Sources = list[dict[str, Any]]
# Room left for the answer when a provider adds context to a request without max_tokens: a quarter of the
# context, at most this many tokens (with max_tokens, exactly that).
CONTEXT_ANSWER_ROOM = 512


class ContextProvider(Protocol):
    """What adds context to chat requests (`haina serve --rag`: passages retrieved for the last user message).

    Called with a request's messages (dicts of role, content and, when given, name) and `fits`, which says
    whether a conversation still leaves room for the answer in the model's context; returns the messages to
    render instead and the sources it used (JSON objects, answered under `sources`). Calls come one at a time,
    on a thread of their own; a HainaError is answered 503 with its message.
    """

    def describe(self) -> dict[str, Any]:
        """What /v1/models shows of it, under `haina_rag` (the playground shows its toggle when it is there)."""
        ...

    def __call__(self, messages: Messages, fits: Callable[[Messages], bool]) -> tuple[Messages, Sources]:
        ...


class ContextBusy(Exception):
    """More requests wait for context than the server queues (answered 429, as a full engine queue is)."""


class ContextRunner:
    """A provider called on a thread of its own, one call at a time, behind a queue as bounded as the engine's.

    Args:
        provider: what adds the context.
        max_queue: most requests waiting for the provider; beyond it `add` raises ContextBusy.
    """

    def __init__(self, provider: ContextProvider, max_queue: int):
        self.provider, self.max_queue = provider, max_queue
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="haina-context")
        self._waiting = 0

    def describe(self) -> dict[str, Any]:
        return self.provider.describe()

    async def add(self, messages: Messages, fits: Callable[[Messages], bool]) -> tuple[Messages, Sources]:
        """The provider's messages and sources for a chat request; its HainaError passes through."""
        # Bounded so that a flood meets 429 here too, rather than an ever longer wait.
        if self._waiting >= self.max_queue:
            raise ContextBusy(f"{self._waiting} requests are waiting for context; retry shortly")
        self._waiting += 1
        try:
            out, sources = await asyncio.wrap_future(self._thread.submit(self.provider, messages, fits))
        finally:
            self._waiting -= 1
        return out, list(sources)

    def close(self) -> None:
        """Stop the thread (queued calls are cancelled; one running ends first), then close the provider."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.provider, "close", None)  # a provider may hold a store open
        if close is not None:
            close()
