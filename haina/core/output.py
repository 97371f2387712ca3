"""Command outputs that never destroy what haina did not make.

Every directory a haina command writes carries a manifest, `haina-manifest.json`, written last:
which command made it, with which haina version, when. The rules, for every command:

- A missing or empty `--out` is simply created.
- An existing `--out` whose manifest names the same command is that command's earlier output and
  is replaced whole.
- Anything else that exists (a stranger's directory, another command's output, a file) is a
  one-line error naming `--overwrite`.
- Even `--overwrite` refuses an `--out` that is, contains, or lies inside one of the command's
  inputs; and no output, ours or not, may be or contain an input (replacing it would delete it).
- Replacing is a swap: the new output is built beside the old (`.NAME.haina-new-*`), files and
  directories are fsynced, the old one is renamed away, the new one renamed in, and only then is
  the old one deleted. A crash at any moment leaves the old or the new output complete on disk.

Use `output_dir` for outputs written in one go, `claim_output` + `write_manifest` for outputs that
grow in place (a training run), and `check_output` alone to validate options up front. A command
that resumes keeps its working state in `partial_dir` (beside `--out`, never inside it) and
`publish`es the finished output from there.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.core.io import _UMASK

MANIFEST = "haina-manifest.json"


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of output directory `path`, or None if it has none (or an unreadable one)."""
    f = Path(path) / MANIFEST
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def write_manifest(path: str | os.PathLike, command: str, extra: dict[str, Any] | None = None) -> None:
    """Mark directory `path` as the output of `command` (fsynced, atomically: written last, read first)."""
    from haina import __version__

    path = Path(path)
    body = {"command": command, "haina_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
    tmp = path / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(body, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    fsync_dir(path)


def is_output_of(path: str | os.PathLike, command: str) -> bool:
    """Whether directory `path` carries a manifest saying `command` made it."""
    m = read_manifest(path)
    return m is not None and m["command"] == command


def _input_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The inputs as paths; a pattern that names no existing path stands for its glob matches.

    Without the expansion `--input 'raw/*.jsonl' --out raw` would look unrelated to its input.
    """
    paths = []
    for raw in inputs:
        if raw is None:
            continue
        path = Path(raw)
        if not path.exists() and any(c in str(raw) for c in "*?["):
            paths += [Path(m) for m in sorted(glob.glob(str(raw), recursive=True))]
        else:
            paths.append(path)
    return paths


def _overlap(out: Path, inputs: Iterable[str | os.PathLike]) -> tuple[str, Path] | None:
    """How `out` overlaps an input: ('is'|'contains'|'inside', input), or None."""
    dst = out.resolve()
    for path in _input_paths(inputs):
        src = path.resolve()
        if dst == src:
            return "is", path
        if dst in src.parents:
            return "contains", path
        if src in dst.parents:
            return "inside", path
    return None


def check_output(out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False) -> bool:
    """Raise HainaError unless `command` may write directory `out`; return True if `out` exists to be replaced.

    Args:
        out: the output directory.
        command: the command's name as the manifest records it ("data prepare", "pretrain", ...).
        inputs: the command's input files and directories (never replaced, even with `overwrite`).
        overwrite: replace an existing directory that is not this command's output.
    """
    out = Path(out)
    inputs = list(inputs)
    if out.name in ("", ".."):  # ".", "..", "/": the new output is built beside `out`, under a name made from its own
        raise HainaError(f"--out {out} names no directory of its own; give the directory by its name (a path ending "
                         "in it)")
    if out.exists() and not out.is_dir():
        raise HainaError(f"--out {out} is a file, not a directory; choose another --out")
    overlap = _overlap(out, inputs)
    if overlap and overlap[0] in ("is", "contains"):
        raise HainaError(f"--out {out} {overlap[0]} the input {overlap[1]}; writing it would delete the input, "
                         "choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    if is_output_of(out, command):
        return True
    if not overwrite:
        m = read_manifest(out)
        what = f"the output of 'haina {m['command']}'" if m else "not a haina output"
        raise HainaError(f"--out {out} exists and is {what}; choose another --out, or pass --overwrite to "
                         f"replace it with this 'haina {command}' output")
    if overlap:  # inside an input: --overwrite would delete part of it
        raise HainaError(f"--out {out} lies inside the input {overlap[1]}; even --overwrite does not replace it, "
                         "choose another --out")
    return True


def claim_output(out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
                 overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """For outputs that grow in place: check `out`, move an earlier one away, create it with its manifest.

    The earlier output is renamed aside first and deleted only after the new directory exists, so an
    interruption leaves one of them intact.
    """
    out = Path(out)
    replacing = check_output(out, command, inputs=inputs, overwrite=overwrite)
    old = None
    if replacing:
        old = _aside(out, "old")
        os.replace(out, old)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, command, extra)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, command: str, *, inputs: Iterable[str | os.PathLike] = (),
               overwrite: bool = False, extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a fresh directory beside `out`; on success it gets the manifest and is swapped in for `out`.

    The check runs before anything is written, and again before the swap (the world may have changed
    during a long command). On any error the new directory is deleted and `out` is untouched.
    """
    out = Path(out)
    inputs = list(inputs)
    check_output(out, command, inputs=inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.haina-new-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; give it the mode a plain mkdir would
        yield tmp
        publish(tmp, out, command, inputs=inputs, overwrite=overwrite, extra=extra)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(new: str | os.PathLike, out: str | os.PathLike, command: str, *,
            inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
            extra: dict[str, Any] | None = None) -> None:
    """Mark the finished directory `new` as `command`'s output and swap it in for `out`.

    The check runs again first: during a long command someone may have put something at `out`.
    """
    new, out = Path(new), Path(out)
    write_manifest(new, command, extra)
    fsync_tree(new)
    replacing = check_output(out, command, inputs=inputs, overwrite=overwrite)
    swap_in(new, out, replacing)


def partial_dir(out: str | os.PathLike, command: str, *, keep: bool) -> Path:
    """A working directory beside `out` (`.NAME.haina-partial`) that survives a crash, for `--resume`.

    With `keep`, an earlier one is reused as it is; without, it is emptied first. Either way it is
    marked with a manifest, and one without the mark (someone else's directory of that name) is
    never touched: that is an error.
    """
    out = Path(out)
    path = out.with_name(f".{out.name}.haina-partial")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink() or (any(path.iterdir()) and not is_output_of(path, command)):
            raise HainaError(f"{path} exists and was not made by 'haina {command}'; move it away and run again")
        if not keep:
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_output_of(path, command):
        write_manifest(path, command, {"partial_for": str(out)})
    return path


def swap_in(new: Path, out: Path, replacing: bool | None = None) -> None:
    """Rename `new` onto `out`: the old `out` (if any) is renamed away first and deleted last."""
    if replacing is None:
        replacing = out.exists()
    if not replacing:
        if out.is_dir():  # an empty directory: rename cannot replace it on every platform
            out.rmdir()
        os.replace(new, out)
        fsync_dir(out.parent)
        return
    old = _aside(out, "old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)  # the old output goes back under its name; a crash here leaves it beside, whole
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _aside(out: Path, what: str) -> Path:
    """A fresh name beside `out` for a directory on its way in or out."""
    return out.with_name(f".{out.name}.haina-{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory entries of `path` durable (renames and new files in it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; nothing more can be done there
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Make the contents of file `path` durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (bottom-up), so a rename of `root` publishes durable data."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


__all__ = ["MANIFEST", "check_output", "claim_output", "fsync_dir", "fsync_file", "fsync_tree", "is_output_of",
           "output_dir", "partial_dir", "publish", "read_manifest", "swap_in", "write_manifest"]
