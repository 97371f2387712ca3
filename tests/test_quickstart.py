"""`haina quickstart` end to end through a subprocess: the main job must run on a fresh machine."""

import json
import subprocess
import sys
import time

import pytest

from haina.model.checkpoint import load_model


def run_quickstart(out, minutes: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "haina.cli", "quickstart", "--out", str(out), "--max-minutes",
                        str(minutes)], capture_output=True, text=True, timeout=60 * minutes + 120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, time.perf_counter() - t0


def check_run(out, r: subprocess.CompletedProcess) -> dict:
    report = json.loads((out / "report.json").read_text())
    for key in ("steps", "train_tokens", "val_loss", "val_ppl", "best_val_loss", "tokens_per_sec", "mfu",
                "wall_seconds", "params", "vocab_size"):
        assert report[key] is not None, key
    qs = report["quickstart"]
    prep = qs["prepare"]
    assert prep["in"] == prep["kept"] + sum(prep["by_reason"].values())  # nothing lost silently
    assert len(qs["samples"]) == 3 and all(s["completion"] for s in qs["samples"])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "prepared" / "report.md").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    model, tok = load_model(out)
    assert tok is not None and model.cfg.vocab_size == tok.vocab_size
    assert "Go on with:" in r.stdout and "haina generate --checkpoint" in r.stdout
    assert report["val_loss"] < report["initial_val_loss"]
    return report


def test_quickstart_short_budget(tmp_path):
    """A 1.5-minute budget: every stage runs and the budget holds (the full run is the slow test below)."""
    out = tmp_path / "qs"
    r, wall = run_quickstart(out, 1.5)
    report = check_run(out, r)
    assert wall < 1.5 * 60 + 30  # the budget, plus interpreter start-up and slack for a loaded machine
    assert report["val_loss"] < report["initial_val_loss"] - 1.0


@pytest.mark.slow
def test_quickstart_default_budget(tmp_path):
    """The issue's bar: ≤ 6 minutes wall on 2 cores, a real fall in validation loss."""
    out = tmp_path / "qs"
    r, wall = run_quickstart(out, 5)
    report = check_run(out, r)
    assert wall <= 6 * 60
    assert report["val_loss"] < report["initial_val_loss"] - 3.0
