"""Checksums of the files in a directory, written beside them and verified when they are read.

A checkpoint (or any directory haina writes as a unit) may hold `checksums.json`:

    {"format": "haina-checksums/1", "algorithm": "sha256",
     "files": {"model.safetensors": {"size": 104857600, "sha256": "…"}, "tokenizer/tokenizer.json": {…}, …}}

Why a sidecar file rather than the safetensors metadata: the metadata can only vouch for the tensors
of its own file, while a checkpoint is several files (config.yaml, the tokenizer, a training run's
trainer_state.pt) that are as easily truncated or half-copied, and a metadata checksum cannot cover
the header that stores it. One JSON file covers them all and is readable with `sha256sum`.

Sizes are checked before any hashing, so a truncated file is reported at once. sha256 runs at about
1.8 GB/s on a current x86 core (SHA extensions), far below the cost of building and loading the
model it guards; `load_model` hashes the weights in a thread while it builds the model. A digest
computed in this process is remembered by the file's identity (device, inode, size, modification
and change times) once the file has settled, so a checkpoint verified once (serve checks before
it binds its port, then loads in the background) is read only once.

Files not listed (a manifest added afterwards, a user's notes) are ignored; a directory without
`checksums.json` (older checkpoints, Hugging Face directories) is simply not verified.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from haina.core.errors import HainaError
from haina.core.io import read_json, write_json

CHECKSUMS = "checksums.json"
FORMAT = "haina-checksums/1"
# Written after the checksums, or changed by every command that touches the directory: never listed.
UNLISTED = frozenset({CHECKSUMS, "haina-manifest.json"})

_digests: dict[tuple[int, int, int, int, int], str] = {}  # file identity -> sha256 computed in this process
_SETTLED_NS = 3_000_000_000  # a file unchanged for this long has a timestamp that any later change would move


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (hex), remembered for the file's identity within this process."""
    st = os.stat(path)
    key = _identity(st)
    if key in _digests:
        return _digests[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()  # releases the GIL while hashing
    # Remember it only for a file last changed well before it was read, and unchanged while it was: timestamps are
    # as coarse as a clock tick (seconds on some filesystems), so a rewrite within the same tick as a fresh write
    # would keep the identity and reuse a stale digest. A file written a moment ago is hashed again next time.
    if _identity(os.stat(path)) == key and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
        _digests[key] = digest
    return digest


def _listed_files(root: Path) -> list[Path]:
    """Every regular file under `root`, except the unlisted names and hidden files (temporaries)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or (p.parent == root and name in UNLISTED) or not p.is_file():
                continue
            files.append(p)
    return files


def write_checksums(directory: str | os.PathLike) -> dict[str, dict]:
    """Record the size and sha256 of every file under `directory` in its `checksums.json`; returns the entries.

    Call it after the last file is written (and again if one is added, as a training checkpoint adds its
    trainer state): the file lists exactly what exists at that moment.
    """
    root = Path(directory)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _listed_files(root)}
    write_json(root / CHECKSUMS, {"format": FORMAT, "algorithm": "sha256", "files": files})
    return files


def read_checksums(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The entries of `directory/checksums.json`, or None when there is none; HainaError if it is unreadable."""
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        return None
    data = read_json(path, "the checkpoint is damaged")
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict)
            or not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                       for e in files.values())):
        raise HainaError(f"{path} is not a haina checksum list ({FORMAT}); the checkpoint is damaged")
    return files


def verify_checksums(directory: str | os.PathLike, only: tuple[str, ...] | None = None,
                     sizes_only: tuple[str, ...] = ()) -> bool:
    """Check the files listed in `directory/checksums.json`; False if there is no such file.

    Args:
        directory: the directory holding checksums.json.
        only: check just these listed names (relative paths); None checks all.
        sizes_only: of those, names whose size is checked but whose hash is left to a later call (a caller
            hashes the weights in a thread while it builds the model).

    Raises:
        HainaError: naming the first file that is missing, has another size, or has another sha256.
    """
    root = Path(directory)
    files = read_checksums(root)
    if files is None:
        return False
    names = [n for n in files if only is None or n in only]
    for name in names:  # sizes first: a truncated file is reported without hashing the others
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise HainaError(f"{root / CHECKSUMS} lists a file outside the directory ({name}); the checkpoint is "
                             "damaged")
        path = root / rel
        if not path.is_file():
            what = "is not a file" if path.exists() else "is missing"
            raise HainaError(f"{path} {what} (listed in {CHECKSUMS}); the checkpoint is incomplete")
        size, want = path.stat().st_size, files[name]["size"]
        if size != want:
            how = "truncated" if size < want else "longer than written"
            raise HainaError(f"{path} is {how} ({size:,} bytes, {CHECKSUMS} records {want:,}); the file is damaged, "
                             "copy the checkpoint again")
    for name in names:
        path = root / name
        if name not in sizes_only and file_sha256(path) != files[name]["sha256"]:
            raise HainaError(f"{path} does not match its sha256 in {CHECKSUMS}; the file is damaged, copy the "
                             "checkpoint again")
    return True


__all__ = ["CHECKSUMS", "file_sha256", "read_checksums", "verify_checksums", "write_checksums"]
