"""Pretraining on several machines, simulated on one: two torchrun agents (`--nnodes 2`) that meet on loopback.

Each "node" is its own `torchrun … -m haina pretrain` with one process, started concurrently, as a user starts one
on each machine (or Slurm's `srun` does: recipes/slurm/pretrain.sbatch). Both name the same --out: machines in a
cluster share a filesystem, and every rank reads the run directory (the checkpoint to resume, the one a rollback
returns to) while rank 0 alone writes it.

Two rendezvous, as the README describes them: c10d (`--rdzv-endpoint HOST:PORT`, what the Slurm script uses), which
orders the nodes itself and ignores --node-rank, and static (`--master-addr/--master-port --node-rank`), where node
0 is rank 0.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import DIST_RECIPE, DIST_STEPS, dist_env, one_process_run, recipe_setup, train_losses

ROOT = Path(__file__).resolve().parents[2]
STEPS = DIST_STEPS
RECIPE = DIST_RECIPE  # 2 nodes × 1 rank × 2 rows are the one process's batch of 4
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(setup, outs: list[Path], *overrides: str, rendezvous: str = "c10d") -> list[subprocess.CompletedProcess]:
    """Start one torchrun agent per entry of `outs` (its --out), all at once; their results, node by node.

    c10d: every agent names the same endpoint and run id, and the rendezvous assigns the ranks (by host name,
    then process id: on one machine, usually the agent started first). static: node n is told its rank.
    """
    _, data, recipe = setup
    port, nodes = free_port(), len(outs)
    procs = []
    for node, out in enumerate(outs):
        if rendezvous == "c10d":
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}"]
        else:
            where = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1", *where,
               "-m", "haina", "pretrain", "--config", str(recipe), "--data", str(data), "--out", str(out), *overrides]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dist_env()))
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:  # a node left waiting for its peer is stopped, not leaked
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors")


def summary_printed(r: subprocess.CompletedProcess) -> bool:
    """Whether this node printed the run's summary: the node whose process is rank 0."""
    return f"{STEPS} steps, " in r.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return recipe_setup(tmp_path_factory.mktemp("multinode"), RECIPE)


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process with the global batch (2 nodes × 1 rank × 2 rows)."""
    return one_process_run(setup)


@pytest.fixture(scope="module")
def c10d(setup):
    """Two nodes, c10d rendezvous, one shared --out (inside a directory of its own, to see what else appears)."""
    shared = setup[0] / "c10d"
    shared.mkdir()
    results = launch_nodes(setup, [shared / "run", shared / "run"])
    for node, r in enumerate(results):
        assert r.returncode == 0, f"node {node}:\n{r.stderr}"
    return shared / "run", results


def test_two_nodes_train_like_one_process_with_the_global_batch(c10d, one_process):
    run, _ = c10d
    a, b = train_losses(run), train_losses(one_process)
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= 1e-5, f"loss trajectories differ by {worst:.3g}:\n{a}\n{b}"
    report = json.loads((run / "report.json").read_text())
    assert report["ranks"] == "2 ranks, DDP (cpu)" and report["tokens_per_step"] == 4 * 32
    assert report["train_tokens"] == json.loads((one_process / "report.json").read_text())["train_tokens"]


def test_only_global_rank_0_writes_the_shared_run(c10d):
    run, results = c10d
    # c10d ignores --node-rank: one node, whichever the rendezvous made rank 0, tells the story.
    assert [summary_printed(r) for r in results].count(True) == 1, [r.stdout for r in results]
    main, other = sorted(results, key=summary_printed, reverse=True)
    assert main.stderr.count("training ") == 1 and "2 ranks, DDP (cpu)" in main.stderr
    assert "training " not in other.stderr and not other.stdout.strip()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Each record once: a second writer would interleave its copy.
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [0, STEPS]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["index.json", f"step-{STEPS:07d}"]
    # One claim of the directory, nothing beside it (no second run, no half-built copy left by a racing claim).
    assert [p.name for p in run.parent.iterdir()] == ["run"]
    assert json.loads((run / "haina-manifest.json").read_text())["command"] == "pretrain"


def test_static_rendezvous_node_0_is_rank_0_and_both_nodes_resume(setup, c10d):
    """--master-addr/--node-rank: node 0 is rank 0. Both commands carry --resume, as a restartable job script
    does: the first starts the run (nothing to resume), the second continues it on both nodes from the shared
    checkpoint, ending on the straight c10d run's weights bit for bit."""
    out = setup[0] / "static"
    for extra, steps in (("--train.max_steps=10", 10), (f"--train.max_steps={STEPS}", STEPS)):
        results = launch_nodes(setup, [out, out], "--resume", extra, f"--train.decay_steps={STEPS}",
                               rendezvous="static")
        for node, r in enumerate(results):
            assert r.returncode == 0, f"node {node}:\n{r.stderr}"
        assert [f"{steps} steps, " in r.stdout for r in results] == [True, False]
    assert "no checkpoint to resume" not in results[0].stderr and "resumed from" in results[0].stderr
    a, b = final_weights(c10d[0]), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(out) == train_losses(c10d[0])


def test_an_out_that_not_every_node_sees_is_refused(setup):
    """Node 1 names a directory node 0 never writes (what a node-local disk looks like): one line, not a run."""
    root = setup[0]
    results = launch_nodes(setup, [root / "local-0", root / "local-1"], rendezvous="static")
    assert results[1].returncode != 0
    errors = [line for r in results for line in r.stderr.splitlines() if line.startswith("error:")]
    assert any(re.search(r"rank 1: .*shares?", line) for line in errors), "\n".join(r.stderr for r in results)


# ----------------------------------------------------------------- the Slurm recipe
SBATCH = ROOT / "recipes" / "slurm" / "pretrain.sbatch"


def test_slurm_script_is_valid_bash_and_names_a_bundled_recipe():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    r = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --ntasks-per-node=1" in text
    recipe = re.search(r'^RECIPE=\$\{RECIPE:-([\w./-]+)\}', text, re.MULTILINE)
    assert recipe, "the script sets RECIPE=${RECIPE:-<name>}"
    assert (ROOT / "recipes" / "pretrain" / f"{recipe.group(1)}.yaml").is_file()
    # The launch line the README describes: one torchrun per node, c10d rendezvous on the head node, --resume.
    for part in ("srun", "torchrun", "--nnodes", "--rdzv-backend c10d", "--rdzv-endpoint", "--rdzv-id",
                 "--max-restarts", "-m haina pretrain", "--resume", "scontrol show hostnames"):
        assert part in text, part
