"""Preference data for DPO: JSONL pairs → token ids with the response's tokens marked → batches of 2B rows.

A record is `{"prompt", "chosen", "rejected"}` (extra keys are ignored), in one of two forms:

- plain: the prompt is a string (one user turn), chosen and rejected are strings;
- chat: the prompt is a list of messages (OpenAI style, ending with a user turn), and chosen and rejected
  are each an assistant string or a list holding one assistant message.

Both answers are rendered after the same prompt with the base's chat template (`encode_conversation`), so
their prompt tokens are identical; the tokens a pair is scored on are each answer's, up to and including
its end-of-turn token. Nothing is dropped silently: every record that cannot be used, and every pair that
does not fit the context, is kept with its file, line and reason for `write_rejects`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from haina.core.errors import HainaError
from haina.finetune.batching import IGNORE_INDEX
from haina.finetune.sft_data import (
    ChatTemplateError,
    RecordError,
    clip_record,
    encode_conversation,
    json_type,
    message_text,
    nothing_usable,
    parse_records,
    record_to_messages,
)
from haina.generate.chat import encode_chat
from haina.tokenizer import Tokenizer
from haina.train.distributed import RankRows

__all__ = ["PairSet", "Preference", "PreferenceRecords", "RankPairs", "TokenizedPair", "read_preferences",
           "record_to_preference", "split_preferences", "tokenize_preferences"]

KEYS = ("prompt", "chosen", "rejected")


class Preference(NamedTuple):
    """One usable record: the prompt's messages and the two answers' texts."""

    prompt: list[dict]
    chosen: str
    rejected: str
    source: str
    line: int


@dataclass
class PreferenceRecords:
    """The usable pairs of some files, and every record that was not usable, with its reason."""

    pairs: list[Preference] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)  # {"source", "line", "reason", "record"}


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids: `prompt` then each answer (its end-of-turn token included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool = False  # the prompt lost tokens at its start to fit block_size


# ---------------------------------------------------------------------------------------------- records
def _answer(value: object, what: str) -> str:
    """An answer's text: a string, or a list holding one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise RecordError(f"{what} is a list of {len(value)} items; give a string or a list holding one "
                              "assistant message")
        if value[0].get("role") != "assistant":
            raise RecordError(f"{what}'s message has role {value[0].get('role')!r}, not 'assistant'")
        value = value[0].get("content")
    return message_text(value, what)


def record_to_preference(obj: object) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of a record; RecordError(reason) if it is unusable."""
    if not isinstance(obj, dict):
        raise RecordError(f"not a JSON object ({json_type(obj)})")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise RecordError(f"no '{missing[0]}' (a preference record needs 'prompt', 'chosen' and 'rejected')")
    chosen, rejected = _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": message_text(prompt, "prompt")}]
    elif isinstance(prompt, list):
        if not prompt:
            raise RecordError("prompt is an empty list of messages")
        if not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
            role = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
            raise RecordError(f"the prompt's last message has role {role!r}; it must be the user's turn that "
                              "the answers reply to")
        # The SFT reader checks the messages (roles, contents, names); the answer closes the conversation.
        prompt = record_to_messages({"messages": [*prompt, {"role": "assistant", "content": chosen}]})[:-1]
    else:
        raise RecordError(f"prompt is {json_type(prompt)}, not a string or a list of messages")
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same text: the pair prefers nothing")
    return prompt, chosen, rejected


def read_preferences(paths: str | Path | Sequence[str | Path]) -> PreferenceRecords:
    """The pairs of preference JSONL files, and the rejected records; HainaError when none is usable."""
    pairs, rejects, _ = parse_records(paths, lambda rec: Preference(*record_to_preference(rec.obj), rec.source,
                                                                   rec.line))
    if not pairs:
        raise nothing_usable(paths, rejects, "preference", "'prompt', 'chosen' and 'rejected'")
    return PreferenceRecords(pairs=pairs, rejects=rejects)


def split_preferences(pairs: list[Preference], fraction: float, seed: int) -> tuple[list[Preference],
                                                                                   list[Preference]]:
    """(train, val): a seeded `fraction` held out, at least one pair when there are 20 or more (as for SFT)."""
    n = len(pairs)
    if fraction <= 0 or n < 20:
        return pairs, []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:max(1, round(fraction * n))])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ---------------------------------------------------------------------------------------------- tokens
def _answer_ids(tokenizer: Tokenizer, prompt: list[dict], answer: str, n_prompt: int) -> list[int]:
    """The answer's ids after the prompt's, through its end-of-turn token (what follows it is not scored)."""
    ex = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    # Only the last turn: encode_conversation also marks earlier assistant turns of a chat prompt.
    last = max(i for i, s in enumerate(ex.supervised) if s)
    return ex.ids[n_prompt:last + 1]


def tokenize_preferences(tokenizer: Tokenizer, pairs: Sequence[Preference], *,
                         block_size: int) -> tuple[list[TokenizedPair], list[dict]]:
    """Encode pairs for training; (tokenized pairs, rejects).

    A pair longer than block_size + 1 tokens loses tokens from the start of its prompt, the same for both
    answers so they stay conditioned on the same text; one whose longer answer leaves no prompt token is
    rejected.

    Raises:
        ChatTemplateError: the chat template cannot locate answers (see `encode_conversation`).
    """
    out: list[TokenizedPair] = []
    rejects: list[dict] = []
    for p in pairs:
        try:
            prompt = encode_chat(tokenizer, p.prompt, add_generation_prompt=True)
            chosen = _answer_ids(tokenizer, p.prompt, p.chosen, len(prompt))
            rejected = _answer_ids(tokenizer, p.prompt, p.rejected, len(prompt))
            reason = None
        except ChatTemplateError:
            raise
        except HainaError as e:
            reason = str(e)
        if reason is None:
            cut = len(prompt) + max(len(chosen), len(rejected)) - (block_size + 1)
            if cut >= len(prompt):
                reason = (f"the longer answer has {max(len(chosen), len(rejected))} tokens, which leaves no room for "
                          f"its prompt in block_size {block_size}; raise train.block_size or shorten the answer")
            else:
                out.append(TokenizedPair(prompt[max(cut, 0):], chosen, rejected, truncated=cut > 0))
                continue
        record = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        rejects.append({"source": p.source, "line": p.line, "reason": reason,
                        "record": clip_record(json.dumps(record, ensure_ascii=False))})
    return out, rejects


# ---------------------------------------------------------------------------------------------- batches
class PairSet:
    """Tokenized pairs in flat tensors, with each pair's reference log-probabilities, served as batches.

    A batch of B pairs is a dict of 2B rows, padded on the right to the longest (so plain causal attention
    is right): rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected of the same pairs, in order.

    - `x` (2B, T) input ids; `y` (2B, T) targets, -100 except on the answer's tokens;
    - `ref` (2B,) the reference model's summed log-probability of each row's answer (`reference`);
    - `index` (B,) the pairs' indices;
    - `row_tokens` (2B,) each row's real (non-padding) input tokens, and `tokens` their sum over the batch as drawn.

    As with SFT batches, all randomness of batch choice comes from the generator given to `get_batch`.

    Args:
        pairs: tokenized pairs (`tokenize_preferences`).
        pad_id: the id put in padding positions (never a target).
    """

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int):
        if not pairs:
            raise HainaError("no preference pairs to batch; check the data's rejects")
        seqs = [s for p in pairs for s in (p.prompt + p.chosen, p.prompt + p.rejected)]  # chosen 2i, rejected 2i+1
        self.pad_id = pad_id
        self.lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])
        self.ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)  # ~4 bytes a token, not ~40
        self.prompt_lengths = torch.tensor([len(p.prompt) for p in pairs], dtype=torch.long)
        self.reference = torch.zeros(len(pairs), 2)  # (chosen, rejected) summed log-probs; set by the trainer
        self.truncated = sum(p.truncated for p in pairs)
        # Pairs sorted by their longer row, cut into chunks: a batch pads to little more than its own pairs.
        self.order = torch.argsort(self.lengths.view(-1, 2).amax(1), stable=True)
        self._chunks: dict[int, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def answer_tokens(self) -> int:
        """The scored tokens of all the pairs (both answers)."""
        return int(self.lengths.sum() - 2 * self.prompt_lengths.sum())

    def batch(self, indices: Sequence[int]) -> dict:
        """Pairs `indices` as 2B padded rows (see the class docstring)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        rows = torch.cat([2 * index, 2 * index + 1])
        T = int(self.lengths[rows].max()) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, seq in enumerate(rows.tolist()):
            start, n = int(self.starts[seq]), int(self.lengths[seq])
            ids = self.ids[start:start + n].long()
            x[r, :n - 1], y[r, :n - 1] = ids[:-1], ids[1:]
            y[r, :int(self.prompt_lengths[seq // 2]) - 1] = IGNORE_INDEX  # target j is token j + 1: the prompt's
        ref = torch.cat([self.reference[index, 0], self.reference[index, 1]])
        row_tokens = self.lengths[rows] - 1
        return {"x": x, "y": y, "ref": ref, "index": index, "row_tokens": row_tokens, "tokens": int(row_tokens.sum())}

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
        """A random chunk of batch_size pairs of similar length, in random order (block_size: fixed at tokenizing)."""
        if batch_size not in self._chunks:
            self._chunks[batch_size] = list(self.order.split(batch_size))
        chunks = self._chunks[batch_size]
        chunk = chunks[int(torch.randint(len(chunks), (1,), generator=generator))]
        return self.batch(chunk[torch.randperm(len(chunk), generator=generator)].tolist())

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Every pair once, in order, batch_size at a time (up to max_batches batches)."""
        for b, start in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.batch(range(start, min(start + batch_size, len(self))))


class RankPairs(RankRows):
    """`RankRows` for preference batches: this rank's pairs of the global batch, with both rows of each.

    A batch's 2B rows are B chosen answers and then the same pairs' rejected ones, so a rank's share of B' pairs
    is two ranges of rows (its chosen, its rejected) and one of `index`, not the one range `RankRows` keeps.
    """

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> dict:
        n = batch_size * self.world_size
        batch = self.source.get_batch(n, block_size, generator)
        if len(batch["index"]) != n:
            # The last chunk of the length-sorted pairs is short: every rank computes all of it, as `RankRows` does
            # with what it cannot slice: the ranks' weights then count its pairs once each, and the averaged
            # gradient is exactly the one process's.
            return batch
        pairs = torch.arange(self.rank * batch_size, (self.rank + 1) * batch_size)
        rows = torch.cat([pairs, pairs + n])  # its chosen rows, then the same pairs' rejected rows
        return {"x": batch["x"][rows], "y": batch["y"][rows], "ref": batch["ref"][rows], "index": batch["index"][pairs],
                "row_tokens": batch["row_tokens"][rows]}
