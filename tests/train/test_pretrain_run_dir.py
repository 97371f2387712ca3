"""`haina pretrain` and an existing --out: --resume continues, --overwrite starts over, neither is one line.

Also SIGTERM through a real `haina pretrain` process: it saves at the next step, exits 0, and --resume
ends on the same bytes as a run that was never interrupted.
"""

import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import text_dataset

from haina.core.errors import HainaError
from haina.core.output import MANIFEST, read_manifest, write_manifest
from haina.train import checkpoint as ckpt
from haina.train.pretrain import pretrain

RECIPE = {
    "model": {"preset": "tiny", "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
              "dropout": 0.1},
    "data": {"dir": "unused"},
    "train": {"batch_size": 4, "max_steps": 2, "warmup_steps": 2, "eval_every": 1000, "eval_batches": 2,
              "log_every": 1, "save_every": 0, "device": "cpu", "tensorboard": False},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    data, _ = text_dataset(root)
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return root, data, recipe


def snapshot(path):
    """Every file under `path` with its bytes (or the file itself)."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def haina(*args):
    return subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def test_existing_run_needs_resume_or_overwrite(setup, capsys):
    root, data, recipe = setup
    run = root / "run"
    pretrain(str(recipe), data=str(data), out=str(run))
    assert read_manifest(run)["command"] == "pretrain" and ckpt.read_index(run)["latest"] == "step-0000002"
    before = snapshot(run)

    # Neither: one line naming both, from the real CLI; the run is untouched.
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", run)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    with pytest.raises(HainaError, match="not both"):
        pretrain(str(recipe), data=str(data), out=str(run), resume=True, overwrite=True)
    assert snapshot(run) == before

    pretrain(str(recipe), data=str(data), out=str(run), resume=True, overrides=["train.max_steps=3"])
    assert ckpt.read_index(run)["latest"] == "step-0000003"
    assert "resumed from" in capsys.readouterr().err

    pretrain(str(recipe), data=str(data), out=str(run), overwrite=True, overrides=["train.max_steps=1"])
    index = ckpt.read_index(run)
    assert index["all"] == ["step-0000001"] and not (run / "checkpoints" / "step-0000003").exists()
    assert read_manifest(run)["command"] == "pretrain"
    assert not list(root.glob(".run.haina-*"))  # the old run went aside and is gone

    # The quickstart's directory holds a pretraining run too (cut short by its --max-minutes, say): resumable.
    write_manifest(run, "quickstart")
    pretrain(str(recipe), data=str(data), out=str(run), resume=True)
    assert ckpt.read_index(run)["latest"] == "step-0000002" and read_manifest(run)["command"] == "quickstart"


def test_what_pretrain_did_not_make_is_never_touched(setup):
    root, data, recipe = setup
    stranger = root / "mine"
    for rel, text in {"notes.txt": "mine", "metrics.jsonl": "{}\n", "checkpoints/index.json": "{}",
                      "tb/plot.txt": "mine"}.items():
        (stranger / rel).parent.mkdir(parents=True, exist_ok=True)
        (stranger / rel).write_text(text)
    other = root / "other"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"command": "export hf"}))
    (other / "config.json").write_text("{}")
    (data / "sub").mkdir()
    (data / "sub" / "keep.txt").write_text("mine")
    a_file = root / "a-file"
    a_file.write_text("mine")
    cases = [  # (out, flags, the error's words)
        (stranger, {}, "not a haina output; choose another --out, or pass --overwrite"),
        (stranger, {"resume": True}, "cannot --resume .* not a haina run"),
        (other, {}, "the output of 'haina export hf'"),
        (other, {"resume": True}, "cannot --resume .* the output of 'haina export hf'"),
        (data, {"overwrite": True}, "is the input"),
        (data / "sub", {"overwrite": True}, "lies inside the input"),
        (root, {"overwrite": True}, "contains the input"),
        (a_file, {"overwrite": True}, "is a file"),
    ]
    for out, flags, words in cases:
        before = {p: snapshot(p) for p in (stranger, other, data, a_file)}
        with pytest.raises(HainaError, match=words):
            pretrain(str(recipe), data=str(data), out=str(out), **flags)
        assert {p: snapshot(p) for p in before} == before, (out, flags)

    # --overwrite replaces a stranger's directory (it is no input), as the user asked.
    pretrain(str(recipe), data=str(data), out=str(stranger), overwrite=True, overrides=["train.max_steps=1"])
    assert read_manifest(stranger)["command"] == "pretrain" and not (stranger / "notes.txt").exists()


def test_sigterm_saves_exits_zero_and_resumes_bit_exactly(setup):
    root, data, recipe = setup
    args = ["pretrain", "--config", recipe, "--data", data, "--train.max_steps=40", "--train.save_every=20"]
    r = haina(*args, "--out", root / "whole")
    assert r.returncode == 0, r.stderr

    cut = root / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "haina.cli", *map(str, args), "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("step ") and "/40:" in line:  # training has begun
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    report = json.loads((cut / "report.json").read_text())
    assert report["stopped_because"] == "SIGTERM" and 0 < report["steps"] < 40 and "stopped by SIGTERM" in stdout
    assert ckpt.read_index(cut)["latest"] == ckpt.step_name(report["steps"])

    r = haina(*args, "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr
    # Tensor for tensor: the file bytes differ only in the order safetensors writes its metadata keys.
    a, b = (load_file(d / "checkpoints" / "step-0000040" / "model.safetensors") for d in (root / "whole", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
