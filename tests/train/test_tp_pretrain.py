"""`haina pretrain --parallel.tp 2` under torchrun: the run of one process, and one-line errors before any compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import assert_same_trajectory, dist_env, recipe_setup

from haina.train.pretrain import load_pretrain_config, run_pretrain

STEPS = 12
RECIPE = {  # a Llama-style block (SwiGLU, grouped key/value heads, rotary), split over 2 ranks
    "model": {"preset": "tiny", "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
              "n_embd": 32, "mlp": "swiglu", "pos": "rope", "norm": "rmsnorm", "bias": False, "dropout": 0.0},
    "data": {"dir": "unused"},
    "train": {"batch_size": 2, "max_steps": STEPS, "decay_steps": STEPS, "warmup_steps": 2, "lr": 3e-3,
              "eval_every": 100, "eval_batches": 1, "log_every": 1, "save_every": 6, "device": "cpu",
              "tensorboard": False, "seed": 3},
}


def torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "haina", *map(str, args)], capture_output=True, text=True, timeout=180,
                          env=dist_env(), check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recipe_setup(tmp_path_factory.mktemp("tp"), RECIPE)


def test_tensor_parallel_pretraining_is_the_one_process_run(setup):
    root, data, recipe = setup
    # The two ranks of a tensor-parallel group read the same rows: the global batch is one rank's.
    cfg = load_pretrain_config(str(recipe), data=str(data), out=str(root / "one"))
    run_pretrain(cfg, claim=True)
    r = torchrun("pretrain", "--config", recipe, "--data", data, "--out", root / "tp", "--parallel.tp=2",
                 "--train.max_steps=6")
    assert r.returncode == 0, r.stderr
    r = torchrun("pretrain", "--config", recipe, "--data", data, "--out", root / "tp", "--parallel.tp=2", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_trajectory(root / "one", root / "tp", steps=STEPS)
    report = json.loads((root / "tp" / "report.json").read_text())
    assert report["ranks"] == "2 ranks, tensor parallel over 2 (cpu)"
    # A plain checkpoint in the model's own layout (the rows' tensor-parallel order undone), as one process wrote.
    step = f"checkpoints/step-{STEPS:07d}/model.safetensors"
    w1, w2 = load_file(root / "one" / step), load_file(root / "tp" / step)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--parallel.tp=3"], "parallel.tp=3 does not divide the model's n_head=4"),
    (["--parallel.tp=2", "--parallel.dp_replicate=2"], "does not fit 1 process"),
    (["--parallel.tp=2", "--parallel.checkpoint=sharded"], "parallel.checkpoint=sharded (and async_checkpoint) does not combine"),
])
def test_bad_tensor_parallel_layouts_are_one_line_before_any_process(setup, flags, message, capsys):
    from haina.cli import main

    root, data, recipe = setup
    out = root / "bad"
    assert main(["pretrain", "--config", str(recipe), "--data", str(data), "--out", str(out), "--nproc", "2",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
