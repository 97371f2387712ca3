"""`haina.core.output`: the rules every command's --out follows, checked on the helper itself."""

import json
import os
from pathlib import Path

import pytest

from haina.core.errors import HainaError
from haina.core.output import (
    MANIFEST,
    check_output,
    claim_output,
    is_output_of,
    output_dir,
    partial_dir,
    read_manifest,
    swap_in,
    write_manifest,
)


def tree(root) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under `root`, by relative path."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = Path(dirpath, f)
            out[os.path.relpath(p, root)] = p.read_bytes()
    return out


def stranger(path):
    (path / "sub" / "deeper").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me")
    (path / "sub" / "deeper" / "data.bin").write_bytes(bytes(range(256)))
    return path


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path, "data prepare", {"extra": 1})
    m = read_manifest(tmp_path)
    assert m["command"] == "data prepare" and m["extra"] == 1 and m["haina_version"] and m["created"]
    assert is_output_of(tmp_path, "data prepare") and not is_output_of(tmp_path, "export hf")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    (tmp_path / MANIFEST).write_text("{broken")
    assert read_manifest(tmp_path) is None  # an unreadable manifest marks nothing as ours
    (tmp_path / MANIFEST).write_text(json.dumps({"no": "command"}))
    assert read_manifest(tmp_path) is None


def test_check_output_rules(tmp_path):
    assert check_output(tmp_path / "new", "x") is False  # missing: created
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "x") is False  # empty: used
    ours = tmp_path / "ours"
    ours.mkdir()
    write_manifest(ours, "x")
    assert check_output(ours, "x") is True  # the command's own earlier output: replaced
    with pytest.raises(HainaError, match="output of 'haina x'.*--overwrite"):
        check_output(ours, "y")  # another command's output
    s = stranger(tmp_path / "stranger")
    with pytest.raises(HainaError, match="not a haina output.*--overwrite"):
        check_output(s, "x")
    assert check_output(s, "x", overwrite=True) is True
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(HainaError, match="is a file"):
            check_output(tmp_path / "file", "x", overwrite=overwrite)


def test_inputs_are_never_replaced(tmp_path):
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    (raw / "train" / "a.jsonl").write_text("{}\n")
    write_manifest(raw, "x")  # even a directory that looks like our own output
    for overwrite in (False, True):
        with pytest.raises(HainaError, match="is the input"):
            check_output(raw, "x", inputs=[raw], overwrite=overwrite)
        with pytest.raises(HainaError, match="contains the input"):
            check_output(raw, "x", inputs=[raw / "train"], overwrite=overwrite)
        with pytest.raises(HainaError, match="contains the input"):  # a glob stands for what it matches
            check_output(raw, "x", inputs=[str(raw / "train" / "*.jsonl")], overwrite=overwrite)
    # Inside an input: a new or own output is fine (`--input corpus --out corpus/prepared`)...
    assert check_output(raw / "train" / "out", "x", inputs=[raw]) is False
    # ...but not replacing part of the input, even with --overwrite.
    with pytest.raises(HainaError, match="lies inside the input"):
        check_output(raw / "train", "x", inputs=[raw], overwrite=True)


def test_output_dir_swaps_in_and_replaces_its_own(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "x") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.haina-new-")
        (tmp / "a.txt").write_text("1")
    assert is_output_of(out, "x") and (out / "a.txt").read_text() == "1"
    (out / "stale.txt").write_text("old")
    with output_dir(out, "x") as tmp:
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "a.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside


def test_output_dir_failure_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "x") as tmp:
        (tmp / "a.txt").write_text("1")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), output_dir(out, "x") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert tree(tmp_path) == before


def test_output_dir_checks_again_before_the_swap(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HainaError, match="--overwrite"), output_dir(out, "x") as tmp:
        (tmp / "a.txt").write_text("1")
        stranger(out)  # someone created it while the command ran
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refused_output_dir_writes_nothing(tmp_path):
    s = stranger(tmp_path / "s")
    before = tree(tmp_path)
    with pytest.raises(HainaError), output_dir(s, "x"):
        pytest.fail("the body must not run")
    assert tree(tmp_path) == before


def test_swap_in_restores_the_old_output_when_the_rename_fails(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "new"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "a.txt").write_text(text)
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        swap_in(new, out, True)
    assert (out / "a.txt").read_text() == "old" and (new / "a.txt").read_text() == "new"


def test_claim_output(tmp_path):
    run = claim_output(tmp_path / "run", "x")
    assert is_output_of(run, "x")
    (run / "ckpt").write_text("1")
    run = claim_output(tmp_path / "run", "x")  # an earlier run of the same command starts over
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    s = stranger(tmp_path / "s")
    before = tree(s)
    with pytest.raises(HainaError, match="--overwrite"):
        claim_output(s, "x")
    assert tree(s) == before


def test_partial_dir(tmp_path):
    out = tmp_path / "out"
    state = partial_dir(out, "x", keep=False)
    assert state == tmp_path / ".out.haina-partial" and is_output_of(state, "x") and not out.exists()
    (state / "done").write_text("1")
    assert (partial_dir(out, "x", keep=True) / "done").is_file()  # --resume keeps the work
    assert not (partial_dir(out, "x", keep=False) / "done").exists()  # a fresh run starts over
    # A directory of that name that haina did not make is never touched.
    (tmp_path / ".other.haina-partial").mkdir()
    (tmp_path / ".other.haina-partial" / "mine.txt").write_text("keep")
    for keep in (False, True):
        with pytest.raises(HainaError, match="not made by"):
            partial_dir(tmp_path / "other", "x", keep=keep)
    assert (tmp_path / ".other.haina-partial" / "mine.txt").read_text() == "keep"


def test_output_dir_gets_the_mode_a_plain_mkdir_would(tmp_path):
    # mkdtemp makes 0700 directories: a data or tokenizer directory must stay readable as a plain mkdir makes it.
    (tmp_path / "plain").mkdir()
    with output_dir(tmp_path / "out", "x") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 != 0o700


@pytest.mark.parametrize("name", [".", "..", "/"])
def test_an_out_without_a_name_of_its_own_is_refused(tmp_path, monkeypatch, name):
    # "--out ." has no name to build beside: the new directory would be made inside the output itself.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = tree(tmp_path)
    with pytest.raises(HainaError, match="name"), output_dir(name, "x", overwrite=True):
        pytest.fail("the body must not run")
    assert tree(tmp_path) == before


def test_atomic_dir_gets_the_mode_a_plain_mkdir_would(tmp_path):
    from haina.core.io import atomic_dir

    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 != 0o700
