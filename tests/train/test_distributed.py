"""Data-parallel pretraining under torchrun: 2 CPU processes on gloo against one process, as a user launches it.

Each distributed run is a real job (`python -m torch.distributed.run --standalone --nproc-per-node 2 -m haina
pretrain …`). Runs that need a probe inside the loop (a rank that fails, a count of gradient all-reduces) launch
this file instead, which swaps the pretraining command's `Trainer` for a subclass and then runs the CLI as usual.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import DIST_RECIPE, DIST_STEPS, assert_same_trajectory, dist_env, one_process_run, recipe_setup

from haina.core.errors import HainaError
from haina.train.config import ParallelConfig

STEPS = DIST_STEPS
RECIPE = DIST_RECIPE


env = dist_env


def torchrun(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Two processes on this machine; --standalone picks a free port for the rendezvous."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env(), check=False)


def pretrain_2(setup, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    _, data, recipe = setup
    return torchrun("-m", "haina", "pretrain", "--config", recipe, "--data", data, "--out", out, *overrides)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recipe_setup(tmp_path_factory.mktemp("dist"), RECIPE)


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process with the global batch (2 ranks × 2 rows)."""
    return one_process_run(setup)


@pytest.fixture(scope="module")
def ddp(setup):
    """2 ranks, DDP (the default mesh), with TensorBoard on to see who writes."""
    root = setup[0]
    r = pretrain_2(setup, root / "ddp", "--train.tensorboard=true")
    assert r.returncode == 0, r.stderr
    return root / "ddp", r


def test_ddp_matches_one_process_with_the_global_batch(ddp, one_process):
    run, _ = ddp
    assert_same_trajectory(run, one_process)
    report = json.loads((run / "report.json").read_text())
    assert report["ranks"] == "2 ranks, DDP (cpu)" and report["tokens_per_step"] == 4 * 32
    # Every rank's tokens are counted: the same as the one process with the global batch.
    assert report["train_tokens"] == json.loads((one_process / "report.json").read_text())["train_tokens"]


def val_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def test_only_rank_0_writes_and_logs(ddp):
    run, r = ddp
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # a second writer would add its own file
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Each record once: two writers would interleave two copies of them.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [0, STEPS]
    assert r.stdout.count(f"{STEPS} steps") == 1  # the summary, printed by rank 0 alone
    assert r.stderr.count("training ") == 1 and "2 ranks, DDP" in r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["index.json", f"step-{STEPS:07d}"]


def test_fsdp2_with_accumulation_and_checkpointing_matches_ddp(setup, ddp):
    """FSDP2 over 2 ranks, 1 row × 2 micro-batches, activation checkpointing: the DDP run's trajectory."""
    root = setup[0]
    r = pretrain_2(setup, root / "fsdp", "--parallel.dp_shard=2", "--train.batch_size=1", "--train.grad_accum=2",
                   "--train.activation_checkpointing=true", "--parallel.checkpoint=full")
    assert r.returncode == 0, r.stderr
    assert_same_trajectory(root / "fsdp", ddp[0])
    # Asked for full checkpoints (sharded ones are test_sharded_checkpoints.py's): one plain file gathered on rank 0.
    a, b = final_weights(ddp[0]), final_weights(root / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert json.loads((root / "fsdp" / "report.json").read_text())["ranks"] == "2 ranks, FSDP2 over 2 (cpu)"


def test_accumulation_reduces_gradients_once_per_step(setup, one_process):
    """DDP with 2 micro-batches of 1 row: the trajectory of no accumulation, with one all-reduce per step."""
    root, data, recipe = setup
    counts = root / "allreduce-counts"
    r = torchrun(__file__, "count", counts, "pretrain", "--config", recipe, "--data", data, "--out", root / "accum",
                 "--train.batch_size=1", "--train.grad_accum=2", "--train.eval_batches=3")
    assert r.returncode == 0, r.stderr
    assert_same_trajectory(root / "accum", one_process)
    rows = [[int(n) for n in line.split()] for line in counts.read_text().splitlines()]
    # The tiny model's gradients fit one DDP bucket: one all-reduce per step, not one per micro-batch.
    assert [allreduces for allreduces, _ in rows] == [STEPS, STEPS]
    # Each evaluation's 3 batches are split over the ranks, 2 on one and 1 on the other, and the sums added: at
    # step 0 (the same initial weights) the figure of one process scoring all 3 batches of 1 row.
    evaluations = len(val_losses(root / "accum"))
    assert evaluations and sorted(scored for _, scored in rows) == [evaluations, 2 * evaluations]
    reference = one_process_run(setup, "one-eval", "train.batch_size=1", "train.eval_batches=3", "train.max_steps=1")
    assert val_losses(root / "accum")[0] == pytest.approx(val_losses(reference)[0], abs=1e-6)


def test_a_failing_rank_stops_the_job_with_its_one_line_error(setup):
    root, data, recipe = setup
    t0 = time.perf_counter()
    r = torchrun(__file__, "fail", "-", "pretrain", "--config", recipe, "--data", data, "--out", root / "failing",
                 "--parallel.timeout_seconds=60")
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0
    assert elapsed < 45, f"the job took {elapsed:.0f} s: the surviving rank hung instead of stopping"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "error: rank 1: injected failure at step 3" in errors, r.stderr
    # Rank 0, waiting in a collective, says only why it stopped (if torchrun did not stop it first).
    assert set(errors) <= {"error: rank 1: injected failure at step 3",
                           "error: rank 0: stopped because another rank failed; that rank's error says why"}, r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr


def test_a_mesh_that_does_not_fit_the_world_is_one_line_before_any_compute(setup):
    root = setup[0]
    r = pretrain_2(setup, root / "misfit", "--parallel.dp_replicate=2", "--parallel.dp_shard=2")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [("error: parallel.dp_replicate=2 × parallel.dp_shard=2 does not fit 2 processes: their "
                       "product must be the number of processes (--nproc N, or torchrun's --nproc-per-node × "
                       "--nnodes); -1 takes what the other leaves")], r.stderr
    assert not (root / "misfit").exists()


def test_nproc_launches_torchrun_and_resumes_bit_exactly(setup, ddp):
    """`haina pretrain --nproc 2`, stopped after 10 steps and resumed: the straight DDP run's weights, bit for bit."""
    root, data, recipe = setup
    out = root / "nproc"
    common = ["--config", recipe, "--data", data, "--out", out, "--nproc", "2", f"--train.decay_steps={STEPS}"]
    for extra in (["--train.max_steps=10"], ["--resume"]):
        r = subprocess.run([sys.executable, "-m", "haina", "pretrain", *map(str, common), *extra], capture_output=True,
                           text=True, timeout=120, env=env(), check=False)
        assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and f"{STEPS} steps" in r.stdout
    a, b = final_weights(ddp[0]), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nproc_refuses_a_mesh_that_does_not_fit_before_launching(setup, capsys):
    from haina.cli import main

    _, data, recipe = setup
    assert main(["pretrain", "--config", str(recipe), "--data", str(data), "--nproc", "2",
                 "--parallel.dp_shard=3"]) == 2
    assert capsys.readouterr().err.startswith("error: parallel.dp_replicate=-1 × parallel.dp_shard=3 does not fit 2")


@pytest.mark.parametrize(("replicate", "shard", "world", "expected"), [
    (-1, 1, 4, (4, 1)), (-1, 2, 4, (2, 2)), (1, -1, 4, (1, 4)), (2, 2, 4, (2, 2)), (-1, 1, 1, (1, 1)),
])
def test_mesh_degrees(replicate, shard, world, expected):
    assert ParallelConfig(dp_replicate=replicate, dp_shard=shard).degrees(world) == expected


def test_rank_rows_split_a_short_batch_so_every_token_is_counted_once():
    """A fine-tuning source's last length bucket can be short of the global batch: its rows are split as evenly as
    they go (every row on one rank, tokens counted once); fewer rows than ranks go whole to every rank."""
    from haina.train.distributed import RankRows

    class Source:
        def __init__(self, rows):
            self.rows = rows

        def get_batch(self, batch_size, block_size, generator):
            m = min(batch_size, self.rows)
            return {"x": torch.arange(m * 2).view(m, 2), "row_tokens": torch.arange(1, m + 1), "tokens": 99}

    def shares(rows, world=2, batch_size=2):
        return [RankRows(Source(rows), r, world).get_batch(batch_size, 8, None) for r in range(world)]

    full = shares(4)
    assert [b["row_tokens"].tolist() for b in full] == [[1, 2], [3, 4]] and full[0]["tokens"] == 99
    short = shares(3)
    assert [b["row_tokens"].tolist() for b in short] == [[1], [2, 3]]
    assert torch.equal(torch.cat([b["x"] for b in short]), torch.arange(6).view(3, 2))
    assert [b["row_tokens"].tolist() for b in shares(1)] == [[1], [1]]  # one row, two ranks: both compute it
    assert [b["row_tokens"].tolist() for b in shares(5, world=3)] == [[1], [2, 3], [4, 5]]


def test_bad_parallel_configs_are_one_line_errors():
    with pytest.raises(HainaError, match="cannot both be -1"):
        ParallelConfig(dp_replicate=-1, dp_shard=-1)
    with pytest.raises(HainaError, match="does not fit 1 process"):
        ParallelConfig(dp_shard=2).degrees(1)
    with pytest.raises(HainaError, match="needs parallel.dp_shard > 1"):
        ParallelConfig(mixed_precision=True).degrees(2)


# ----------------------------------------------------------------- run by torchrun: a probe inside the loop
def _worker(scenario: str, counts: str, argv: list[str]) -> int:
    import torch.distributed as dist

    import haina.train.pretrain as command
    from haina.cli import main
    from haina.train.trainer import Trainer

    class Probe(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.allreduces = 0
            if scenario == "count":
                def counting(state, bucket):
                    self.allreduces += 1
                    work = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True)
                    return work.get_future().then(lambda fut: fut.value()[0])

                self.wrapped.register_comm_hook(None, counting)

        def train_step(self, lr):
            if scenario == "fail" and self.dist.rank == 1 and self.step == 3:
                raise HainaError("injected failure at step 3")
            return super().train_step(lr)

        def eval_step(self, batch):
            self.scored = getattr(self, "scored", 0) + 1
            return super().eval_step(batch)

        def fit(self):
            report = super().fit()
            if scenario == "count":  # each rank appends its counts; the test reads both
                with open(counts, "a") as f:
                    f.write(f"{self.allreduces} {getattr(self, 'scored', 0)}\n")
            return report

    command.Trainer = Probe
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1], sys.argv[2], sys.argv[3:]))
