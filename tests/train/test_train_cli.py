"""`haina pretrain` as a user runs it: recipe + overrides, resolved config on disk, resume, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from train_fixtures import text_dataset

from haina.core.errors import HainaError
from haina.train.pretrain import load_pretrain_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {
    "model": {"preset": "tiny", "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
              "dropout": 0.1},
    "data": {"dir": "unused"},
    "train": {"batch_size": 4, "max_steps": 8, "warmup_steps": 2, "eval_every": 4, "eval_batches": 2,
              "log_every": 2, "save_every": 0, "device": "cpu", "tensorboard": False, "grad_accum": 2},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, _ = text_dataset(root)
    recipe = root / "tiny-test.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return root, data, recipe


def haina(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "haina.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=300, cwd=cwd, check=False)
    return r


def one_line_error(r, start):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    return lines[0]


def test_overrides_resolved_config_and_bit_exact_resume(setup):
    root, data, recipe = setup
    straight, split = root / "straight", root / "split"
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", straight, "--train.lr=2e-3",
              "--train.decay_steps", "8")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load((straight / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-3 and resolved["train"]["decay_steps"] == 8
    assert resolved["train"]["block_size"] == 32 and resolved["data"]["dir"] == str(data)
    assert resolved["model"]["n_layer"] == 2 and resolved["model"]["n_embd"] == 32  # the preset, expanded
    assert "8 steps" in r.stdout

    # Interrupted after 4 steps, then resumed to 8 in a new process: the same weights, bit for bit.
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", split, "--train.lr=2e-3",
              "--train.decay_steps=8", "--train.max_steps=4")
    assert r.returncode == 0, r.stderr
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", split, "--train.lr=2e-3",
              "--train.decay_steps=8", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    a = load_file(straight / "checkpoints" / "step-0000008" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step-0000008" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # The checkpoint carries the full resolved config, so it can be resumed or inspected alone.
    saved = yaml.safe_load((split / "checkpoints" / "step-0000008" / "config.yaml").read_text())
    assert saved["train"]["resume"] is True and saved["model"]["dropout"] == 0.1

    # Resuming with another architecture is refused in one line.
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", split, "--resume", "--model.n_layer=3")
    line = one_line_error(r, "error: cannot resume:")
    assert "n_layer: 2 → 3" in line


def test_unknown_key(setup):
    root, data, recipe = setup
    r = haina("pretrain", "--config", recipe, "--data", data, "--out", root / "x", "--train.lrr=1")
    assert one_line_error(r, "error:") == "error: unknown config key 'train.lrr' (did you mean 'lr'?)"


@pytest.mark.parametrize("case", ["missing-config", "missing-data", "small-vocab"])
def test_bad_input(setup, case):
    root, data, recipe = setup
    args = {"missing-config": ["--config", root / "nope.yaml", "--data", data],
            "missing-data": ["--config", recipe, "--data", root / "no-such-dir"],
            "small-vocab": ["--config", recipe, "--data", data, "--model.vocab_size=10"]}[case]
    r = haina("pretrain", *args, "--out", root / "y")
    expected = {"missing-config": "error: config file not found", "missing-data": "error: data directory not found",
                "small-vocab": "error: the tokenizer has 60 tokens but model.vocab_size is 10"}[case]
    line = one_line_error(r, expected)
    if case == "small-vocab":
        assert "set model.vocab_size ≥ 60" in line


def test_default_out_and_bundled_recipes(setup):
    _, _, recipe = setup
    assert load_pretrain_config(str(recipe)).out == str(Path("runs") / "tiny-test")
    for name in ("shakespeare-char", "gpt2-124m", "quickstart"):
        cfg = load_pretrain_config(name)  # bundled recipes load by name and resolve
        assert cfg.train.block_size <= cfg.model.block_size
    assert load_pretrain_config("gpt2-124m").train.tokens_per_step == 524_288
    with pytest.raises(HainaError, match="train.block_size 64 exceeds model.block_size 32"):
        load_pretrain_config(str(recipe), overrides=["train.block_size=64"])
