"""Token shards on disk, read as one memory-mapped array per split.

The format (written by `haina.data.tokenize`):

    DIR/meta.json           {"format": "haina-shards/1", "dtype": "uint16"|"uint32", "vocab_size": int,
                             "eos_id": int, "tokenizer_hash": str,
                             "splits": {"train": {"tokens": int, "documents": int, "shards": [...]}, ...}}
    DIR/<split>-NNNNN.bin   raw little-endian token ids; documents separated by the end-of-text token

Training windows are drawn at random offsets from a `torch.Generator` the caller owns, so the
position in the data is part of the resumable training state; evaluation windows are fixed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.io import read_json
from haina.tokenizer import Tokenizer

FORMAT = "haina-shards/1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_meta(data_dir: str | Path) -> dict:
    """The validated `meta.json` of a shard directory."""
    d = Path(data_dir)
    if not d.is_dir():
        raise HainaError(f"data directory not found: {d}; build it with `haina data tokenize`")
    path = d / "meta.json"
    if not path.is_file():
        raise HainaError(f"{d} has no meta.json; is it a token-shard directory written by `haina data tokenize`?")
    meta = read_json(path, "re-create it with `haina data tokenize`")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise HainaError(f"{path} has format {found!r}, expected '{FORMAT}'; re-create it with `haina data tokenize`")
    if meta.get("dtype") not in DTYPES:
        raise HainaError(f"{path}: unsupported dtype {meta.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    if not isinstance(meta.get("splits"), dict):
        raise HainaError(f"{path} has no 'splits' mapping")
    return meta


class TokenShards:
    """All shards of one split as a single virtual, memory-mapped token array.

    Args:
        data_dir: directory with meta.json and the .bin shards.
        split: split name in meta.json, e.g. "train" or "val".
    """

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.dir)
        splits = self.meta["splits"]
        if split not in splits:
            raise HainaError(f"{self.dir / 'meta.json'} has no split '{split}' (has: {', '.join(splits) or 'none'})")
        self.dtype = DTYPES[self.meta["dtype"]]
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta.get("eos_id", -1))
        self._arrays: list[np.memmap] = []
        for name in splits[split].get("shards", []):
            path = self.dir / name
            if not path.is_file():
                raise HainaError(f"shard {path} listed in meta.json is missing; re-run `haina data tokenize`")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise HainaError(f"shard {path} is truncated ({size} bytes is not a multiple of {self.dtype.itemsize})")
            if size:  # np.memmap refuses empty files
                self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        # Offsets of each shard in the virtual array, for windows that straddle a shard boundary.
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])
        self._len = int(self._starts[-1])
        expected = splits[split].get("tokens")
        if expected is not None and int(expected) != self._len:
            raise HainaError(f"split '{split}' in {self.dir} should hold {expected} tokens but its shards hold "
                             f"{self._len}; re-run `haina data tokenize`")

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenShards({str(self.dir)!r}, split={self.split!r}, tokens={self._len:,})"

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64, crossing shard boundaries if needed."""
        if start < 0 or start + length > self._len:
            raise IndexError(f"window [{start}, {start + length}) outside a split of {self._len} tokens")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, need, pos = [], length, start - int(self._starts[i])
        while need > 0:
            arr = self._arrays[i]
            take = min(need, len(arr) - pos)
            parts.append(arr[pos : pos + take])
            need -= take
            i, pos = i + 1, 0
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(np.int64)

    def check_length(self, block_size: int) -> None:
        """Refuse a split too short for one window of block_size + 1 tokens."""
        if self._len < block_size + 1:
            raise HainaError(f"split '{self.split}' of {self.dir} has {self._len} tokens, fewer than block_size + 1 "
                             f"= {block_size + 1}; lower train.block_size or add data")

    def get_batch(self, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: x (B, T) and y = x shifted left by one, both int64 on CPU.

        Args:
            batch_size: rows B.
            block_size: tokens per row T.
            generator: the source of the offsets; its state is the position in the data.
        """
        self.check_length(block_size)
        starts = torch.randint(self._len - block_size, (batch_size,), generator=generator).tolist()
        rows = np.stack([self.window(s, block_size + 1) for s in starts])  # (B, T+1)
        buf = torch.from_numpy(rows)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def eval_batches(self, batch_size: int, block_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic, non-overlapping windows spread evenly over the split.

        Args:
            batch_size: rows per batch (the last batch may be smaller).
            block_size: tokens per row.
            max_batches: at most this many batches; None or 0 for the whole split.
        """
        self.check_length(block_size)
        n_windows = (self._len - 1) // block_size
        n = n_windows if not max_batches else min(n_windows, max_batches * batch_size)
        # Evenly spaced window indices on the block_size grid: distinct indices never overlap,
        # and spreading them samples the whole split rather than only its beginning.
        idx = np.unique(np.linspace(0, n_windows - 1, n).round().astype(np.int64))
        for b in range(0, len(idx), batch_size):
            rows = np.stack([self.window(int(i) * block_size, block_size + 1) for i in idx[b : b + batch_size]])
            buf = torch.from_numpy(rows)
            yield buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def find_tokenizer(data_dir: str | Path, tokenizer: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer for a shard directory, checked against the hash recorded in meta.json.

    Uses `tokenizer` when given, else `DIR/tokenizer/` or `DIR/../tokenizer/`; None if none is found.
    """
    d = Path(data_dir)
    meta = read_meta(d)
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        where = Path(tokenizer)
    else:
        for where in (d / "tokenizer", d.parent / "tokenizer"):
            if (where / "tokenizer.json").is_file():
                tok = Tokenizer.load(where)
                break
        else:
            return None
    check_tokenizer(meta, tok, where=str(where), data_dir=str(d))
    return tok


def check_tokenizer(meta: dict, tokenizer: Tokenizer, where: str = "the tokenizer", data_dir: str = "the data") -> None:
    """Refuse a tokenizer other than the one the shards were written with."""
    want = meta.get("tokenizer_hash")
    if want and tokenizer.hash() != want:
        raise HainaError(f"tokenizer {where} (hash {tokenizer.hash()}) is not the one {data_dir} was tokenized with "
                         f"(hash {want}); point data.tokenizer at the right one or re-tokenize")


__all__ = ["FORMAT", "TokenShards", "check_tokenizer", "find_tokenizer", "read_meta"]
