"""The Tokenizer: a thin, typed wrapper over a `tokenizers.Tokenizer`.

Saved as `tokenizer.json` (Hugging Face's format, so `transformers` can read it) plus
`tokenizer_config.json` holding the special tokens and the chat template.

Text is text: `encode` never turns a control string written in the text (`<|endoftext|>`,
`<|im_start|>`) into its special id, so a document or prompt that mentions one cannot end a
document or forge a chat turn. Special ids come only from structure: the shard writer's EOS
between documents, the chat template's turn markers (`haina.generate.chat.encode_chat`), or a
caller who asks for them with `parse_special=True`. `transformers` parses special strings by
default; `encode(text)` equals its `tokenizer(text, add_special_tokens=False,
split_special_tokens=True)` and `encode(text, parse_special=True)` its default. Both agree on
text without control strings.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from haina.core.errors import HainaError
from haina.core.io import read_json, write_json, write_text

EOT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, eos_token: str = EOT, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_special: tuple[str, ...] = ()):
        self.tok = tok
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        self.extra_special = tuple(extra_special)
        if tok.token_to_id(eos_token) is None:
            raise HainaError(f"tokenizer has no end-of-text token '{eos_token}'")
        self._plain = _plain_copy(tok, [t for t in (eos_token, bos_token, pad_token, *self.extra_special) if t])

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.tok.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.tok.token_to_id(self.pad_token)

    @property
    def special_tokens(self) -> dict[str, int]:
        names = [self.eos_token, self.bos_token, self.pad_token, *self.extra_special]
        return {n: self.tok.token_to_id(n) for n in names if n is not None and self.tok.token_to_id(n) is not None}

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, *, parse_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text.
            parse_special: turn special-token strings written in the text into their ids; off by default, so
                that user text can never inject an end-of-text or a chat turn marker.
            add_special_tokens: add what the tokenizer's post-processor adds around a sequence (e.g. the BOS of
                Llama tokenizers; nothing for haina's own tokenizers).
        """
        tok = self.tok if parse_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, parse_special: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the Rust library uses all cores); `parse_special` as in `encode`."""
        tok = self.tok if parse_special else self._plain
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which a caller wanting only ids
        # never reads: less memory per token and ~10% faster.
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    @property
    def special_strings(self) -> dict[str, int]:
        """Every special token's text and id: the added tokens marked special, and the named special tokens."""
        out = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        return {**out, **self.special_tokens}

    def split_special(self, text: str) -> list[str | int]:
        """`text` cut at the special-token strings in it: the text between them, and each marker's id.

        Matches are leftmost-longest, as in `tokenizers`, and a marker declared `lstrip`/`rstrip` takes the
        whitespace beside it, as `tokenizers` does (`single_word` and `normalized` markers are matched as plain
        strings). Empty pieces are left out.
        """
        specials = self.special_strings
        if not specials:
            return [text] if text else []
        pattern = _special_pattern(tuple(sorted(specials, key=len, reverse=True)))
        strip = {t.content: t for t in self.tok.get_added_tokens_decoder().values()}
        out: list[str | int] = []
        pos, rstrip = 0, False
        for m in pattern.finditer(text):
            piece = text[pos:m.start()]
            added = strip.get(m.group())
            if rstrip:
                piece = piece.lstrip()
            if added is not None and added.lstrip:
                piece = piece.rstrip()
            if piece:
                out.append(piece)
            out.append(specials[m.group()])
            rstrip, pos = added is not None and added.rstrip, m.end()
        tail = text[pos:].lstrip() if rstrip else text[pos:]
        if tail:
            out.append(tail)
        return out

    def post_processor_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one sequence (e.g. ([BOS], []) for Llama)."""
        probe = self._plain.encode("a", add_special_tokens=False).ids
        full = self._plain.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(probe) + 1):
            if full[start:start + len(probe)] == probe:
                return full[:start], full[start + len(probe):]
        return [], []  # a post-processor that rewrites the sequence itself: nothing to add around it

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    # ----------------------------------------------------------------- persistence
    def to_json(self) -> str:
        return self.tok.to_str()

    def hash(self) -> str:
        """A short content hash: shards record it so they are never read with another tokenizer."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def config(self) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "additional_special_tokens": list(self.extra_special),
            "chat_template": self.chat_template,
            "model_max_length": 1_000_000,
        }

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "tokenizer.json", self.to_json())
        write_json(out / "tokenizer_config.json", self.config())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json).

        A missing, damaged or foreign file is a HainaError naming the file and what is wrong with it.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise HainaError(f"no tokenizer.json at {path}; train one with `haina tokenizer train`")
        tok = read_tokenizer_file(file)
        cfg = read_tokenizer_config(file.parent / "tokenizer_config.json")
        if isinstance(cfg.get("chat_template"), list):  # transformers' named templates; haina saves one string
            raise HainaError(f"{file.parent / 'tokenizer_config.json'}: 'chat_template' must be a string")

        def _tok(v):  # transformers may store tokens as {"content": ...} dicts
            return v.get("content") if isinstance(v, dict) else v

        return cls(tok, eos_token=_tok(cfg.get("eos_token")) or EOT, bos_token=_tok(cfg.get("bos_token")),
                   pad_token=_tok(cfg.get("pad_token")), chat_template=cfg.get("chat_template"),
                   extra_special=tuple(_tok(t) for t in cfg.get("additional_special_tokens") or ()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json() and self.config() == other.config()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def read_tokenizer_file(file: str | Path) -> HFTokenizer:
    """A `tokenizers` tokenizer from its `tokenizer.json`, with a one-line error for a damaged or foreign file."""
    # Read here rather than in Rust, so that an OS error (permissions) stays an OSError naming the path.
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HainaError(f"cannot read tokenizer {file}: not UTF-8 text (is it a tokenizer.json?)") from None
    try:
        tok = HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 — the Rust library raises plain Exceptions for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HainaError(f"cannot read tokenizer {file}: not a tokenizers JSON file ({reason})") from None
    # haina pads and truncates batches itself: a file's own settings (sentence-transformers pads every text to
    # 128 [PAD]s) would otherwise come back as text.
    tok.no_padding()
    tok.no_truncation()
    return tok


def read_tokenizer_config(file: str | Path) -> dict:
    """A `tokenizer_config.json` as a dict ({} when absent), with one-line errors for damaged files.

    Checks the types of the fields haina reads, so that a wrong one is named here rather than failing
    later inside a chat template or a token lookup.
    """
    file = Path(file)
    if not file.exists():
        return {}
    cfg = read_json(file, expect=dict)

    def token_ok(v) -> bool:
        return v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))

    for key in ("eos_token", "bos_token", "pad_token"):
        if not token_ok(cfg.get(key)):
            raise HainaError(f"{file}: '{key}' must be a string, got {cfg[key]!r}")
    extra = cfg.get("additional_special_tokens")
    if extra is not None and not (isinstance(extra, list) and all(token_ok(t) and t for t in extra)):
        raise HainaError(f"{file}: 'additional_special_tokens' must be a list of strings")
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise HainaError(f"{file}: 'chat_template' must be a string, got {type(template).__name__}")
    return cfg


def _plain_copy(tok: HFTokenizer, named: list[str]) -> HFTokenizer:
    """A copy of `tok` that encodes special-token strings as ordinary text.

    The named special tokens (EOS, BOS, PAD, additional) are marked special in the copy first: a tokenizer
    from elsewhere may list `<|im_start|>` as an added token without the special flag, and
    `encode_special_tokens` only passes over flagged ones. Ids and the vocabulary stay the same.
    """
    plain = HFTokenizer.from_str(tok.to_str())
    added = {t.content: t for t in plain.get_added_tokens_decoder().values()}
    unflagged = [t for t in named if t in added and not added[t].special]
    if unflagged:
        plain.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in unflagged])
    plain.encode_special_tokens = True
    return plain


@lru_cache(maxsize=16)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in specials))  # longest first: the alternation takes the longest
