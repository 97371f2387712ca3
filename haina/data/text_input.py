"""Plain text input for tokenizing: files, directories and globs → documents.

`iter_documents` reads .txt (a whole file is one document), .jsonl (one per line) and .parquet
(one per row), each optionally .gz/.zst/.bz2 compressed. It is strict: a bad JSON line stops it
with file:line, because `haina data prepare` is the lenient reader that sets bad records aside.
The implementation lives in `haina.tokenizer.train` because `haina tokenizer train` reads files
too and the tokenizer stage may not import this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from haina.tokenizer.train import expand_inputs, iter_documents

SPLITS = ("train", "val", "test")


def find_split_dirs(paths: Iterable[str]) -> dict[str, list[str]] | None:
    """The splits of a `haina data prepare` output, or None for any other input.

    A single directory holding `report.json`, `train/` and `val/` was split by prepare already;
    tokenizing keeps that split rather than drawing a new one.

    Returns:
        {"train": [DIR/train], "val": [DIR/val]} (plus "test" when prepare filled one), or None.
    """
    paths = list(paths)
    if len(paths) != 1:
        return None
    d = Path(paths[0])
    if not (d.is_dir() and (d / "report.json").is_file() and (d / "train").is_dir() and (d / "val").is_dir()):
        return None
    # prepare always writes test/; it is a split only when --test-fraction put documents in it.
    return {s: [str(d / s)] for s in SPLITS if (d / s).is_dir() and (s != "test" or any((d / s).iterdir()))}


__all__ = ["expand_inputs", "find_split_dirs", "iter_documents"]
