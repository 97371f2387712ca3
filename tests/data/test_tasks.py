"""`haina data tasks --from-stdlib`: docstring → area of the standard library, split by module, deterministic."""

import json
from collections import Counter
from pathlib import Path

import pytest

from haina.cli import COMMANDS, main
from haina.data import tasks as tasks_module
from haina.data.tasks import AREAS, MODULE_AREAS, area_of, split_modules

SPLITS = ("train", "val", "test")
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "report.json", "report.md")


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    # The lead registers the command in haina/cli.py; until then the test adds it for the duration.
    monkeypatch.setitem(COMMANDS, ("data", "tasks"), COMMANDS.get(("data", "tasks"),
                                                                  "haina.data.tasks:tasks_command"))


def _records(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "areas"
    COMMANDS.setdefault(("data", "tasks"), "haina.data.tasks:tasks_command")
    assert main(["data", "tasks", "--from-stdlib", "--out", str(out)]) == 0
    return out


def test_classes_splits_and_report(built):
    assert all((built / f).is_file() for f in FILES)
    splits = {s: _records(built, s) for s in SPLITS}
    rows = [r for s in SPLITS for r in splits[s]]
    assert all(list(r) == ["text", "label", "module", "name"] and all(isinstance(r[k], str) and r[k] for k in r)
               for r in rows)
    labels = Counter(r["label"] for r in rows)
    assert len(labels) >= 8 and set(labels) <= set(AREAS)
    assert all(n >= 50 for n in labels.values())  # every class has enough examples to learn and measure
    assert max(labels.values()) / min(labels.values()) > 3  # the natural imbalance is kept, not flattened
    for split in SPLITS:
        assert splits[split], split
        assert len({r["label"] for r in splits[split]}) >= 8, split
    # Grouped: no module in two splits; no text in two splits (or twice at all).
    modules = {s: {r["module"] for r in splits[s]} for s in SPLITS}
    assert not (modules["train"] & modules["val"] or modules["train"] & modules["test"]
                or modules["val"] & modules["test"])
    assert len({r["text"] for r in rows}) == len(rows)
    # Every label is its module's area, and the report counts what the files hold.
    assert all(area_of(r["module"]) == r["label"] for r in rows)
    report = json.loads((built / "report.json").read_text(encoding="utf-8"))
    assert report["examples"] == len(rows) and report["class_counts"] == dict(labels.most_common())
    for split in SPLITS:
        assert report["splits"][split]["examples"] == len(splits[split])
        assert report["splits"][split]["classes"] == dict(sorted(Counter(r["label"] for r in splits[split]).items()))
        assert 0.6 < len(splits[split]) / len(rows) < 0.9 if split == "train" else 0.04 < len(splits[split]) / len(
            rows) < 0.2
    md = (built / "report.md").read_text(encoding="utf-8")
    assert all(f"| {label} |" in md for label in labels)


def test_deterministic_with_the_seed(built, tmp_path):
    again = tmp_path / "again"
    assert main(["data", "tasks", "--from-stdlib", "--out", str(again)]) == 0
    for f in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (again / f).read_bytes() == (built / f).read_bytes(), f
    other = tmp_path / "seed1"
    assert main(["data", "tasks", "--from-stdlib", "--out", str(other), "--seed", "1"]) == 0
    assert {r["module"] for r in _records(other, "test")} != {r["module"] for r in _records(built, "test")}


def test_split_is_stratified_and_grouped():
    # Three labels, modules of uneven sizes: each label's modules are dealt so each split gets near its share.
    examples = [{"module": f"{label}{m}", "label": label} for label in "abc" for m in range(12)
                for _ in range(1 + m % 4)]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    assign = split_modules(examples, fractions, seed=0)
    assert assign == split_modules(examples, fractions, seed=0)
    for label in "abc":
        sizes = Counter(assign[e["module"]] for e in examples if e["label"] == label)
        assert set(sizes) == set(SPLITS), label  # every label in every split
        assert sizes["train"] > sizes["val"] and sizes["train"] > sizes["test"]


def test_the_module_table():
    # Each module is in one area only (a module named twice would silently take the later area).
    named = [m for names in tasks_module._TABLE.values() for m in names.split()]
    assert len(named) == len(set(named)) == len(MODULE_AREAS)
    assert set(MODULE_AREAS.values()) == set(AREAS)
    assert area_of("importlib.metadata._meta") == "packaging"  # the longest named prefix wins
    assert area_of("importlib.util") == "language"
    assert area_of("xml.dom.minidom") == "file-formats"
    assert area_of("no_such_module") is None


@pytest.mark.parametrize("args, start", [
    ([], "error: haina data tasks needs --from-stdlib"),
    (["--from-stdlib", "--val-fraction", "0.5", "--test-fraction", "0.5"], "error: --val-fraction and"),
    (["--from-stdlib", "--test-fraction", "-0.1"], "error: --val-fraction and"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, start):
    out = tmp_path / "out"
    assert main(["data", "tasks", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
    assert list(tmp_path.iterdir()) == []
