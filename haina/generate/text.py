"""Text in, text out on top of the token-id engine: tokenization, streaming text and stop strings."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from haina.core.errors import HainaError
from haina.generate.detok import IncrementalDetokenizer, StopStringMatcher, check_stop_strings
from haina.generate.engine import Engine
from haina.generate.outputs import StepEvent, TokenLogprob
from haina.generate.sampling import SamplingParams
from haina.tokenizer import Tokenizer

__all__ = ["SequenceDecoder", "TextDelta", "TextGenerator", "TextResult"]


@dataclass
class TextResult:
    """One finished completion. `token_ids` are every generated id (a final stop/EOS token included);
    `text` leaves out special tokens, a final stop token and anything from a stop string on."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class TextDelta:
    """What a stream yields each step: the new text and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None


class SequenceDecoder:
    """Per-sequence text state: incremental detokenization, then stop strings (also used by the server)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], stop_ids: set[int]):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special=True)
        self.matcher = StopStringMatcher(stops)
        self.stop_ids = stop_ids
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None

    def feed(self, ev: StepEvent) -> tuple[str, bool, list[TokenLogprob]]:
        """Take one engine event; return (text to emit, stop string hit, log-probabilities of the emitted tokens).

        `tokens` and `logprobs` keep every generated token, a final stop token included; the returned
        log-probabilities leave the stop token out, as the text does.
        """
        self.tokens += ev.new_token_ids
        if ev.logprobs is not None:
            self.logprobs = (self.logprobs or []) + ev.logprobs
        ids, lps = ev.new_token_ids, list(ev.logprobs or [])
        if ev.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids, lps = ids[:-1], lps[:len(ids) - 1]  # a stop token ends the text but is not part of it
        raw = self.detok.add(ids)
        if ev.finished:
            raw += self.detok.flush()
        out, hit = self.matcher.feed(raw)
        if ev.finished and not hit:
            out += self.matcher.flush()
        self.text += out
        return out, hit, lps


class TextGenerator:
    """Generate text with an `Engine` and the tokenizer of its model.

    Args:
        engine: the engine (this object drives its `step()`; do not share it with a server loop).
        tokenizer: encodes prompts and decodes completions.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def _encode(self, prompt: str | list[int]) -> list[int]:
        # Token ids pass as they are: a chat prompt (`chat.encode_chat`) has special ids that text never gets.
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise HainaError(f"prompts must be strings, got {type(prompt).__name__} {prompt!r}")
        if not prompt:
            raise HainaError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt)

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if self.engine.eos_token_id is not None and not params.ignore_eos:
            ids.add(self.engine.eos_token_id)
        return ids

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams],
                 stop: Sequence[str] | Sequence[Sequence[str]] = ()) -> list[list[TextResult]]:
        """Complete each prompt: per prompt, its n samples (or its num_beams best beams).

        Args:
            prompts: the texts to continue.
            params: one SamplingParams for all prompts, or one per prompt.
            stop: stop strings for all prompts (a list of strings), or one list per prompt.
        """
        if isinstance(prompts, str):
            raise HainaError("prompts must be a list of strings, not a single string")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        stops = _per_prompt_stops(stop, len(prompts))
        if len(plist) != len(prompts):
            raise HainaError(f"got {len(plist)} sampling params for {len(prompts)} prompts; give one or one each")
        encoded = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):  # all checked before any is queued
            try:
                encoded.append(self._encode(prompt))
                self.engine.check_prompt(encoded[-1], sp)
            except HainaError as e:  # in a batch, say which prompt
                raise HainaError(f"prompt {i + 1}: {e}" if len(prompts) > 1 else str(e)) from None
        results: list[list[TextResult]] = [[] for _ in prompts]
        for p, (ids, sp) in enumerate(zip(encoded, plist)):
            if sp.num_beams > 1:
                results[p] = [self._finish_beam(r.token_ids, r.finish_reason, r.logprobs, sp, stops[p])
                              for r in self.engine.generate([ids], [sp])[0]]
        self._run_sampled(encoded, plist, stops, results)
        return results

    def _finish_beam(self, tokens: list[int], reason: str, logprobs, sp: SamplingParams,
                     stops: list[str]) -> TextResult:
        """Beam search runs to the end in the engine; stop strings are applied to its text afterwards."""
        ids = tokens[:-1] if reason == "stop" and tokens and tokens[-1] in self._stop_ids(sp) else tokens
        matcher = StopStringMatcher(stops)
        text, hit = matcher.feed(self.tokenizer.decode(ids, skip_special=True))
        return TextResult(text=text if hit else text + matcher.flush(), token_ids=list(tokens),
                          finish_reason="stop" if hit else reason, logprobs=logprobs)

    def _run_sampled(self, encoded: list[list[int]], plist: list[SamplingParams], stops: list[list[str]],
                     results: list[list[TextResult]]) -> None:
        tag = next(self._ids)
        where: dict[str, tuple[int, SequenceDecoder]] = {}  # request id -> (prompt index, decoder)
        for p, (ids, sp) in enumerate(zip(encoded, plist)):
            if sp.num_beams > 1:
                continue
            for i in range(sp.n):
                rid = f"_text-{id(self)}-{tag}-{p}-{i}"
                one = replace(sp, n=1, seed=None if sp.seed is None else sp.seed + i)
                self.engine.add_request(rid, ids, one)
                where[rid] = (p, SequenceDecoder(self.tokenizer, stops[p], self._stop_ids(sp)))
        finished: dict[str, TextResult] = {}
        pending = set(where)  # requests the engine still holds
        try:
            while pending:
                for ev in self.engine.step():
                    if ev.request_id not in where:
                        continue
                    if ev.finished:
                        pending.discard(ev.request_id)
                    if ev.request_id in finished:
                        continue  # the abort that follows a stop-string hit
                    dec = where[ev.request_id][1]
                    _, hit, _ = dec.feed(ev)
                    if hit or ev.finished:
                        finished[ev.request_id] = TextResult(
                            text=dec.text, token_ids=dec.tokens, logprobs=dec.logprobs,
                            finish_reason="stop" if hit else (ev.finish_reason or "length"))
                        if hit and not ev.finished:
                            self.engine.abort(ev.request_id)
        finally:
            for rid in pending:  # interrupted (Ctrl-C): leave the engine clean for the next call
                self.engine.abort(rid)
            if pending:
                self.engine.step()
        for rid, (p, _) in where.items():  # insertion order is sample order
            results[p].append(finished[rid])

    def stream_events(self, prompt: str | list[int], params: SamplingParams, stop: Sequence[str] = ()) -> Iterator[TextDelta]:
        """Yield text deltas with their tokens as they are generated (n = 1, no beam search); `prompt` is text or ids.

        The last delta has `finished=True`. Closing the iterator early aborts the request.
        """
        if params.n != 1 or params.num_beams != 1:
            raise HainaError("streaming gives one sequence: use n=1 and num_beams=1 (or generate() for more)")
        stops = check_stop_strings(list(stop))
        ids = self._encode(prompt)
        dec = SequenceDecoder(self.tokenizer, stops, self._stop_ids(params))
        events = self.engine.stream(ids, params)
        try:
            for ev in events:
                text, hit, _ = dec.feed(ev)
                lps = ev.logprobs
                if hit:
                    yield TextDelta(text=text, token_ids=ev.new_token_ids, logprobs=lps, finished=True,
                                    finish_reason="stop")
                    return
                yield TextDelta(text=text, token_ids=ev.new_token_ids, logprobs=lps, finished=ev.finished,
                                finish_reason=ev.finish_reason)
        finally:
            events.close()  # aborts the engine request if it is still running

    def stream(self, prompt: str | list[int], params: SamplingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the completion of `prompt` as text deltas (never a broken character or part of a stop string)."""
        for delta in self.stream_events(prompt, params, stop):
            if delta.text:
                yield delta.text


def _per_prompt_stops(stop: object, n: int) -> list[list[str]]:
    """Stop strings as one list per prompt, from a shared list or a list of lists."""
    if stop is None or isinstance(stop, str):
        return [check_stop_strings(stop)] * n
    if not isinstance(stop, (list, tuple)):
        raise HainaError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}")
    if stop and all(isinstance(s, (list, tuple)) for s in stop):
        if len(stop) != n:
            raise HainaError(f"got {len(stop)} stop lists for {n} prompts; give one list or one per prompt")
        return [check_stop_strings(list(s)) for s in stop]
    return [check_stop_strings(list(stop))] * n
