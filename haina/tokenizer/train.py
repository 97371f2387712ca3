"""Train tokenizers: GPT-2 style byte-level BPE, or one token per character.

Both are plain `tokenizers` models, so the result saves as a standard `tokenizer.json` that
`transformers.PreTrainedTokenizerFast` reads. Neither has a normalizer: decode(encode(x)) == x
exactly (for BPE for any Unicode text, because every byte is in its base alphabet; for the
character vocabulary for text made of characters seen in training).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from haina.core.errors import HainaError
from haina.core.io import match_input
from haina.core.log import info
from haina.core.output import check_output, output_dir
from haina.tokenizer.tokenizer import EOT, Tokenizer

UNK = "<|unk|>"  # the character vocabulary's stand-in for characters never seen in training
N_BYTES = 256
COMMAND = "tokenizer train"  # the name in the manifest of its outputs


def _eos_and_extra(special_tokens: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    specials = list(dict.fromkeys(special_tokens))  # dedupe, keep order: the order fixes their ids
    if not specials:
        raise HainaError(f"a tokenizer needs an end-of-text special token; pass special_tokens=('{EOT}',)")
    eos = EOT if EOT in specials else specials[0]
    return eos, tuple(s for s in specials if s != eos)


class _Counted:
    """Wraps the document stream to count what went in, without holding it."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.documents, self.characters = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if text:
                self.documents += 1
                self.characters += len(text)
                yield text


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (EOT,),
              min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer from a stream of documents.

    Args:
        texts: documents; consumed once, as an iterator, so the corpus never has to fit in memory.
        vocab_size: total size including the 256 byte tokens and the special tokens.
        special_tokens: added first (ids 0, 1, ...); the end-of-text token `EOT` is the EOS if present.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        The trained tokenizer (fewer than `vocab_size` tokens if the corpus runs out of pairs).
    """
    eos, extra = _eos_and_extra(special_tokens)
    specials = [eos, *extra]
    if vocab_size < N_BYTES + len(specials):
        raise HainaError(f"vocab_size {vocab_size} is too small for byte-level BPE: it needs at least "
                         f"{N_BYTES + len(specials)} (256 bytes + {len(specials)} special tokens); raise --vocab-size")
    tok = HFTokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the text, and exact round trips matter more.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    counted = _Counted(texts)
    tok.train_from_iterator(iter(counted), trainer=trainer)
    if counted.documents == 0:
        raise HainaError("the corpus is empty: no non-empty documents to train the tokenizer on")
    return Tokenizer(tok, eos_token=eos, extra_special=extra)


def train_char(texts: Iterable[str], special_tokens: Iterable[str] = (EOT,)) -> Tokenizer:
    """Build a character-level tokenizer: one token per distinct character of the corpus.

    Special tokens come first, then `<|unk|>` (for characters never seen), then the characters in
    code point order, so the same corpus always gives the same ids. It is a `WordLevel` model over
    a pre-tokenizer that isolates every character, with a `Fuse` decoder that joins them back.

    Args:
        texts: documents, consumed once.
        special_tokens: added first; the end-of-text token `EOT` is the EOS if present.
    """
    eos, extra = _eos_and_extra(special_tokens)
    chars: set[str] = set()
    counted = _Counted(texts)
    for text in counted:
        chars.update(text)
    if counted.documents == 0:
        raise HainaError("the corpus is empty: no non-empty documents to build a character vocabulary from")
    extra = (*extra, UNK) if UNK not in extra and UNK != eos else extra
    specials = [eos, *extra]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Oniguruma has no DOTALL flag spelled (?s); [\s\S] is "any code point, newlines included".
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)  # so they are matched whole in text and skipped by skip_special
    return Tokenizer(tok, eos_token=eos, extra_special=extra)


def train_command(input: list[str], out: str, vocab_size: int = 8192, kind: Literal["bpe", "char"] = "bpe",
                  text_field: str = "text", overwrite: bool = False) -> None:
    """Train a byte-level BPE or character tokenizer on text files and save it.

    Reads .txt, .jsonl and .parquet files (optionally .gz/.zst/.bz2), directories and globs, and
    writes OUT/tokenizer.json and OUT/tokenizer_config.json (readable by transformers), built beside
    OUT and swapped in when complete.

    Args:
        input: files, directories or glob patterns holding the training text.
        out: output directory for the tokenizer (an earlier `tokenizer train` output there is replaced; anything
            else needs --overwrite).
        vocab_size: BPE vocabulary size, special tokens included (ignored for char).
        kind: bpe (byte-level, any text round-trips) or char (one token per character seen).
        text_field: the text field of .jsonl records and .parquet columns.
        overwrite: replace an existing OUT that is not a `tokenizer train` output (never one that is, holds or lies
            inside an input).
    """
    if not input:
        raise HainaError("no input given; pass --input FILE [FILE ...]")
    check_output(out, COMMAND, inputs=input, overwrite=overwrite)  # before training, which may take long
    docs = iter_documents(input, text_field=text_field)
    tok = train_bpe(docs, vocab_size) if kind == "bpe" else train_char(docs)
    with output_dir(out, COMMAND, inputs=input, overwrite=overwrite) as tmp:
        tok.save(tmp)
    info(f"trained a {kind} tokenizer with {tok.vocab_size:,} tokens → {Path(out) / 'tokenizer.json'}")


# --------------------------------------------------------------------------- reading the training text
# The strict document reader behind `haina tokenizer train` and `haina data tokenize`; its public
# home is `haina.data.text_input`. It lives here because `tokenizer` sits below `data` in the stage
# order and `haina tokenizer train` must read files too (it needs nothing but haina.core).

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2")
PARQUET_BATCH_ROWS = 1024


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def expand_inputs(paths: Iterable[str]) -> list[Path]:
    """Files, directories (recursively) and globs → the readable files, in a deterministic order.

    A file or pattern that is named but missing or of an unknown format is an error; inside
    directories, hidden files and files of other formats (reports, READMEs) are skipped.
    """
    files: list[Path] = []
    for raw in paths:
        for m in match_input(raw):
            if m.is_dir():
                for root, dirs, names in os.walk(m):
                    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                    files += [Path(root, n) for n in sorted(names)
                              if not n.startswith((".", "_")) and _format_of(Path(n)) is not None]
            elif _format_of(m) is None:
                raise HainaError(f"cannot read {m}: expected .txt, .jsonl or .parquet (optionally .gz, .zst or .bz2)")
            else:
                files.append(m)
    seen: set[str] = set()
    unique = []
    for f in files:  # a file named twice (its directory and a glob inside it) is read once
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _open_binary(path: Path) -> io.BufferedIOBase:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        import zstandard  # only zstd inputs pay for the import

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb")


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HainaError(f"{where}: invalid UTF-8 at byte {e.start}; convert the file to UTF-8 or clean it with "
                         "`haina data prepare`, which replaces bad bytes") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{n}").strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise HainaError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); fix the line or use "
                                 "`haina data prepare`, which sets bad records aside") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise HainaError(f"{path}:{n}: no '{text_field}' field; set --text-field")
            text = rec[text_field]
            if text is not None and not isinstance(text, str):
                raise HainaError(f"{path}:{n}: '{text_field}' is a {type(text).__name__}, not a string")
            if text:
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # slow to import, and only parquet needs it

    if path.suffix.lower() in COMPRESSIONS:
        # Parquet needs random access; a compressed parquet file (rare: its pages are compressed already)
        # is decompressed into memory.
        with _open_binary(path) as f:
            source = io.BytesIO(f.read())
    else:
        source = str(path)
    pf = pq.ParquetFile(source)
    if text_field not in pf.schema_arrow.names:
        raise HainaError(f"{path} has no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                         "set --text-field")
    # Row batches keep memory bounded however large the file is.
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, bytes):
                text = _utf8(text, str(path))
            if text is not None and not isinstance(text, str):
                raise HainaError(f"{path}: column '{text_field}' holds {type(text).__name__}, not strings")
            if text:
                yield text


def iter_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from .txt (one per file), .jsonl (one per line) and .parquet (one per row) inputs.

    Args:
        paths: files, directories (read recursively, sorted) or glob patterns; each file may be
            compressed with .gz, .zst or .bz2.
        text_field: the field of JSONL records and the column of parquet files holding the text.

    Raises:
        HainaError: for a missing input, a bad JSON line (naming file:line) or invalid UTF-8.
    """
    for path in expand_inputs(list(paths)):
        kind = _format_of(path)
        if kind == "txt":
            with _open_binary(path) as f:
                text = _utf8(f.read(), str(path))
            if text:
                yield text
        elif kind == "jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)
