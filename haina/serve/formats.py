"""OpenAI response bodies and stream chunks for completions and chat, built from finished or streaming sequences,
and the embeddings list.

A sequence here is anything with the attributes of `sequences.Seq` (index, text, num_tokens,
logprobs, prompt_logprobs, finish_reason, want_logprobs, echo_text, prompt_index); a run is a
`sequences.Run`, whose `events()` yields (sequence, new text, new logprobs).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np

from haina.core.log import logger
from haina.generate.outputs import TokenLogprob
from haina.serve.loop import Cancelled
from haina.serve.protocol import error_body, usage
from haina.tokenizer import Tokenizer

__all__ = ["ChatFormat", "CompletionFormat", "embedding_response", "sse"]


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`.

    The status line has gone out with the first chunk, so a failure mid-stream (the engine failing)
    is reported as an error event in the OpenAI shape before the stream ends.
    """
    try:
        async for chunk in chunks:
            yield f"data: {_event_json(chunk)}\n\n"
    except Exception as e:  # noqa: BLE001 - reported to the client in the stream, and logged
        status = getattr(e, "status", 500)
        if status >= 500 and not isinstance(e, Cancelled):  # a timeout or a drain is no fault to trace
            logger.exception("error while streaming")
        yield f"data: {json.dumps(error_body(status, getattr(e, 'message', None) or str(e)))}\n\n"
    yield "data: [DONE]\n\n"


# JSON leaves these unescaped, but line readers built on str.splitlines (httpx's iter_lines among them) end a
# line at each, cutting an event whose generated text holds one in two. Escaped, the JSON means the same.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event_json(chunk: dict[str, Any]) -> str:
    """One event's JSON on one line for every line reader: UTF-8 text, Unicode line separators escaped."""
    return json.dumps(chunk, ensure_ascii=False).translate(_LINE_BREAKS)


class _Format:
    object_name = ""

    def __init__(self, rid: str, model: str, tok: Tokenizer):
        self.rid, self.model, self.tok = rid, model, tok
        self.created = int(time.time())
        self._strings: dict[int, str] = {}

    def token_str(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tok.decode([token_id])
        return s

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage_chunk(self, prompt_tokens: int, seqs: Iterable) -> dict[str, Any]:
        return self.chunk([], usage=usage(prompt_tokens, sum(s.num_tokens for s in seqs)))


class CompletionFormat(_Format):
    """`text_completion` bodies; with logprobs, OpenAI's legacy format (tokens, token_logprobs, top_logprobs,
    text_offset, offsets counted from the start of the choice's text).

    The logprobs cover every generated token, a final stop token (EOS) included although the text leaves it
    out, as vLLM's do: harnesses score a continuation with echo and max_tokens=1 and drop the last entry as
    the generated token, so without it a prompt the model would end cut the continuation's last token.
    """

    object_name = "text_completion"

    def __init__(self, rid: str, model: str, tok: Tokenizer, echo: bool):
        super().__init__(rid, model, tok)
        self.echo = echo

    def logprobs(self, entries: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for token_id, lp in entries:
            s = self.token_str(token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            lps.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self.token_str(t): v for t, v in lp.top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_entries(self, prompt_ids: list[int], lps: list[TokenLogprob | None] | None):
        lps = lps or [None] * len(prompt_ids)
        return list(zip(prompt_ids, lps))

    def response(self, seqs: list, prompts: list[list[int]]) -> dict[str, Any]:
        choices = []
        for s in seqs:
            text = (s.echo_text or "") + s.text if self.echo else s.text
            lp = None
            if s.want_logprobs:
                entries = self._prompt_entries(prompts[s.prompt_index], s.prompt_logprobs) if self.echo else []
                lp = self.logprobs(entries + [(e.token_id, e) for e in s.all_logprobs])
            choices.append({"index": s.index, "text": text, "logprobs": lp, "finish_reason": s.finish_reason})
        completion = sum(s.num_tokens for s in seqs)
        return self.chunk(choices, usage=usage(sum(map(len, prompts)), completion))

    async def stream(self, run, disconnected, include_usage: bool,
                     prompts: list[list[int]]) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
        offsets: dict[int, int] = {}
        scored: dict[int, int] = {}  # generated tokens whose logprobs went out, per choice
        seqs = {}
        async for seq, text, lps in run.events(disconnected):
            seqs[seq.index] = seq
            done = scored.get(seq.index, 0) + len(lps)
            if seq.finish_reason is not None:  # the stop token, which `lps` leaves out with the text
                lps = lps + seq.all_logprobs[done:]
            scored[seq.index] = done
            entries = [(e.token_id, e) for e in lps]
            if seq.index not in started:
                started.add(seq.index)
                if self.echo:
                    text = (seq.echo_text or "") + text
                    entries = self._prompt_entries(prompts[seq.prompt_index], seq.prompt_logprobs) + entries
            if not (text or entries or seq.finish_reason):
                continue
            lp = None
            if seq.want_logprobs:
                lp = self.logprobs(entries, offsets.get(seq.index, 0))
                offsets[seq.index] = offsets.get(seq.index, 0) + sum(len(t) for t in lp["tokens"])
            yield self.chunk([{"index": seq.index, "text": text, "logprobs": lp,
                               "finish_reason": seq.finish_reason}])
        if include_usage:
            yield self.usage_chunk(sum(map(len, prompts)), seqs.values())

    def scored(self, results: list, prompts: list[list[int]], texts: list[str], n: int, stream: bool,
               include_usage: bool):
        """Echo-only answers (max_tokens=0): each prompt's text with its log-probabilities, nothing generated."""
        choices = []
        for p, (ids, text, lps) in enumerate(zip(prompts, texts, results)):
            lp = None if lps is None else self.logprobs(self._prompt_entries(ids, lps))
            for i in range(n):
                choices.append({"index": p * n + i, "text": text, "logprobs": lp, "finish_reason": "length"})
        total = usage(sum(map(len, prompts)), 0)
        if not stream:
            return self.chunk(choices, usage=total)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for c in choices:
                yield self.chunk([c])
            if include_usage:
                yield self.chunk([], usage=total)

        return sse(chunks())


class ChatFormat(_Format):
    """`chat.completion` bodies and `chat.completion.chunk` deltas (the role first, then the content).

    `sources` (what a context provider gave the model, or None) go at the top level of a body, and of a
    stream's first chunk: a client can show them while the answer streams, and has them if it stops early.
    """

    object_name = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, tok: Tokenizer, sources: list[dict[str, Any]] | None = None):
        super().__init__(rid, model, tok)
        self.sources = sources

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def item(token_id: int, lp: float) -> dict[str, Any]:
            s = self.token_str(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in entries]}

    def response(self, seqs: list, prompt_tokens: int) -> dict[str, Any]:
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                    "logprobs": self.logprobs(s.logprobs) if s.want_logprobs else None,
                    "finish_reason": s.finish_reason} for s in seqs]
        body = self.chunk(choices, usage=usage(prompt_tokens, sum(s.num_tokens for s in seqs)))
        body["object"] = "chat.completion"
        if self.sources is not None:
            body["sources"] = self.sources
        return body

    async def stream(self, run, disconnected, include_usage: bool, prompt_tokens: int
                     ) -> AsyncIterator[dict[str, Any]]:
        extra = {} if self.sources is None else {"sources": self.sources}
        for seq in sorted(run.pending.values(), key=lambda s: s.index):
            yield self.chunk([{"index": seq.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}], **extra)
            extra = {}
        seqs = {}
        async for seq, text, lps in run.events(disconnected):
            seqs[seq.index] = seq
            if not (text or lps or seq.finish_reason):
                continue
            yield self.chunk([{"index": seq.index, "delta": {"content": text} if text else {},
                               "logprobs": self.logprobs(lps) if seq.want_logprobs else None,
                               "finish_reason": seq.finish_reason}])
        if include_usage:
            yield self.usage_chunk(prompt_tokens, seqs.values())


def embedding_response(vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's embedding list; base64 is each vector's little-endian float32 bytes, as the openai client reads it."""
    data = []
    for i, v in enumerate(vectors):
        embedding = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
