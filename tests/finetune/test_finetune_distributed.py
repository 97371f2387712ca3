"""Every fine-tuning method under torchrun: 2 CPU processes on gloo against one process with the global batch.

Each distributed run is a job as a user starts it (`python -m torch.distributed.run --standalone --nproc-per-node 2
-m haina finetune METHOD …`, or `haina finetune METHOD --nproc 2`). Its loss at every step must be the loss of one
process with twice the batch (fp32, within 1e-5): each rank keeps its rows of the global batch (padded, packed,
preference pairs, class batches), DDP or FSDP2 averages the gradients, and the loss is weighted by every rank's
targets. The models are tiny and the runs short, so that the file stays well under two minutes on two busy cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from haina.cli import build_parser, main
from haina.data.tokenize import tokenize_to_shards
from haina.finetune.base import command_argv
from haina.finetune.command import sft_command
from haina.generate.chat import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START
from haina.model import ModelConfig, Transformer
from haina.model.checkpoint import save_model
from haina.tokenizer import EOT
from haina.tokenizer.train import train_bpe

STEPS = 6
# batch_size is per rank: 2 ranks × 2 rows (pairs, examples) are the global batch of 4 the one process draws.
COMMON = [f"--train.max_steps={STEPS}", "--train.batch_size=2", "--train.warmup_steps=2", "--train.lr=3e-3",
          "--train.log_every=1", "--train.eval_every=1000", "--train.eval_batches=2", "--train.save_every=0",
          "--train.device=cpu", "--train.tensorboard=false", "--train.seed=3", "--data.val_fraction=0"]
GLOBAL = "--train.batch_size=4"
WORDS = ["red", "blue", "green", "apple", "sky", "grass", "snow", "coal", "is", "the", "very", "quite", "and"]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The in-process reference runs share two cores with the torchrun jobs; tiny models gain nothing from threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A ChatML BPE tokenizer, a tiny base with an untied LM head, and the data of every method."""
    root = tmp_path_factory.mktemp("ftdist")
    rng = random.Random(0)
    docs = [_phrase(rng, 3, 30) for _ in range(300)]
    tok = train_bpe(docs, vocab_size=300, special_tokens=(EOT, IM_START, IM_END))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    # Untied: a classifier never computes the LM head, which DDP must then be told to expect no gradient for.
    cfg = ModelConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False, tie_embeddings=False)
    save_model(root / "base", Transformer(cfg), tok)
    # Answers of very different lengths: a padded batch's rows are padded to its longest.
    _jsonl(root / "sft.jsonl", [{"prompt": _phrase(rng, 1, 6), "response": _phrase(rng, 1, 14)} for _ in range(60)]
           + [{"prompt": "no response"}])  # a reject: rank 0 alone writes rejects.jsonl
    _jsonl(root / "dpo.jsonl", [{"prompt": _phrase(rng, 1, 6), "chosen": _phrase(rng, 1, 8) + " yes",
                                 "rejected": _phrase(rng, 1, 8) + " no"} for _ in range(40)])
    labels = {"red": "warm", "coal": "dark", "snow": "cold"}
    rows = []
    for _ in range(80):
        word = rng.choice(list(labels))
        rows.append({"text": f"{_phrase(rng, 1, 5)} {word} {_phrase(rng, 0, 5)}", "label": labels[word]})
    _jsonl(root / "classify.jsonl", rows[:60])
    _jsonl(root / "classify_val.jsonl", rows[60:])
    tokenize_to_shards(docs, tok, root / "shards", val_fraction=0.1)
    return root


def _args(world: Path, method: str, out: Path, *more: str) -> list[str]:
    data = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "classify": "classify.jsonl", "continue": "shards",
            "distill": "shards"}[method]
    base = str(world / "base")
    who = ["--teacher", base, "--preset", "tiny"] if method == "distill" else ["--base", base]  # a fresh student
    return ["finetune", method, *who, "--data", str(world / data), "--out", str(out), *COMMON, *more]


def _one(world: Path, method: str, out: Path, *more: str) -> Path:
    """The reference: one process with the global batch of 4."""
    assert main(_args(world, method, out, *more, GLOBAL)) == 0
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores


def _torchrun(world: Path, method: str, out: Path, *more: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "haina", *_args(world, method, out, *more)],
                       capture_output=True, text=True, timeout=180, env=_env(), check=False)
    assert r.returncode == 0, r.stderr
    return r


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _same_trajectory(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == STEPS, (la, lb)
    worst = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    assert worst <= tol, f"loss trajectories differ by {worst:.3g}:\n{la}\n{lb}"


def _final(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{STEPS:07d}" / name)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, expected in a.items():
        torch.testing.assert_close(b[k], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- sft
@pytest.fixture(scope="module")
def sft_ddp(world):
    out = world / "sft-ddp"
    r = _torchrun(world, "sft", out)
    return out, r


def test_sft_padded_ddp_matches_one_process_and_only_rank_0_writes(world, sft_ddp):
    run, r = sft_ddp
    one = _one(world, "sft", world / "sft-one")
    _same_trajectory(run, one)
    report = _report(run)
    assert report["ranks"] == "2 ranks, DDP (cpu)"
    # Every rank counted its own rows' tokens: together, the one process's count (padding excluded).
    assert report["train_tokens"] == _report(one)["train_tokens"]
    assert report["supervised_tokens"] == _report(one)["supervised_tokens"]
    assert len((run / "rejects.jsonl").read_text().splitlines()) == 1
    assert r.stdout.count(f"{STEPS} steps") == 1  # the summary, printed by rank 0 alone
    _close(_final(one, "model.safetensors"), _final(run, "model.safetensors"))


def test_fsdp2_sft_matches_ddp(world, sft_ddp):
    out = world / "sft-fsdp"
    _torchrun(world, "sft", out, "--parallel.dp_shard=2", "--parallel.checkpoint=full")
    _same_trajectory(out, sft_ddp[0])
    assert _report(out)["ranks"] == "2 ranks, FSDP2 over 2 (cpu)"
    _close(_final(sft_ddp[0], "model.safetensors"), _final(out, "model.safetensors"))


def test_sft_packed_lora_ddp_matches_one_process(world):
    """LoRA under DDP (the base frozen on every rank, the adapters reduced) on packed rows."""
    lora = ["--lora.r=4", "--lora.alpha=8", "--data.batching=pack"]
    out = world / "sft-lora-ddp"
    _torchrun(world, "sft", out, *lora)
    one = _one(world, "sft", world / "sft-lora-one", *lora)
    _same_trajectory(out, one)
    assert _report(out)["train_tokens"] == _report(one)["train_tokens"]
    assert not (out / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors").exists()
    _close(_final(one, "adapter.safetensors"), _final(out, "adapter.safetensors"))


# ---------------------------------------------------------------------------------------------- the other methods
def test_dpo_ddp_matches_one_process(world):
    """Each rank computes the reference itself and trains on both rows of its pairs."""
    out = world / "dpo-ddp"
    _torchrun(world, "dpo", out)
    one = _one(world, "dpo", world / "dpo-one")
    _same_trajectory(out, one)
    assert _report(out)["pairs_seen"] == _report(one)["pairs_seen"] == STEPS * 4
    assert _report(out)["train_tokens"] == _report(one)["train_tokens"]


def test_classify_through_nproc_matches_one_process(world):
    """`haina finetune classify --nproc 2` relaunches itself under torchrun; DDP wraps backbone and head together."""
    more = ["--val", str(world / "classify_val.jsonl"), "--classify.test_fraction=0"]
    out = world / "classify-nproc"
    r = subprocess.run([sys.executable, "-m", "haina", *_args(world, "classify", out, *more), "--nproc", "2"],
                       capture_output=True, text=True, timeout=180, env=_env(), check=False)
    assert r.returncode == 0, r.stderr
    one = _one(world, "classify", world / "classify-one", *more)
    _same_trajectory(out, one)
    a, b = _report(out), _report(one)
    assert a["ranks"] == "2 ranks, DDP (cpu)" and a["examples_seen"] == b["examples_seen"] == STEPS * 4
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)  # the head trained alike on both ranks
    _close(_final(one, "classifier.safetensors"), _final(out, "classifier.safetensors"))


def test_distill_with_a_live_teacher_ddp_matches_one_process(world):
    """Every rank holds its own frozen teacher and runs it on its rows."""
    more = ["--alpha", "0.5", "--train.block_size=32"]
    out = world / "distill-ddp"
    _torchrun(world, "distill", out, *more)
    _same_trajectory(out, _one(world, "distill", world / "distill-one", *more))


def test_continue_with_replay_ddp_matches_one_process(world):
    """The replay share is the global batch's: each rank keeps its rows of the mixed batch of 4."""
    # Every rank evaluates the same windows, train.eval_batches of its own batch size: all of them, to compare.
    more = ["--replay", str(world / "shards"), "--replay-fraction", "0.25", "--train.block_size=32",
            "--train.eval_batches=100"]
    out = world / "continue-ddp"
    _torchrun(world, "continue", out, *more)
    one = _one(world, "continue", world / "continue-one", *more)
    _same_trajectory(out, one)
    assert _report(out)["data"]["replay_rows_per_batch"] == _report(one)["data"]["replay_rows_per_batch"] == 1
    assert _report(out)["forgetting"]["old"]["after"] == pytest.approx(_report(one)["forgetting"]["old"]["after"],
                                                                       abs=1e-5)


# ---------------------------------------------------------------------------------------------- refusals, argv
def test_lora_with_fsdp2_is_refused_in_one_line_before_launching(world, capsys):
    out = world / "lora-fsdp"
    assert main([*_args(world, "sft", out, "--lora.r=4", "--parallel.dp_shard=2"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: LoRA does not train under FSDP2 (parallel.dp_shard=2)") and "\n" not in err, err
    assert not out.exists()


def test_classify_with_fsdp2_and_folds_with_nproc_are_refused(world, capsys):
    assert main([*_args(world, "classify", world / "c1", "--parallel.dp_shard=2"), "--nproc", "2"]) == 2
    assert "finetune classify does not train under FSDP2" in capsys.readouterr().err
    assert main([*_args(world, "classify", world / "c2"), "--folds", "2", "--nproc", "2"]) == 2
    assert "--folds trains its runs one after another" in capsys.readouterr().err


def test_the_ranks_command_line_gives_the_command_its_arguments_back():
    """--nproc rebuilds the command line from the function's signature: parsing it gives the same arguments."""
    args = {"base": "b", "data": ["x.jsonl", "y.jsonl"], "out": "o", "config": None, "val": None,
            "train_on_prompt": True, "resume": False, "overwrite": True, "nproc": 2, "max_restarts": 1,
            "overrides": ["lora.r=4", "train.lr=1e-3"]}
    argv = command_argv(sft_command, args)
    assert "--nproc" not in argv and "--max-restarts" not in argv
    path = ("finetune", "sft")
    ns, extra = build_parser(path).parse_known_args([*path, *argv])
    for name in ("base", "data", "out", "train_on_prompt", "overwrite"):
        assert getattr(ns, name) == args[name], name
    assert not ns.resume and extra == ["--lora.r=4", "--train.lr=1e-3"]
