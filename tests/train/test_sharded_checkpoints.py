"""Sharded (DCP) checkpoints: written by every rank, resumed at another world size, restarted by torchrun.

The reference is one process with the global batch (2 ranks × 2 rows), as in test_distributed.py. A run stopped
after 10 of 20 steps and resumed elsewhere must continue that very trajectory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import DIST_RECIPE, DIST_STEPS, assert_same_trajectory, dist_env, one_process_run, recipe_setup

from haina.core.errors import HainaError
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer
from haina.train.checkpoint import STATE_FILE, load_state
from haina.train.pretrain import load_pretrain_config, run_pretrain

STEPS, HALF = DIST_STEPS, 10
RECIPE = {**DIST_RECIPE, "train": {**DIST_RECIPE["train"], "decay_steps": STEPS, "keep_last": 3}}


env = dist_env


def torchrun(*args, extra: tuple[str, ...] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    # Restarts need torchrun's rendezvous store kept apart from the ranks' (README: restarts; pytorch#135712).
    restarts = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if "--max-restarts" in extra else {}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *extra, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**env(), **restarts}, check=False)


def haina(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haina", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env(), check=False)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(b[k], value, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recipe_setup(tmp_path_factory.mktemp("dcp"), RECIPE)


@pytest.fixture(scope="module")
def reference(setup):
    """One process, the global batch of 4 rows, a checkpoint at step 10 and at step 20."""
    return one_process_run(setup, "one", f"train.save_every={HALF}")


@pytest.fixture(scope="module")
def fsdp_half(setup):
    """FSDP2 over 2 ranks for the first 10 steps: its checkpoint is sharded (parallel.checkpoint auto)."""
    root, data, recipe = setup
    out = root / "fsdp-half"
    r = torchrun("-m", "haina", "pretrain", "--config", recipe, "--data", data, "--out", out,
                 "--parallel.dp_shard=2", f"--train.max_steps={HALF}")
    assert r.returncode == 0, r.stderr
    assert f"haina export checkpoint --checkpoint {out} --out DIR" in r.stdout  # the summary says how to use it
    return out


def test_every_rank_writes_its_shard_and_rank_0_the_rest(fsdp_half):
    step = fsdp_half / "checkpoints" / f"step-{HALF:07d}"
    assert sorted(p.name for p in (step / "shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (step / "model.safetensors").exists()
    assert {"config.yaml", "tokenizer", STATE_FILE, "checksums.json"} <= {p.name for p in step.iterdir()}
    state = load_state(step)
    assert state["optimizer_in_shards"] and "optimizer" not in state
    # The checksums cover the shards: a damaged one is found before resuming reads it.
    listed = json.loads((step / "checksums.json").read_text())["files"]
    assert {"shards/shard-00001-model-00001-of-00001.safetensors", STATE_FILE} <= listed.keys()
    # No staging directory is left beside the checkpoints.
    assert sorted(p.name for p in (fsdp_half / "checkpoints").iterdir()) == ["index.json", f"step-{HALF:07d}"]


def test_resume_with_one_process_continues_the_trajectory(setup, fsdp_half, reference):
    root, data, recipe = setup
    out = root / "resume-1"
    shutil.copytree(fsdp_half, out)
    cfg = load_pretrain_config(str(recipe), data=str(data), out=str(out), resume=True,
                               overrides=["train.batch_size=4"])  # one process takes the whole global batch
    run_pretrain(cfg, claim=True)
    assert_same_trajectory(out, reference)
    assert_close_weights(weights(reference, STEPS), weights(out, STEPS))


def test_resume_with_two_ddp_ranks_continues_the_trajectory(setup, fsdp_half, reference):
    root, data, recipe = setup
    out = root / "resume-2"
    shutil.copytree(fsdp_half, out)
    r = torchrun("-m", "haina", "pretrain", "--config", recipe, "--data", data, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert_same_trajectory(out, reference)
    assert_close_weights(weights(reference, STEPS), weights(out, STEPS))  # DDP writes plain checkpoints


def test_async_checkpoints_are_written_in_the_background_and_resume(setup, reference):
    """DDP with parallel.async_checkpoint: sharded checkpoints every 5 steps, published once written."""
    root, data, recipe = setup
    out = root / "async-half"
    r = torchrun("-m", "haina", "pretrain", "--config", recipe, "--data", data, "--out", out,
                 "--parallel.async_checkpoint=true", "--train.save_every=5", f"--train.max_steps={HALF}")
    assert r.returncode == 0, r.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["index.json", "step-0000005", f"step-{HALF:07d}"]
    assert json.loads((ckpts / "index.json").read_text())["latest"] == f"step-{HALF:07d}"
    assert len(list((ckpts / f"step-{HALF:07d}" / "shards").iterdir())) == 2
    resumed = root / "async-resumed"
    shutil.copytree(out, resumed)
    cfg = load_pretrain_config(str(recipe), data=str(data), out=str(resumed), resume=True,
                               overrides=["train.batch_size=4"])
    run_pretrain(cfg, claim=True)
    assert_same_trajectory(resumed, reference)


def test_export_checkpoint_makes_the_plain_one_every_command_reads(setup, fsdp_half, reference):
    root = setup[0]
    r = haina("generate", "--checkpoint", fsdp_half, "--prompt", "a", "--max-new-tokens", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "haina export checkpoint" in r.stderr
    out = root / "plain"
    r = haina("export", "checkpoint", "--checkpoint", fsdp_half, "--out", out)
    assert r.returncode == 0, r.stderr
    assert_close_weights(weights(reference, HALF), load_file(out / "model.safetensors"))
    r = haina("generate", "--checkpoint", out, "--prompt", "a", "--max-new-tokens", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    # Again: an earlier export is replaced; a plain checkpoint is refused in one line.
    assert haina("export", "checkpoint", "--checkpoint", fsdp_half, "--out", out).returncode == 0
    r = haina("export", "checkpoint", "--checkpoint", reference, "--out", root / "plain-2")
    assert r.returncode == 2 and "already a plain checkpoint" in r.stderr and not (root / "plain-2").exists()


def test_shards_of_another_model_are_one_line_before_reading(fsdp_half):
    from haina.train.sharded import full_weights, load_shards

    step = fsdp_half / "checkpoints" / f"step-{HALF:07d}"
    whole = full_weights(step)  # one process, no process group
    assert whole["blocks.0.attn.qkv.weight"].shape == (96, 32)
    other = Transformer(ModelConfig.from_dict({**RECIPE["model"], "n_embd": 48}))
    with pytest.raises(HainaError, match=r"holds another model \(shapes differ: tok_emb.weight \(64, 32\) → \(64, 48\)"):
        load_shards(step, other, None)


def test_resuming_shards_with_another_model_is_one_line(setup, fsdp_half):
    root, data, recipe = setup
    out = root / "other-model"
    shutil.copytree(fsdp_half, out)
    cfg = load_pretrain_config(str(recipe), data=str(data), out=str(out), resume=True,
                               overrides=["train.batch_size=4", "model.n_embd=48"])
    with pytest.raises(HainaError, match=r"^cannot resume: .* was trained with another architecture \(n_embd: 32 → 48"):
        run_pretrain(cfg, claim=True)


def test_torchrun_restarts_a_killed_rank_and_the_job_resumes(setup, reference):
    """Rank 1 dies at step 12 on the first try; torchrun --max-restarts 1 starts both again from step 10."""
    root, data, recipe = setup
    out = root / "restarted"
    r = torchrun(__file__, "pretrain", "--config", recipe, "--data", data, "--out", out,
                 "--parallel.checkpoint=sharded", f"--train.save_every={HALF}", extra=("--max-restarts", "1"))
    assert r.returncode == 0, r.stderr
    assert "restart 1 of this job: resuming from the last checkpoint" in r.stderr
    assert "resumed from" in r.stderr
    assert_same_trajectory(out, reference)


def test_fsdp_over_one_rank_trains_as_one_process(setup, reference):
    """parallel.fsdp: FSDP2's machinery where nothing needs sharding (what benchmarks/scaling.py --gpu measures)."""
    root, data, recipe = setup
    out = root / "fsdp-one"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                        "haina", "pretrain", "--config", str(recipe), "--data", str(data), "--out", str(out),
                        "--parallel.fsdp=true", "--train.batch_size=4"], capture_output=True, text=True, timeout=120,
                       env=env(), check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "report.json").read_text())["ranks"] == "1 rank, FSDP2 over 1 (cpu)"
    assert_same_trajectory(out, reference)


def test_max_restarts_needs_nproc(setup, capsys):
    from haina.cli import main

    _, data, recipe = setup
    assert main(["pretrain", "--config", str(recipe), "--data", str(data), "--max-restarts", "1"]) == 2
    assert "--max-restarts restarts the processes that --nproc starts" in capsys.readouterr().err


# ----------------------------------------------------------------- run by torchrun: a rank that dies once
def _worker(argv: list[str]) -> int:
    import haina.train.pretrain as command
    from haina.cli import main
    from haina.train.trainer import Trainer

    class DiesOnce(Trainer):
        def train_step(self, lr):
            if self.dist.rank == 1 and self.step == 12 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                os._exit(1)  # no clean-up, no message: a crashed process
            return super().train_step(lr)

    command.Trainer = DiesOnce
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1:]))
