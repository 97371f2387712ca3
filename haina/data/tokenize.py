"""Text → memory-mapped token shards (the format `haina.data.shards` reads).

    OUT/meta.json           {"format": "haina-shards/1", "dtype": "uint16"|"uint32", "vocab_size": int,
                             "eos_id": int, "tokenizer_hash": str,
                             "splits": {"train": {"tokens": int, "documents": int, "shards": [...]}, "val": ...}}
    OUT/<split>-NNNNN.bin   raw little-endian token ids, each document followed by the end-of-text id
    OUT/tokenizer/          the tokenizer, so the directory is self-contained

The split is deterministic: a document goes to val iff a hash of its text falls below
`val_fraction`, so the same corpus splits the same way on every run and machine, whatever the
file order. A single document (or a corpus whose hash split left val empty) is split by its
tail instead, as nanoGPT does: the last `val_fraction` of the tokens. A `haina data prepare`
output keeps its own split.

Shards are written under hidden temporary names and renamed only when everything succeeded,
meta.json last, so an interrupted run never leaves a valid-looking partial dataset.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from haina.core.errors import HainaError
from haina.core.io import read_json, write_json
from haina.core.log import info, progress
from haina.core.output import check_output, output_dir
from haina.data.text_input import find_split_dirs, iter_documents
from haina.tokenizer import Tokenizer

FORMAT = "haina-shards/1"
COMMAND = "data tokenize"  # the name in the manifest of its outputs
SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard: few files, each still quick to copy
BATCH_DOCS = 1000
BATCH_CHARS = 4_000_000  # a batch is enough work for every core, and its encodings stay in the tens of MB
PIECE_CHARS = 1_000_000  # longer documents are encoded in pieces; see _pieces
COPY_TOKENS = 1 << 24  # chunk size when moving a tail from train to val
_NEWLINE_CUT = re.compile(r"\S\n")
_SPACE_CUT = re.compile(r"\S\s")


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def in_val(text: str, val_fraction: float) -> bool:
    """The deterministic split: the first 8 bytes of blake2b(text) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


class _ShardWriter:
    """Appends token arrays to numbered temporary shard files, rolling over every `shard_tokens`."""

    def __init__(self, out: Path, tag: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.tag, self.dtype, self.shard_tokens = out, tag, dtype, shard_tokens
        self.paths: list[Path] = []
        self.sizes: list[int] = []
        self.tokens = 0
        self.documents = 0
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            if self._f is None or self.sizes[-1] >= self.shard_tokens:
                self._open_next()
            take = min(len(ids) - pos, self.shard_tokens - self.sizes[-1])
            self._f.write(ids[pos : pos + take].tobytes())
            self.sizes[-1] += take
            self.tokens += take
            pos += take

    def _open_next(self) -> None:
        self.close()
        path = self.out / f".tmp-{self.tag}-{len(self.paths):05d}.bin"
        self.paths.append(path)
        self.sizes.append(0)
        self._f = open(path, "wb")  # noqa: SIM115 (held open across many write() calls; close() ends it)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_tail(self, n: int) -> Iterator[np.ndarray]:
        """The last n tokens, in order, in chunks; the writer must be closed."""
        skip = self.tokens - n
        for path, size in zip(self.paths, self.sizes):
            if skip >= size:
                skip -= size
                continue
            arr = np.memmap(path, dtype=self.dtype, mode="r")
            for start in range(skip, size, COPY_TOKENS):
                yield np.array(arr[start : min(size, start + COPY_TOKENS)])
            skip = 0
            del arr

    def truncate(self, n: int) -> None:
        """Keep the first n tokens; the writer must be closed."""
        keep = n
        for i, size in enumerate(self.sizes):
            new = min(size, keep)
            if new < size:
                os.truncate(self.paths[i], new * self.dtype.itemsize)
                self.sizes[i] = new
            keep -= new
        self.tokens = n

    def last_token(self) -> int | None:
        for path, size in zip(reversed(self.paths), reversed(self.sizes)):
            if size:
                return int(np.memmap(path, dtype=self.dtype, mode="r")[size - 1])
        return None

    def remove(self) -> None:
        self.close()
        for p in self.paths:
            p.unlink(missing_ok=True)


def _pieces(text: str) -> list[str]:
    """Cut a very long document into pieces of at most PIECE_CHARS, for bounded encoder memory.

    The encoder keeps offsets and token strings per token (~100 bytes each), so one 1 GB text file
    would need tens of GB. Each cut falls between a non-space and a whitespace character, at a
    newline when there is one: no GPT-2 pre-token holds a space after a non-space (a space only
    starts a pre-token or belongs to an all-whitespace one), and BPE never merges across
    pre-tokens, so the ids are exactly those of the whole text.
    """
    if len(text) <= PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        lo, end = start + PIECE_CHARS // 2, start + PIECE_CHARS
        cut = -1
        for pattern in (_NEWLINE_CUT, _SPACE_CUT):
            for m in pattern.finditer(text, lo, end + 1):
                cut = m.start() + 1
            if cut != -1:
                break
        if cut == -1:  # no whitespace in half a window (rare: minified data); a hard cut
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _batches(docs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for split, text in docs:
        batch.append((split, text))
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` on a background thread, so reading and parsing overlap encoding.

    Encoding runs in Rust with the GIL released, so the Python-side reading (decompression, JSON)
    proceeds meanwhile. Errors in the producer are re-raised here; closing this generator stops it.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 (not swallowed: handed to the consumer, which raises it)
            put((e, None))

    thread = threading.Thread(target=produce, daemon=True, name="haina-tokenize-reader")
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _label(documents: Iterable[str] | Mapping[str, Iterable[str]], val_fraction: float) -> Iterator[tuple[str, str]]:
    if isinstance(documents, Mapping):
        for split, docs in documents.items():
            for text in docs:
                if text:
                    yield split, text
    else:
        for text in documents:
            if text:
                yield ("val" if val_fraction > 0 and in_val(text, val_fraction) else "train"), text


def _move_tail(src: _ShardWriter, dst: _ShardWriter, n: int, eos_id: int) -> None:
    """Move the last n tokens of `src` to the (empty) `dst`, keeping document counts honest."""
    moved_docs = 0
    for chunk in src.read_tail(n):
        dst.write(chunk)
        moved_docs += int(np.count_nonzero(chunk == eos_id))
    dst.close()
    total_docs = src.documents
    src.truncate(src.tokens - n)
    dst.documents = moved_docs
    # A cut inside a document leaves its head in train: it counts there as well.
    src.documents = total_docs - moved_docs + (0 if src.last_token() in (eos_id, None) else 1)


def tokenize_to_shards(documents: Iterable[str] | Mapping[str, Iterable[str]], tokenizer: Tokenizer,
                       out: str | Path, val_fraction: float = 0.1, shard_tokens: int = SHARD_TOKENS,
                       save_tokenizer: bool = True, shown_as: str | Path | None = None) -> dict:
    """Encode documents into train/val token shards under `out` and return the meta.json written.

    Args:
        documents: a stream of documents to split by hash, or a mapping split name → documents
            whose split is kept (e.g. the train/val directories of `haina data prepare`).
        tokenizer: the tokenizer; its end-of-text id follows every document.
        out: output directory; an earlier dataset there is replaced only once this one is complete.
        val_fraction: share of documents (or, for a single document, of tokens) that go to val.
        shard_tokens: tokens per shard file before rolling over to the next.
        save_tokenizer: also save the tokenizer to OUT/tokenizer/ so the directory is self-contained.
        shown_as: the name of the output in the summary line, when `out` is a directory it is built in.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise HainaError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise HainaError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    run = uuid.uuid4().hex[:8]  # two runs into one directory never share a temporary file
    given = isinstance(documents, Mapping)
    names = dict.fromkeys([*(documents.keys() if given else ()), "train", "val"])  # train and val always exist
    writers = {split: _ShardWriter(out, f"{run}-{split}", dtype, shard_tokens) for split in names}
    start = time.perf_counter()
    try:
        bar = progress(desc="tokenizing", unit="doc")
        for batch in _prefetch(_batches(_label(documents, val_fraction))):
            pieces, owners = [], []
            for i, (_, text) in enumerate(batch):
                for piece in _pieces(text):
                    pieces.append(piece)
                    owners.append(i)
            # Documents are text: a "<|endoftext|>" written in one stays text, only the EOS below ends a document.
            encoded = tokenizer.encode_batch(pieces, parse_special=False)
            flat: dict[str, list[int]] = {}
            for j, ids in enumerate(encoded):
                split = batch[owners[j]][0]
                buf = flat.setdefault(split, [])
                buf.extend(ids)
                if j + 1 == len(owners) or owners[j + 1] != owners[j]:  # the document's last piece
                    buf.append(eos)
                    writers[split].documents += 1
            for split, ids in flat.items():
                writers[split].write(np.asarray(ids, dtype=dtype))
            bar.update(len(batch))
        bar.close()
        for w in writers.values():
            w.close()
        method = "given" if given else "hash"
        if not given and val_fraction > 0:
            train, val = writers["train"], writers["val"]
            if train.tokens == 0 and val.tokens > 0:  # everything hashed into val (e.g. one document)
                writers["train"], writers["val"] = val, train
                train, val = val, train
            if val.tokens == 0 and train.tokens >= 2:
                n = min(train.tokens - 1, max(1, round(train.tokens * val_fraction)))
                why = "one document" if train.documents == 1 else "the hash split put no document in val"
                _move_tail(train, val, n, eos)
                method = "tail"
                info(f"{why}: the last {n:,} tokens ({val_fraction:.0%}) form the val split")
        total = sum(w.tokens for w in writers.values())
        if total == 0:
            raise HainaError("the corpus is empty: no documents with text to tokenize; check --input and --text-field")
        meta = _finalize(out, writers, tokenizer, dtype, method, save_tokenizer)
    except BaseException:
        for w in writers.values():
            w.remove()
        raise
    seconds = time.perf_counter() - start
    meta_splits = meta["splits"]
    summary = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs / {len(v['shards'])} shards"
                        for s, v in meta_splits.items())
    info(f"tokenized into {shown_as or out}: {summary}; {meta['dtype']}, {total / max(seconds, 1e-9):,.0f} tokens/s")
    return meta


def _finalize(out: Path, writers: dict[str, _ShardWriter], tokenizer: Tokenizer, dtype: np.dtype, method: str,
              save_tokenizer: bool) -> dict:
    """Rename the temporary shards into place and write meta.json last."""
    splits: dict[str, dict] = {}
    renames: list[tuple[Path, Path]] = []
    for split, w in writers.items():
        names = []
        for path, size in zip(w.paths, w.sizes):
            if size == 0:
                path.unlink(missing_ok=True)
                continue
            names.append(f"{split}-{len(names):05d}.bin")
            renames.append((path, out / names[-1]))
        splits[split] = {"tokens": w.tokens, "documents": w.documents, "shards": names}
    # An earlier dataset here stops being valid before any of its shards is overwritten.
    old_meta = out / "meta.json"
    old_shards: list[str] = []
    if old_meta.is_file():
        try:
            old = read_json(old_meta)
            old_shards = [n for s in old.get("splits", {}).values() for n in s.get("shards", [])]
        except (HainaError, AttributeError, TypeError):  # unreadable: no dataset left to keep consistent
            pass
        old_meta.unlink()
    new_names = {dst.name for _, dst in renames}
    for name in old_shards:
        if name not in new_names and "/" not in name and name.endswith(".bin"):
            (out / name).unlink(missing_ok=True)
    for src, dst in renames:
        os.replace(src, dst)
    if save_tokenizer:
        tokenizer.save(out / "tokenizer")
    meta = {"format": FORMAT, "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "tokenizer_hash": tokenizer.hash(),
            "split_method": method, "splits": splits}
    write_json(out / "meta.json", meta)
    return meta


def tokenize_command(input: list[str], tokenizer: str, out: str, val_fraction: float = 0.1, text_field: str = "text",
                     workers: int = 0, overwrite: bool = False) -> None:
    """Encode text into memory-mapped train/val token shards for pretraining.

    Documents go to val by a hash of their text (deterministic); a single document is split by
    its last tokens instead, and a `haina data prepare` output keeps its own train/val split.
    Writes OUT/meta.json, OUT/<split>-NNNNN.bin and a copy of the tokenizer in OUT/tokenizer/, built
    beside OUT and swapped in when complete.

    Args:
        input: .txt/.jsonl/.parquet files (optionally compressed), directories or globs, or one
            `haina data prepare` output directory.
        tokenizer: tokenizer directory (or tokenizer.json) from `haina tokenizer train`.
        out: output directory for the shards (an earlier `data tokenize` output there is replaced; anything else
            needs --overwrite).
        val_fraction: share of documents held out for validation.
        text_field: the text field of .jsonl records and .parquet columns.
        workers: encoder threads; 0 uses every core.
        overwrite: replace an existing OUT that is not a `data tokenize` output (never one that is, holds or lies
            inside an input or the tokenizer).
    """
    if workers < 0:
        raise HainaError(f"--workers must be 0 (every core) or positive, got {workers}")
    if workers:
        # Threads, not processes: the Rust encoder runs on its own thread pool without the GIL, so a
        # process pool would only add the cost of pickling every batch and its ids across processes.
        # The pool reads this once, when first used, which in the CLI is below.
        os.environ["RAYON_NUM_THREADS"] = str(workers)
        if workers == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    inputs = [*input, tokenizer]
    check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)  # before the work, not after it
    tok = Tokenizer.load(tokenizer)
    splits = find_split_dirs(input)
    if splits is not None:
        info(f"{input[0]} is a `haina data prepare` output: keeping its {'/'.join(splits)} split")
        documents: Iterable[str] | Mapping[str, Iterable[str]] = {
            s: iter_documents(paths, text_field=text_field) for s, paths in splits.items()}
    else:
        documents = iter_documents(input, text_field=text_field)
    with output_dir(out, COMMAND, inputs=inputs, overwrite=overwrite) as tmp:
        tokenize_to_shards(documents, tok, tmp, val_fraction=val_fraction, shown_as=out)
