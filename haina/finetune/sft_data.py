"""Supervised fine-tuning data: JSONL records → conversations → token ids with an assistant-only loss mask.

Three record shapes are read, detected per record (extra keys are ignored):

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "name": str?}, ...]}`
  (OpenAI style; a content given as a list of `{"type": "text", "text": ...}` parts is joined);
- instruction: `{"prompt": str, "response": str, "system": str?}`;
- Alpaca: `{"instruction": str, "input": str?, "output": str}`.

Nothing is dropped silently: a record that cannot be used is kept with its file, line and reason, so
`write_rejects` can show the user exactly what was left out and why.

A conversation is rendered with the tokenizer's chat template through `encode_chat` (so message text
never becomes a special token). The loss covers each assistant turn's tokens, up to and including the
token that ends the turn: a model fine-tuned without that token's loss never learns to stop.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

from haina.core.errors import HainaError
from haina.core.io import atomic_path, match_input
from haina.data.prepare.readers import COMPRESSIONS, open_binary
from haina.generate.chat import IM_END, IM_START, chat_stop_token_ids, encode_chat, ensure_chat_tokens
from haina.tokenizer import Tokenizer

T = TypeVar("T")

__all__ = ["ChatTemplateError", "Example", "JsonlRecord", "RecordError", "SFTRecords", "clip_record", "encode_conversation",
           "iter_jsonl", "json_type", "message_text", "prepare_chat_tokenizer", "read_sft_records", "record_to_messages",
           "template_note", "tokenize_sft", "write_rejects"]

ROLES = ("system", "user", "assistant")
MAX_REJECT_CHARS = 4096  # a rejected record is kept truncated to this: enough to see what is wrong with it
SUFFIXES = (".jsonl", ".ndjson", ".json")  # the files a directory given as input contributes
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's \u escapes can spell these; they are not encodable text
SHAPES = "'messages', 'prompt' + 'response' or 'instruction' + 'output'"


class RecordError(ValueError):
    """A record that cannot be trained on; the message is the reason its reject carries."""


class ChatTemplateError(HainaError):
    """The chat template itself cannot be trained on (not one bad record): stops tokenization."""


class JsonlRecord(NamedTuple):
    """One record of an input file: `obj` when it parsed, else `reason`; `raw` is its text for rejects."""

    source: str
    line: int  # 1-based line in a JSONL file, element number in a JSON array file
    obj: object | None
    reason: str | None
    raw: str


@dataclass
class SFTRecords:
    """The usable conversations of some files, and every record that was not usable, with its reason."""

    conversations: list[list[dict]] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (source, line) of each conversation
    rejects: list[dict] = field(default_factory=list)  # {"source", "line", "reason", "record"}

    @property
    def counts_by_reason(self) -> dict[str, int]:
        """How many records were rejected for each reason, most common first."""
        return dict(Counter(r["reason"] for r in self.rejects).most_common())


@dataclass(frozen=True)
class Example:
    """A tokenized conversation: `supervised[i]` says whether token i is a training target."""

    ids: list[int]
    supervised: list[bool]
    truncated: bool = False  # cut to block_size + 1 tokens by `tokenize_sft`

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------- reading
def _files(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        for m in match_input(str(raw)):
            if m.is_dir():
                out += sorted(p for p in m.rglob("*") if p.is_file() and _is_json_file(p))
            else:
                out.append(m)
    return list(dict.fromkeys(out))


def _suffix(path: Path) -> str:
    """The format suffix of a file name, under any compression suffix: '.jsonl' for 'a.jsonl.gz'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _is_json_file(path: Path) -> bool:
    return _suffix(path) in SUFFIXES and not path.name.startswith(".")


def clip_record(raw: str) -> str:
    return raw if len(raw) <= MAX_REJECT_CHARS else raw[:MAX_REJECT_CHARS] + " …[truncated]"


def iter_jsonl(paths: str | Path | Sequence[str | Path]) -> Iterator[JsonlRecord]:
    """Every record of JSONL files (or files holding one JSON array), in order; blank lines are skipped.

    Args:
        paths: files, directories (their .jsonl/.ndjson/.json files, recursively) or glob patterns;
            .gz/.zst/.bz2/.xz files are decompressed.

    A line that is not JSON is yielded with `obj` None and its reason. A file that cannot be read or is
    not UTF-8 is a HainaError naming it: a damaged file is not a handful of bad records.
    """
    import lzma
    import zlib

    import zstandard

    damaged = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
    for path in _files(paths):
        source = str(path)
        try:
            with open_binary(source) as f:
                yield from _read_file(source, f)
        except damaged as e:
            raise HainaError(f"cannot read {source}: {e}") from None


def _utf8(raw: bytes, source: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HainaError(f"{source}:{line} is not UTF-8 text; convert the file (e.g. `iconv -t UTF-8`)") from None


def _read_file(source: str, f) -> Iterator[JsonlRecord]:
    first = f.peek(64)[:64] if hasattr(f, "peek") else b""
    # A .json file may hold one array of records (as Alpaca's own file does); anything else is read as lines.
    if _suffix(Path(source)) == ".json" and first.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        try:
            items = json.loads(_utf8(f.read(), source, 1).removeprefix("\ufeff"))
        except json.JSONDecodeError as e:
            raise HainaError(f"{source}: not a JSON array ({e.msg} at line {e.lineno}); fix it or write one JSON "
                             "object per line (JSONL)") from None
        for n, obj in enumerate(items, 1):
            yield JsonlRecord(source, n, obj, None, json.dumps(obj, ensure_ascii=False))
        return
    for n, raw in enumerate(f, 1):
        line = _utf8(raw, source, n).removeprefix("\ufeff").strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield JsonlRecord(source, n, None, f"invalid JSON ({e.msg})", line)
            continue
        yield JsonlRecord(source, n, obj, None, line)


def message_text(value: object, what: str) -> str:
    """A message text as a str, or RecordError with the reason it is unusable."""
    if isinstance(value, list):  # OpenAI content parts
        parts = []
        for p in value:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                kind = f"of type {p.get('type')!r}" if isinstance(p, dict) else f"that is {json_type(p)}"
                raise RecordError(f"{what} has a part {kind}; only text parts can be trained on")
            parts.append(p["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise RecordError(f"{what} is {json_type(value)}, not a string")
    if not value.strip():
        raise RecordError(f"{what} is empty")
    if not value.isascii() and _SURROGATE.search(value):
        raise RecordError(f"{what} holds a lone surrogate (invalid Unicode)")
    return value


def json_type(value: object) -> str:
    """What a JSON value is, in JSON's words (the user wrote JSON, not Python)."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object"))
    return next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)


def record_to_messages(obj: object) -> list[dict]:
    """The conversation a record holds, ending with its last assistant turn; RecordError(reason) if unusable."""
    if not isinstance(obj, dict):
        raise RecordError(f"not a JSON object ({json_type(obj)})")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise RecordError("'messages' is not a non-empty list")
        msgs = []
        for m in raw:
            if not isinstance(m, dict):
                raise RecordError("a message is not an object")
            role = m.get("role")
            if role not in ROLES:
                raise RecordError(f"unknown role {role!r} (expected system, user or assistant)")
            msg = {"role": role, "content": message_text(m.get("content"), f"{role} content")}
            if m.get("name") is not None:
                if not isinstance(m["name"], str):
                    raise RecordError("a message 'name' is not a string")
                msg["name"] = m["name"]
            msgs.append(msg)
    elif "prompt" in obj and "response" in obj:
        system = obj.get("system")
        msgs = [{"role": "system", "content": message_text(system, "system")}] if system not in (None, "") else []
        msgs += [{"role": "user", "content": message_text(obj["prompt"], "prompt")},
                 {"role": "assistant", "content": message_text(obj["response"], "response")}]
    elif "instruction" in obj and "output" in obj:
        instruction = message_text(obj["instruction"], "instruction")
        extra = obj.get("input")
        if extra not in (None, ""):
            if not isinstance(extra, str):
                raise RecordError(f"input is {json_type(extra)}, not a string")
            instruction += "\n\n" + extra
        msgs = [{"role": "user", "content": instruction},
                {"role": "assistant", "content": message_text(obj["output"], "output")}]
    else:
        raise RecordError(f"no known shape (expected {SHAPES})")
    # What follows the last answer teaches nothing: there is no answer to it.
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RecordError("no assistant turn")
    return msgs[:last + 1]


def parse_records(paths: str | Path | Sequence[str | Path], parse: Callable[[JsonlRecord], T]) -> tuple[
        list[T], list[dict], int]:
    """Every record of JSONL files through `parse`: (what it returned, in order; the records it rejected with a
    RecordError, or that were not JSON, as {"source", "line", "reason", "record"}; how many records were read)."""
    items: list[T] = []
    rejects: list[dict] = []
    read = 0
    for rec in iter_jsonl(paths):
        read += 1
        reason = rec.reason
        if reason is None:
            try:
                items.append(parse(rec))
                continue
            except RecordError as e:
                reason = str(e)
        rejects.append({"source": rec.source, "line": rec.line, "reason": reason, "record": clip_record(rec.raw)})
    return items, rejects, read


def nothing_usable(paths: str | Path | Sequence[str | Path], rejects: list[dict], kind: str, needs: str) -> HainaError:
    """The one-line error for input with no usable record: empty, or every record rejected (the commonest reasons)."""
    names = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    place = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if not rejects:
        return HainaError(f"no {kind} record in {place}: the input is empty")
    top = "; ".join(f"{reason} ×{n}" for reason, n in Counter(r["reason"] for r in rejects).most_common(3))
    return HainaError(f"no usable {kind} record in {place}: all {len(rejects)} rejected ({top}); records need {needs}")


def read_sft_records(paths: str | Path | Sequence[str | Path]) -> SFTRecords:
    """The conversations of SFT files (see the module docstring for the shapes), and the rejected records.

    Raises HainaError when no record at all is usable, naming the commonest reasons.
    """
    parsed, rejects, _ = parse_records(paths, lambda rec: (record_to_messages(rec.obj), (rec.source, rec.line)))
    if not parsed:
        raise nothing_usable(paths, rejects, "SFT", SHAPES)
    return SFTRecords(conversations=[c for c, _ in parsed], origins=[o for _, o in parsed], rejects=rejects)


def write_rejects(path: str | Path, rejects: Sequence[dict]) -> None:
    """Write rejected records as JSONL, one `{"source", "line", "reason", "record"}` per line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)


# ---------------------------------------------------------------------------------------------- rendering
def prepare_chat_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The tokenizer to fine-tune with: the base's own chat template, else ChatML with its two markers added.

    Args:
        tokenizer: the base model's tokenizer.
        vocab_size: the model's vocabulary size; added markers must get ids below it.
    """
    if tokenizer is None:
        raise HainaError("the base has no tokenizer, so its chat records cannot be encoded; fine-tune a checkpoint "
                         "saved with its tokenizer (tokenizer/ beside the weights)")
    if tokenizer.chat_template:
        return tokenizer
    try:
        tok = ensure_chat_tokens(tokenizer, vocab_size)
    except HainaError:
        # No room for the ChatML markers: the plain template needs no new token, only the EOS every haina
        # tokenizer has. It is saved with the fine-tuned model, so generate, chat and serve render alike.
        from haina.generate.chat import PLAIN_CHAT_TEMPLATE

        return Tokenizer(tokenizer.tok, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token,
                         pad_token=tokenizer.pad_token, chat_template=PLAIN_CHAT_TEMPLATE,
                         extra_special=tuple(tokenizer.extra_special))
    # Markers already in the vocabulary come back unchanged: name the template and mark them special, so the
    # saved tokenizer renders chats as training did and message text cannot spell the markers.
    from haina.generate.chat import DEFAULT_CHAT_TEMPLATE

    extra = tuple(tok.extra_special) + tuple(t for t in (IM_START, IM_END) if t not in tok.extra_special)
    return Tokenizer(tok.tok, eos_token=tok.eos_token, bos_token=tok.bos_token, pad_token=tok.pad_token,
                     chat_template=tok.chat_template or DEFAULT_CHAT_TEMPLATE, extra_special=extra)


def template_note(base: Tokenizer, tokenizer: Tokenizer) -> str | None:
    """What `prepare_chat_tokenizer` chose for a base without a chat template, for the run's log (None if it had one).

    Said once the run has started rather than while choosing, so that an error before then stays one line.
    """
    from haina.generate.chat import PLAIN_CHAT_TEMPLATE

    if base.chat_template:
        return None
    if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE:
        return (f"the base has no chat template and no room in its vocabulary for {IM_START}/{IM_END}: chats are "
                f"rendered with the plain '### User:' / '### Assistant:' template, {tokenizer.eos_token} ending "
                "each answer (saved with the model)")
    return "the base has no chat template: chats are rendered as ChatML (saved with the model)"


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict], *, train_on_prompt: bool = False) -> Example:
    """Token ids of a conversation ending with an assistant turn, and which of them are training targets.

    The ids are `encode_chat(tokenizer, messages, add_generation_prompt=False)`. Each assistant turn's span
    is found by encoding the conversation up to it with the generation prompt, and up to its end: the ids
    between are the answer, supervised up to and including the last end-of-turn token (`<|im_end|>` or
    EOS) among them; what the template writes after that (ChatML's newline) is not.

    Args:
        tokenizer: supplies the chat template (else ChatML) and the special tokens.
        messages: system/user/assistant messages, the last one an assistant's.
        train_on_prompt: supervise every token after the first, prompts included.

    Raises:
        ChatTemplateError: the template does not render a prefix of a conversation as a prefix of it,
            or does not end an assistant turn with an end-of-turn token.
        HainaError: the template rejects this conversation (e.g. roles that do not alternate).
    """
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise HainaError("no assistant turn")
    ids = encode_chat(tokenizer, messages[:turns[-1] + 1], add_generation_prompt=False)
    if train_on_prompt:
        return Example(ids, [i > 0 for i in range(len(ids))])
    stops = set(chat_stop_token_ids(tokenizer))
    supervised = [False] * len(ids)
    for i in turns:
        start = encode_chat(tokenizer, messages[:i], add_generation_prompt=True)
        end = ids if i == turns[-1] else encode_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if ids[:len(start)] != start or ids[:len(end)] != end:
            raise ChatTemplateError(f"the {_template_name(tokenizer)} does not encode the start of a conversation "
                                    "as the start of the whole (it is not prefix-stable), so the answers cannot be "
                                    "located; fine-tune with a prefix-stable template such as ChatML")
        ends = [k for k in range(len(start), len(end)) if ids[k] in stops]
        if not ends:
            names = ", ".join(repr(tokenizer.id_to_token(s)) for s in sorted(stops))
            raise ChatTemplateError(f"the {_template_name(tokenizer)} does not end an assistant turn with an "
                                    f"end-of-turn token ({names}), so the model could not learn to stop; end "
                                    "each assistant message with eos_token in the template")
        supervised[len(start):ends[-1] + 1] = [True] * (ends[-1] + 1 - len(start))
    return Example(ids, supervised)


def _template_name(tokenizer: Tokenizer) -> str:
    return "tokenizer's chat_template" if tokenizer.chat_template else "default ChatML chat template"


def tokenize_sft(tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]], *, block_size: int,
                 train_on_prompt: bool = False,
                 origins: Sequence[tuple[str, int]] | None = None) -> tuple[list[Example], list[dict]]:
    """Encode conversations for training; (examples, rejects).

    An example longer than block_size + 1 tokens (a window of block_size inputs and their targets) is cut to
    that length; one with no target left is rejected, as is a conversation the template refuses.

    Args:
        tokenizer: as from `prepare_chat_tokenizer`.
        conversations: message lists, as `read_sft_records` gives them.
        block_size: the training context.
        train_on_prompt: supervise prompts too (see `encode_conversation`).
        origins: (source, line) of each conversation, copied into its reject (`SFTRecords.origins`).

    Raises:
        ChatTemplateError: see `encode_conversation`. Every other problem is a reject: when all are rejected
            the examples are empty and the caller decides (a validation split may be dropped, training not).
    """
    if origins is not None and len(origins) != len(conversations):
        raise ValueError(f"{len(origins)} origins for {len(conversations)} conversations")
    examples: list[Example] = []
    rejects: list[dict] = []
    for n, messages in enumerate(conversations):
        source, line = origins[n] if origins is not None else ("", n + 1)
        try:
            ex = encode_conversation(tokenizer, messages, train_on_prompt=train_on_prompt)
            reason = None
        except ChatTemplateError:
            raise
        except HainaError as e:
            reason = str(e)
        if reason is None and len(ex.ids) > block_size + 1:
            ex = Example(ex.ids[:block_size + 1], ex.supervised[:block_size + 1], truncated=True)
        if reason is None and not any(ex.supervised[1:]):  # the first token is never a target
            reason = f"no answer token within the first {block_size + 1} tokens (block_size + 1)"
        if reason is None:
            examples.append(ex)
        else:
            rejects.append({"source": source, "line": line, "reason": reason,
                            "record": clip_record(json.dumps({"messages": list(messages)}, ensure_ascii=False))})
    return examples, rejects
