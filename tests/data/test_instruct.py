"""`haina data instruct --from-stdlib`: question → answer pairs from the docstrings that ship with Python."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from haina.core.errors import HainaError
from haina.data.instruct import (
    FIELDS,
    MAX_ANSWER_CHARS,
    instruct_command,
    signature_answer,
    split_of,
    summarize,
)

FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "report.json")


def _haina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina.cli", *args], check=False, capture_output=True, text=True,
                          timeout=120)


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instruct") / "qa"
    r = _haina("data", "instruct", "--from-stdlib", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "question-answer pairs" in r.stderr and "test" in r.stderr  # the one-line summary
    return out


def test_files_records_and_report(built):
    assert all((built / f).is_file() for f in FILES)
    report = json.loads((built / "report.json").read_text(encoding="utf-8"))
    splits = {s: _records(built, s) for s in ("train", "val", "test")}
    total = sum(len(rows) for rows in splits.values())
    assert report["pairs"] == total > 3000
    for split, rows in splits.items():
        assert report["splits"][split]["pairs"] == len(rows) > 0
        assert report["splits"][split]["modules"] == sorted({r["module"] for r in rows})
        assert 0.6 < len(rows) / total < 0.9 if split == "train" else 0.03 < len(rows) / total < 0.2
    rows = [r for rs in splits.values() for r in rs]
    assert all(tuple(r) == FIELDS and all(isinstance(r[k], str) and r[k] for k in FIELDS) for r in rows)
    assert all(r["name"] == r["module"] or r["name"].startswith(r["module"] + ".") for r in rows)
    # Summary cuts are sane: nothing empty or too short, nothing over the limit, whitespace collapsed.
    assert all(len(r["response"]) <= MAX_ANSWER_CHARS for r in rows)
    summaries = [r["response"] for r in rows if not r["response"].startswith(r["name"] + "(")]
    assert len(summaries) > total / 2
    assert all(len(s) >= 20 and "\n" not in s and "  " not in s for s in summaries)
    # Questions are unique; private names, dunders, tests and the GUI are left out.
    assert len({r["prompt"] for r in rows}) == len(rows)
    names = [r["name"].split(".") for r in rows]
    assert not any(p.startswith("_") for parts in names for p in parts)
    assert not any(p in ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip")
                   for r in rows for p in r["module"].split("."))
    assert report["skipped"]["dunder"] > 0 and report["skipped"]["private_name"] > 0
    assert report["skipped"]["no_docstring"] > 0
    assert sum(report["questions"].values()) == total


def test_splits_share_no_module(built):
    modules = {s: {r["module"] for r in _records(built, s)} for s in ("train", "val", "test")}
    assert not modules["train"] & modules["val"]
    assert not modules["train"] & modules["test"]
    assert not modules["val"] & modules["test"]


def test_known_pairs(built):
    rows = [r for s in ("train", "val", "test") for r in _records(built, s)]
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    dumps = {r["response"]: r for r in by_name["json.dumps"]}
    assert "Serialize ``obj`` to a JSON formatted ``str``." in dumps
    assert "json.dumps" in dumps["Serialize ``obj`` to a JSON formatted ``str``."]["prompt"]
    assert any(a.startswith("json.dumps(obj, *, skipkeys=False, ensure_ascii=True") for a in dumps)
    dedent = [r["response"] for r in by_name["textwrap.dedent"]]
    assert "Remove any common leading whitespace from every line in `text`." in dedent
    assert "textwrap.dedent(text)" in dedent
    decoder = [r for r in by_name["json.decoder.JSONDecoder"] if not r["response"].startswith("json.")]
    assert decoder and decoder[0]["response"].startswith("Simple JSON")
    assert by_name["json"][0]["response"].startswith("JSON (JavaScript Object Notation)")
    assert by_name["json"][0]["module"] == "json" and "json module" in by_name["json"][0]["prompt"]


def test_same_seed_same_files_other_seed_other_split(built, tmp_path):
    instruct_command(str(tmp_path / "again"), from_stdlib=True, seed=0)
    for f in FILES:
        assert (tmp_path / "again" / f).read_bytes() == (built / f).read_bytes(), f
    instruct_command(str(tmp_path / "seed1"), from_stdlib=True, seed=1)
    assert (tmp_path / "seed1" / "test.jsonl").read_bytes() != (built / "test.jsonl").read_bytes()


def test_max_pairs_samples_every_split(tmp_path):
    instruct_command(str(tmp_path / "small"), from_stdlib=True, max_pairs=400)
    report = json.loads((tmp_path / "small" / "report.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 400 and report["skipped"]["max_pairs"] > 1000
    assert all(report["splits"][s]["pairs"] > 0 for s in ("train", "val", "test"))


def test_output_rules_and_errors(tmp_path):
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me", encoding="utf-8")
    r = _haina("data", "instruct", "--from-stdlib", "--out", str(stranger))
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (stranger / "notes.txt").read_text(encoding="utf-8") == "keep me"
    instruct_command(str(stranger), from_stdlib=True, max_pairs=50, overwrite=True)
    assert not (stranger / "notes.txt").exists() and (stranger / "train.jsonl").is_file()
    instruct_command(str(stranger), from_stdlib=True, max_pairs=60)  # its own earlier output: replaced
    assert json.loads((stranger / "report.json").read_text(encoding="utf-8"))["pairs"] == 60

    r = _haina("data", "instruct", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--from-stdlib" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(HainaError, match="max-pairs"):
        instruct_command(str(tmp_path / "y"), from_stdlib=True, max_pairs=0)


@pytest.mark.parametrize(("doc", "answer"), [
    ("Serialize ``obj`` to a JSON\n    formatted ``str``.\n\nIf ``skipkeys`` is true ...",
     "Serialize ``obj`` to a JSON formatted ``str``."),
    ("heappush(heap, item) -> None\n\nPush item onto heap, maintaining the heap invariant.",
     "Push item onto heap, maintaining the heap invariant."),
    ("distutils.core\n\nThe only module that needs to be imported to use the Distutils.",
     "The only module that needs to be imported to use the Distutils."),
    ("Wrapper around getopt. It provides the following features:\n  * short and long options\n  * help",
     "Wrapper around getopt."),
    ("Process a NEWGROUPS command.  Arguments:\n- date: a date", "Process a NEWGROUPS command."),
    ("Return the thing, e.g. a list. " + "More words follow here. " * 20, None),
])
def test_summarize_cuts(doc, answer):
    got, _ = summarize(doc)
    if answer is None:  # a long paragraph: cut at the last sentence end within the limit
        assert got is not None and len(got) <= MAX_ANSWER_CHARS and got.endswith("here.")
        assert got.startswith("Return the thing, e.g. a list. More")  # "e.g." is no sentence end
    else:
        assert got == answer


@pytest.mark.parametrize(("doc", "reason"), [
    ("", "no_docstring"),
    ("Return self==value.", "auto_generated"),
    ("Helper for pickle.", "auto_generated"),
    ("Do it.", "too_short"),
    (">>> f(1)\n2", "example_only"),
    ("An NNTP client class based on:\n- RFC 977", "unfinished"),
    ("word " * 80, "too_long"),
])
def test_summarize_rejects(doc, reason):
    assert summarize(doc) == (None, reason)


def test_signature_answer_elides_what_does_not_fit():
    pieces = [f"argument_{i}=None" for i in range(40)]
    answer = signature_answer("mod.func", pieces)
    assert len(answer) <= MAX_ANSWER_CHARS and answer.startswith("mod.func(argument_0=None, ")
    assert answer.endswith(", ...)")
    assert signature_answer("mod.f", ["a", "*", "b=1"]) == "mod.f(a, *, b=1)"


def test_split_of_is_stable_and_about_80_10_10():
    names = [f"pkg.mod{i}" for i in range(5000)]
    splits = [split_of(n, seed=3) for n in names]
    assert splits == [split_of(n, seed=3) for n in names]
    for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(splits.count(split) / len(names) - share) < 0.03
    assert splits != [split_of(n, seed=4) for n in names]
