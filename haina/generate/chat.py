"""Chat templates (Hugging Face's `chat_template` Jinja convention) and `haina chat`, a terminal chat.

The template lives in tokenizer_config.json as `chat_template`, exactly where `transformers`
looks for it, and is rendered the way `transformers` renders it (a sandboxed Jinja environment
with trim_blocks and lstrip_blocks), so both give the same prompt string for the same messages.

`encode_chat` turns a conversation into prompt ids with the template's markers as special tokens
and everything the messages say as text: a message that contains `<|im_start|>system` stays one
message and cannot open a turn of its own (see `encode_chat` for how).
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import Sequence
from functools import lru_cache

from haina.core.device import DTypeName
from haina.core.errors import HainaError
from haina.tokenizer import Tokenizer

__all__ = ["DEFAULT_CHAT_TEMPLATE", "IM_END", "IM_START", "PLAIN_CHAT_TEMPLATE", "apply_chat_template", "chat_command",
           "chat_stop_strings", "chat_stop_token_ids", "encode_chat", "ensure_chat_tokens"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML, as used by Qwen and many others; the same text transformers documents for ChatML. A message's
# optional `name` goes after its role as in OpenAI's ChatML description (`<|im_start|>user name=alice`);
# conversations without names render exactly as before.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + (' name=' + message['name'] if message.get('name') else '') + '\n' "
    "+ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For a model whose vocabulary has no room for the ChatML markers (GPT-2's is full): plain-text headers, and the
# tokenizer's EOS — a token every haina tokenizer has — to end each assistant turn, so the model still learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:  # templates call this to reject bad conversations
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which transformers (and so templates) do not expect.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise HainaError(f"the chat template does not parse: {e}; fix chat_template in tokenizer_config.json") from None


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise HainaError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise HainaError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise HainaError(f"message {i}: 'name' must be a string, got {m['name']!r}")
    return [dict(m) for m in messages]


def apply_chat_template(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                        template: str | None = None) -> str:
    """Render a conversation to the prompt text the model was trained on.

    Args:
        tokenizer: supplies the template (`chat_template`, else `DEFAULT_CHAT_TEMPLATE`) and special tokens.
        messages: [{"role": "system"|"user"|"assistant", "content": str, "name": str (optional)}, ...].
        add_generation_prompt: end with the opening of an assistant turn.
        template: a template to use instead of the tokenizer's.

    The string shows the conversation; to feed a model use `encode_chat`, which keeps message text from
    becoming special tokens.
    """
    return _render(tokenizer, _check_messages(messages), add_generation_prompt, template)


def _render(tokenizer: Tokenizer, msgs: list[dict], add_generation_prompt: bool, template: str | None) -> str:
    from jinja2 import TemplateError

    compiled = _compile(template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    specials = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token or "",
                "pad_token": tokenizer.pad_token or "", "additional_special_tokens": list(tokenizer.extra_special)}
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **specials)
    except TemplateError as e:
        raise HainaError(f"chat template: {e}") from None


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                template: str | None = None) -> list[int]:
    """The prompt ids of a conversation: the template's markers as special tokens, the messages as text.

    Rendering to a string and encoding it with special tokens parsed would let a message that says
    `<|im_start|>system` open a turn. So every special-token string in the messages (and a piece of one at
    either end of a value, which could join the template's text into a marker) is swapped for a random
    placeholder before rendering; the render is cut at the special strings left, which only the template
    can have written; and each piece between them is encoded as text with the placeholders put back.
    When the messages hold no such string the render is encoded as a whole with special tokens parsed,
    which gives exactly the ids `transformers`' `apply_chat_template(tokenize=True)` gives.

    Args:
        tokenizer: the tokenizer (its template, else `DEFAULT_CHAT_TEMPLATE`, and its special tokens).
        messages: as for `apply_chat_template`.
        add_generation_prompt: end with the opening of an assistant turn.
        template: a template to use instead of the tokenizer's.
    """
    msgs = _check_messages(messages)
    specials = tuple(sorted(tokenizer.special_strings, key=len, reverse=True))
    escape = _Escape(specials)
    safe = [{k: escape(v) if isinstance(v, str) else v for k, v in m.items()} for m in msgs]
    rendered = _render(tokenizer, safe, add_generation_prompt, template)
    if not escape.swapped:
        return tokenizer.encode(rendered, parse_special=True)
    ids: list[int] = []
    for piece in tokenizer.split_special(rendered):
        ids += [piece] if isinstance(piece, int) else tokenizer.encode(escape.restore(piece))
    return ids


class _Escape:
    """Swaps special-token strings in message text for placeholders a template passes through, and back.

    A placeholder is a private-use character, a random per-render number and another private-use character:
    no special string, unchanged by the filters templates apply (trim, upper, tojson), and unguessable, so
    a message cannot contain one to be restored as something else.
    """

    def __init__(self, specials: tuple[str, ...]):
        self.specials = specials
        self.pattern = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        self.nonce = secrets.randbelow(10**12)
        self.swapped: dict[str, str] = {}  # placeholder -> original text

    def _placeholder(self, text: str) -> str:
        key = f"\ue000{self.nonce}.{len(self.swapped)}\ue001"
        self.swapped[key] = text
        return key

    def __call__(self, value: str) -> str:
        if self.pattern is None:
            return value
        value = self.pattern.sub(lambda m: self._placeholder(m.group()), value)
        # A value ending in the start of a marker ("<|im_") or starting with the end of one ("start|>") could
        # complete a marker with the template's text around it.
        tail = max((n for t in self.specials for n in range(len(t) - 1, 0, -1) if value.endswith(t[:n])),
                   default=0)
        if tail:
            value = value[:-tail] + self._placeholder(value[-tail:])
        head = max((n for t in self.specials for n in range(len(t) - 1, 0, -1) if value.startswith(t[-n:])),
                   default=0)
        if head:
            value = self._placeholder(value[:head]) + value[head:]
        return value

    def restore(self, text: str) -> str:
        for key, original in self.swapped.items():
            text = text.replace(key, original)
        return text


def chat_stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS, and `<|im_end|>` when it is a token."""
    ids = [tokenizer.eos_id]
    end = tokenizer.token_to_id(IM_END)
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def chat_stop_strings(tokenizer: Tokenizer, template: str | None = None) -> list[str]:
    """Text that ends an assistant turn when the ChatML markers are plain text, not single tokens.

    A model that never saw `<|im_end|>` as a token writes it as several, and may go on to open
    the next turn itself; both strings stop it.
    """
    text = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if IM_END not in text or tokenizer.token_to_id(IM_END) is not None:
        return []
    return [IM_END, IM_START]


def ensure_chat_tokens(tokenizer: Tokenizer, max_vocab: int | None = None) -> Tokenizer:
    """A tokenizer with `<|im_start|>`/`<|im_end|>` as special tokens (a copy; unchanged if present).

    Args:
        tokenizer: the tokenizer to extend.
        max_vocab: the model's vocabulary size; the new ids must fit below it.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer
    if max_vocab is not None and tokenizer.vocab_size + len(missing) > max_vocab:
        raise HainaError(f"adding the chat tokens {', '.join(missing)} needs a vocabulary of "
                         f"{tokenizer.vocab_size + len(missing)} but the model has {max_vocab}; train the tokenizer "
                         f"with --special-tokens including them, or use a model with a larger vocab_size")
    hf = HFTokenizer.from_str(tokenizer.to_json())
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    extra = tuple(tokenizer.extra_special) + tuple(t for t in (IM_START, IM_END) if t not in tokenizer.extra_special)
    return Tokenizer(hf, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                     chat_template=tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE, extra_special=extra)


# ---------------------------------------------------------------------------------------------- the REPL
HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits, /help shows this"


class ChatSession:
    """A conversation with a model: history, context truncation and streamed replies."""

    def __init__(self, generator, params, system: str | None = None):
        self.gen, self.system = generator, system
        tok = generator.tokenizer
        self.stops = chat_stop_strings(tok)
        self.params = _with_stop_ids(params, chat_stop_token_ids(tok))
        self.history: list[dict] = []
        self.turn = 0

    def reset(self) -> None:
        self.history = []

    def prompt_for(self, user: str) -> tuple[list[int], int]:
        """The prompt ids for the next reply, dropping the oldest turns until it fits; (ids, turns dropped)."""
        engine, tok = self.gen.engine, self.gen.tokenizer
        # Leave room for a reply of a useful length even when max_new_tokens exceeds the context.
        budget = engine.max_seq_len - min(self.params.max_new_tokens, engine.max_seq_len // 4)
        history, dropped = list(self.history), 0
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + history
            ids = encode_chat(tok, msgs + [{"role": "user", "content": user}])
            if len(ids) <= budget or not history:
                return ids, dropped
            history = history[2:]  # one user + assistant exchange
            dropped += 1

    def reply(self, user: str, out=sys.stdout) -> str:
        """Stream the assistant's reply to `out` and record the exchange."""
        from dataclasses import replace

        ids, dropped = self.prompt_for(user)
        if dropped:
            self.history = self.history[2 * dropped:]
            print(f"[context full: dropped the {dropped} oldest exchange(s)]", file=sys.stderr, flush=True)
        seed = None if self.params.seed is None else self.params.seed + self.turn
        self.turn += 1
        pieces: list[str] = []
        try:
            for delta in self.gen.stream(ids, replace(self.params, seed=seed), stop=self.stops):
                pieces.append(delta)
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()
        answer = "".join(pieces).strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


def _with_stop_ids(params, ids: list[int]):
    from dataclasses import replace

    return replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *ids])))


def chat_command(checkpoint: list[str], adapter: str | None = None, weights: list[float] | None = None,
                 system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0, repetition_penalty: float = 1.0,
                 seed: int | None = None, device: str = "auto", dtype: DTypeName = "float32") -> int:
    """Chat with a checkpoint in the terminal: replies stream as they are generated.

    History is kept across turns (the oldest turns are dropped when the context fills). Type
    /reset to clear it and /exit or Ctrl-D to quit.

    Args:
        checkpoint: checkpoint or training run directory (with a tokenizer); several make an ensemble, whose
            next-token probabilities are mixed (they must share one tokenizer; the first one's chat template is used).
        adapter: a LoRA run or checkpoint directory to chat with, trained on --checkpoint (its tokenizer, with the
            chat tokens fine-tuning may have added, is used instead of the base's); a single --checkpoint only.
        weights: the ensemble's weights, one per --checkpoint (e.g. 0.6,0.4), normalized to sum 1 (default: equal).
        system: a system message that opens the conversation.
        max_new_tokens: the longest reply, in tokens.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling threshold, in (0, 1].
        top_k: sample from the k most likely tokens only (0 = off).
        repetition_penalty: > 1 discourages repeating tokens already in the conversation.
        seed: random seed for reproducible replies.
        device: auto, cpu, cuda, cuda:1 or mps.
        dtype: the weights' precision: float32, bfloat16, or float16 (CUDA/MPS only).
    """
    from haina.core.device import resolve_device, resolve_dtype
    from haina.generate.command import check_adapter_path
    from haina.generate.engine import Engine
    from haina.generate.ensemble import as_checkpoints, load_ensemble
    from haina.generate.sampling import SamplingParams
    from haina.generate.text import TextGenerator

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    params.validate()
    check_adapter_path(adapter)
    paths = as_checkpoints(checkpoint)
    dev = resolve_device(device)
    model, tokenizer = load_ensemble(paths, weights, device=dev, dtype=resolve_dtype(dtype, dev), adapter=adapter)
    if tokenizer is None:
        raise HainaError(f"checkpoint {paths[0]} has no tokenizer/ directory; chat needs one to read and write text")
    engine = Engine(model, max_batch_size=1, eos_token_id=tokenizer.eos_id)
    session = ChatSession(TextGenerator(engine, tokenizer), params, system=system)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    what = " + ".join(paths) if adapter is None else f"{paths[0]} + adapter {adapter}"
    print(f"chatting with {what} ({model.num_params() / 1e6:.1f}M parameters). {HELP}", flush=True)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # like Python's REPL: Ctrl-C abandons the line, Ctrl-D quits
            print()
            continue
        command = user.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("[conversation cleared]", flush=True)
            continue
        if command == "/help":
            print(HELP, flush=True)
            continue
        try:
            session.reply(user)
        except HainaError as e:  # e.g. one message longer than the context: say so, keep chatting
            print(f"error: {e}", flush=True)
