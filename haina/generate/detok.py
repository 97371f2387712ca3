"""Streaming text out of token ids: incremental detokenization and stop-string matching.

Decoding one token at a time breaks in two ways. Byte-level BPE splits a multi-byte UTF-8
character across tokens, so a token decoded alone gives U+FFFD; and decoders that strip or join
(leading spaces, `##` pieces) give different text for a token alone than in context. So
`IncrementalDetokenizer` decodes a short window of tokens ending at the newest, and emits only
what that window adds over its own prefix once the text no longer ends in an incomplete character
(the technique of vLLM's `detokenize_incrementally`).
"""

from __future__ import annotations

from collections.abc import Sequence

from haina.core.errors import HainaError
from haina.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "check_stop_strings"]

REPLACEMENT = "\ufffd"
# A window that has not ended on a complete character for this many tokens is garbage (a random
# model does emit broken bytes): emit it as it decodes and start afresh, so decoding stays O(window).
MAX_PENDING_TOKENS = 64


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete text.

    Args:
        tokenizer: the tokenizer the ids come from.
        skip_special: leave special tokens (EOS, chat markers) out of the text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        # decode(ids[_prefix:_read]) is text already emitted that ends on a complete character; it is
        # decoded again with the new tokens as context. _partial counts the characters emitted beyond it.
        self._prefix = 0
        self._read = 0
        self._partial = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append token ids; return the new text that is complete (possibly "")."""
        self.ids.extend(int(t) for t in token_ids)
        if len(self.ids) == self._read:
            return ""
        return self._emit(force=len(self.ids) - self._read > MAX_PENDING_TOKENS)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._emit(force=True) if len(self.ids) > self._read else ""

    def _emit(self, force: bool) -> str:
        base = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if not text.startswith(base):  # a decoder rewrote the window's start; emit only what is new
            base = base[:_common_prefix(base, text)]
        done = len(base) + self._partial
        if force:
            # Bytes shown as U+FFFD here must never be decoded again together with later ones.
            self._prefix = self._read = len(self.ids)
            self._partial = 0
            return text[done:]
        if text.endswith(REPLACEMENT):
            # The last character is incomplete: emit what precedes it, keep the window open.
            stable = text.rstrip(REPLACEMENT)
            delta = stable[done:]
            self._partial += len(delta)
            return delta
        self._prefix, self._read, self._partial = self._read, len(self.ids), 0
        return text[done:]

    @property
    def text(self) -> str:
        """The full decoded text of every id added so far."""
        return self._decode(self.ids)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_stop_strings(stops: object) -> list[str]:
    """Validate stop strings from a user (a string or a list of strings); HainaError otherwise."""
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, (list, tuple)):
        raise HainaError(f"stop must be a string or a list of strings, got {type(stops).__name__} {stops!r}")
    for s in stops:
        if not isinstance(s, str):
            raise HainaError(f"stop strings must be strings, got {type(s).__name__} {s!r}")
        if not s:
            raise HainaError("a stop string is empty; remove it or give at least one character")
    return list(stops)


class StopStringMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    `feed` returns the text that is safe to show now: it holds back any tail that could be the
    start of a stop string, and releases it once the next text shows it is not.

    Args:
        stops: the stop strings (non-empty).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = check_stop_strings(list(stops))
        self._held = ""
        self.hit: str | None = None  # the stop string found, once found

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit).

        On a hit the emitted text ends right before the stop string, and later calls return ("", True).
        """
        if self.hit is not None:
            return "", True
        buf = self._held + delta
        if not self.stops:
            self._held = ""
            return buf, False
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            at, self.hit = min(found)
            self._held = ""
            return buf[:at], True
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The held-back tail, once the text has ended without completing a stop string."""
        if self.hit is not None:
            return ""
        held, self._held = self._held, ""
        return held
