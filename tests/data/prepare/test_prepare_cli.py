"""`haina data prepare` and `haina data augment` through the command line."""

import json
import random
import subprocess
import sys

from haina.data.prepare.writers import read_jsonl_zst

WORDS = ["river", "mill", "town", "children", "ball", "water", "parents", "weather", "harvest", "baker", "bread", "evening", "lamps", "summer", "mayor", "letters", "villages", "travellers", "stories", "mountains", "north", "week", "morning", "autumn", "fields", "golden"]


def haina(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)


def test_cli_prepare_with_config_and_overrides(tmp_path):
    rng = random.Random(0)
    texts = ["The " + " ".join(rng.choice(WORDS) for _ in range(12)) + " and the end." for _ in range(20)]
    (tmp_path / "in.txt").write_text("\n".join(texts + texts[:3]) + "\n")
    (tmp_path / "cfg.yaml").write_text("filters: [gopher]\ngopher:\n  min_words: 50\n")
    r = haina("data", "prepare", "--input", tmp_path / "in.txt", "--out", tmp_path / "out", "--split-lines",
              "--config", tmp_path / "cfg.yaml", "--gopher.min_words=5", "--workers", "1", "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    assert "accounting: 23 in = 20 kept + 3 dropped (3 exact_duplicate)" in r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["gopher"]["min_words"] == 5 and report["config"]["filters"] == ["gopher"]
    assert report["splits"]["val"]["documents"] == 2


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = haina("data", "prepare", "--input", tmp_path / "empty.txt", "--out", tmp_path / "out", "--workers", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: the input holds no documents")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    r = haina("data", "prepare", "--input", tmp_path / "blank.jsonl", "--out", tmp_path / "out", "--workers", "1")
    assert r.returncode == 2 and "only empty documents" in r.stderr
    assert "Traceback" not in r.stderr
    r = haina("data", "prepare", "--input", tmp_path / "empty.txt", "--out", tmp_path / "out", "--filters", "goph")
    assert r.returncode == 2 and "unknown filter 'goph'" in r.stderr


def test_cli_augment_a_prepared_directory(tmp_path):
    rows = [{"text": f"the service was quick and the food was good number {i}", "label": "pos"} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = haina("data", "prepare", "--input", tmp_path / "in.jsonl", "--out", tmp_path / "prep", "--filters", "none",
              "--dedup", "none", "--workers", "1", "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    (tmp_path / "syn.txt").write_text("quick: fast, speedy\ngood = great\n")
    r = haina("data", "augment", "--input", tmp_path / "prep", "--out", tmp_path / "aug", "--synonyms",
              tmp_path / "syn.txt", "--seed", "3")
    assert r.returncode == 0, r.stderr
    train = list(read_jsonl_zst(tmp_path / "aug" / "train" / "part-00000.jsonl.zst"))
    originals = [x for x in train if not x["meta"].get("augmented")]
    augmented = [x for x in train if x["meta"].get("augmented")]
    assert len(originals) == 5 and 12 <= len(augmented) <= 15  # an augmentation that changes nothing is skipped
    assert {x["meta"]["method"] for x in augmented} == {"delete", "swap", "synonym"}
    assert all(x["label"] == "pos" and x["meta"]["parent"] in {o["id"] for o in originals} for x in augmented)
    assert any(("fast" in x["text"] or "speedy" in x["text"] or "great" in x["text"])
               for x in augmented if x["meta"]["method"] == "synonym")
    assert (tmp_path / "aug" / "val" / "part-00000.jsonl.zst").is_file()  # val copied, not augmented
    assert json.loads((tmp_path / "aug" / "augment_report.json").read_text())["augmented"] == len(augmented)
