"""The report every eval kind writes, `haina eval compare`, and the noise and fairness helpers."""

import json

import pytest

from haina.cli import main
from haina.core.errors import HainaError
from haina.eval.groups import largest_gaps, per_group
from haina.eval.noise import noise_grid, perturb
from haina.eval.report import Report, data_sha256, eval_output, write_report


def _write(out, kind, metrics, data=None, **kw):
    with eval_output(out, kind, inputs=data or []) as tmp:
        return write_report(tmp, Report(kind=kind, metrics=metrics, data=data or [], checkpoint="ckpt", **kw))


def test_report_has_metrics_on_top_and_provenance(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello")
    obj = _write(tmp_path / "r", "lm", {"ppl": 12.5, "loss": 2.5, "nan": float("nan")}, data=[str(data)],
                 sections=[("Windows", "scored 3 windows")])
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk == obj
    assert obj["ppl"] == 12.5 and obj["nan"] is None  # JSON has no NaN
    assert obj["kind"] == "lm" and obj["haina_version"] and obj["data_sha256"] == data_sha256([data])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| ppl | 12.5 |" in md and "## Windows" in md


def test_data_hash_follows_content_not_location(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text("same")
    assert data_sha256([tmp_path / "a"]) == data_sha256([tmp_path / "b"])
    (tmp_path / "b" / "x.txt").write_text("other")
    assert data_sha256([tmp_path / "a"]) != data_sha256([tmp_path / "b"])


def test_failed_evaluation_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), eval_output(tmp_path / "r", "lm") as tmp:
        (tmp / "report.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "r").exists()


def test_eval_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(HainaError, match="--overwrite"):
        _write(tmp_path / "mine", "lm", {"ppl": 1.0})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_compare_lines_reports_up(tmp_path, capsys):
    _write(tmp_path / "before", "lm", {"ppl": 20.0, "loss": 3.0})
    _write(tmp_path / "after", "lm", {"ppl": 10.0, "loss": 2.3, "tokens": 100})
    assert main(["eval", "compare", str(tmp_path / "before"), str(tmp_path / "after")]) == 0
    out = capsys.readouterr().out
    assert "| metric | before | after |" in out
    assert "| ppl | 20 | 10 |" in out and "| tokens | – | 100 |" in out
    assert (tmp_path / "compare.md").read_text().startswith("| metric | before | after |")
    # A file it did not write is never replaced.
    (tmp_path / "notes.md").write_text("mine")
    assert main(["eval", "compare", str(tmp_path / "before"), "--out", str(tmp_path / "notes.md")]) == 2
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_compare_rejects_what_is_not_a_report(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["eval", "compare", str(tmp_path / "x")]) == 2
    assert "has no report.json" in capsys.readouterr().err


def test_noise_is_seeded_and_rate_zero_is_identity():
    text = "The quick brown fox jumps over the lazy dog, again and again."
    assert perturb(text, "char", 0.0) == text
    assert perturb(text, "char", 0.3, seed=1) == perturb(text, "char", 0.3, seed=1)
    assert perturb(text, "char", 0.3, seed=1) != perturb(text, "char", 0.3, seed=2)
    words = perturb(text, "word", 0.5, seed=0).split()
    assert set(words) <= set(text.split())
    assert noise_grid(["char,word"], [0.0, 0.1])[0] == ("clean", 0.0)
    with pytest.raises(HainaError):
        noise_grid(["typo"], None)
    with pytest.raises(HainaError):
        noise_grid(None, [0.1])


def test_group_gaps():
    groups = ["a", "a", "b", "b"]
    correct = [1, 1, 1, 0]
    by = per_group(groups, lambda ix: {"accuracy": sum(correct[i] for i in ix) / len(ix)})
    assert by == {"a": {"n": 2, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}}
    assert largest_gaps(by)["accuracy"] == {"gap": 0.5, "max_group": "a", "min_group": "b"}
