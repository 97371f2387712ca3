"""Atomic file output: write to a temporary name in the same directory, fsync, then rename.

A crash mid-write leaves the old file (or nothing), never a truncated one, because
`os.replace` is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from haina.core.errors import HainaError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600; give the file the mode a plain open() would
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            # Durable before visible: a power cut after the rename must not leave an empty file under the name.
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it: done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is fsynced and swapped in for `path`.

    The old directory (if any) is renamed away before the new one is renamed in and deleted only after, so
    a crash at any moment leaves a complete old or new copy on disk. Callers that replace a directory the
    user gave must check it first (`haina.core.output.check_output`); this helper does not.
    """
    from haina.core.output import fsync_tree, swap_in

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; give it the mode a plain mkdir would
        yield tmp
        fsync_tree(tmp)
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as YAML atomically."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike, hint: str = "", expect: type | None = None) -> Any:
    """The JSON value in `path`; a file that is not UTF-8 JSON (or not of type `expect`) is a one-line HainaError.

    Args:
        path: the file.
        hint: appended to the error after "; " (what the user can do: "re-create it with ...").
        expect: the type the top-level value must have (dict for an object), or None for any.
    """
    tail = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise HainaError(f"cannot read {path}: not valid JSON (line {e.lineno}: {e.msg}){tail}") from None
    except UnicodeDecodeError:
        raise HainaError(f"cannot read {path}: not UTF-8 text (is it a JSON file?){tail}") from None
    if expect is not None and not isinstance(data, expect):
        want = "a JSON object" if expect is dict else f"JSON {expect.__name__}"
        raise HainaError(f"cannot read {path}: expected {want}, got {type(data).__name__}{tail}")
    return data


def match_input(raw: str) -> list[Path]:
    """An input argument as paths: the file or directory itself if it exists, else its glob matches (sorted).

    Raises HainaError when nothing matches, so a typo is reported rather than read as an empty input.
    """
    path = Path(raw)
    if path.exists():
        return [path]
    matches = [Path(p) for p in sorted(glob.glob(raw, recursive=True))]
    if not matches:
        raise HainaError(f"input not found: {raw} (give files, directories or glob patterns)")
    return matches
