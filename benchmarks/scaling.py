"""Data-parallel scaling of `haina pretrain`: tokens/s with 1 and 2 processes, and what the second one adds.

Every run is the command a user types, in a subprocess of its own: `haina pretrain --config RECIPE --data DATA
--out TMP` with one process, and the same with `--nproc 2` (torchrun, DDP over gloo on CPU). The recipe is written
here from --preset (default tiny: 4 layers, d=128, context 256) with --batch-size rows per process, --steps steps,
no evaluation between them and one checkpoint at the end. The data is --data (a `haina data tokenize` directory) or
the standard library's documentation (`stdlib_corpus`), tokenized here with a byte-level BPE.

CPU: each process gets --threads torch threads (OMP_NUM_THREADS; default half the cores), so 2 processes use twice
the cores of one, and each keeps its --batch-size rows, so they train a global batch twice as large: the weak
scaling of data parallelism, where the ideal is twice the tokens/s. Scaling efficiency = tokens/s(2) /
(2 × tokens/s(1)): 1.0 is perfect; what is missing is the gradient all-reduce each step, the ranks waiting for each
other, and what two processes cost each other in memory bandwidth on one machine.

--gpu: one GPU plain against one GPU with FSDP2 over a mesh of one rank (torchrun --nproc-per-node 1 and
--fsdp-override), which measures FSDP2's own overhead (its parameter all-gathers and gradient reduce-scatters
degenerate to copies on one rank, its hooks and flat buffers remain); with 2 or more GPUs, also 2 GPUs DDP and its
scaling efficiency. FSDP2 over one rank needs haina to ask for it: `haina.train.distributed.setup` joins no mesh
for a single process and `Distributed.sharded` is `dp_shard > 1`, so `--parallel.dp_shard=1` is plain training.
--fsdp-override names the option that will (default parallel.fsdp=true, the name proposed for it); a side whose
report.json does not say it trained as asked, or that haina refuses, is reported as not measured, with the reason.

Tokens/s are read from each run's metrics.jsonl (one record per step, logged by rank 0 with every rank's tokens):
the steps after the first --warmup ones, their tokens over their time, so start-up, the first steps' allocation
(and compilation), the evaluations and the final checkpoint are left out; report.json's whole-run figure is given
beside it. The sides alternate within each of --rounds rounds, the order reversed every other round
(`rounds.py`); a figure is the median over the rounds with its range, a ratio the median of per-round ratios.

    .venv/bin/python benchmarks/scaling.py                                  # CPU: 1 and 2 processes, 3 rounds
    .venv/bin/python benchmarks/scaling.py --preset small --threads 4 --steps 60
    .venv/bin/python benchmarks/scaling.py --gpu --preset gpt2-124m --batch-size 16 --block-size 1024
    .venv/bin/python benchmarks/scaling.py --steps 8 --warmup 2 --rounds 1  # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from rounds import Spread, cpu_model, load_average, ratios, round_order

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The change haina needs before FSDP2 runs over one rank (see the module docstring of --gpu): until then the side
# reports why it was not measured.
FSDP_ONE_RANK = "parallel.fsdp=true"


@dataclass(frozen=True)
class Side:
    """One measured configuration: how many processes, how they are launched, which overrides."""

    key: str
    label: str
    processes: int
    launch: str  # "plain": haina pretrain; "nproc": haina pretrain --nproc N; "torchrun": torchrun --nproc-per-node N
    overrides: tuple[str, ...] = ()
    expect: str = ""  # what report.json's "ranks" must contain for the side to count (empty: no "ranks" at all)


def sides_for(args: argparse.Namespace) -> list[Side]:
    if not args.gpu:
        return [Side("1", "1 process", 1, "plain"), Side("2", "2 processes, DDP (gloo)", 2, "nproc", expect="DDP")]
    import torch

    sides = [Side("1", "1 GPU", 1, "plain"),
             Side("fsdp", "1 GPU, FSDP2 over one rank", 1, "torchrun", (args.fsdp_override,), expect="FSDP2")]
    if torch.cuda.device_count() >= 2:
        sides.append(Side("2", "2 GPUs, DDP (nccl)", 2, "nproc", expect="DDP"))
    return sides


# --------------------------------------------------------------------------------- inputs
def prepare_data(args: argparse.Namespace, tmp: Path) -> tuple[Path, int, str]:
    """(shard directory, its vocabulary size, where the text came from): --data, or the stdlib docs tokenized here."""
    if args.data:
        meta = json.loads((Path(args.data) / "meta.json").read_text())
        return Path(args.data), int(meta["vocab_size"]), args.data
    from haina.data.stdlib_corpus import build_stdlib_corpus
    from haina.data.tokenize import tokenize_to_shards
    from haina.model import ModelConfig
    from haina.tokenizer.train import train_bpe

    texts = build_stdlib_corpus()
    vocab = min(ModelConfig.from_name(args.preset).vocab_size, 4096)  # what 2 M characters afford
    tokenizer = train_bpe(texts, vocab_size=vocab)
    tokenize_to_shards(texts, tokenizer, tmp / "data", val_fraction=0.02)
    return tmp / "data", tokenizer.vocab_size, "the standard library's documentation (stdlib_corpus)"


def write_recipe(args: argparse.Namespace, data: Path, vocab: int, tmp: Path) -> tuple[Path, int]:
    """(the pretraining recipe every side runs, its block size): --preset, per-process batch, no evaluation between
    the steps."""
    from haina.model import ModelConfig

    preset = ModelConfig.from_name(args.preset)
    block = args.block_size or preset.block_size
    recipe = {
        "model": {"preset": args.preset, "vocab_size": max(vocab, preset.vocab_size), "block_size": block,
                  "dropout": 0.0},
        "data": {"dir": str(data)},
        "train": {"batch_size": args.batch_size, "block_size": block, "max_steps": args.steps, "warmup_steps": 0,
                  "schedule": "constant", "eval_every": args.steps + 1, "eval_batches": 1, "log_every": 1,
                  "save_every": 0, "keep_last": 1, "device": "cuda" if args.gpu else "cpu",
                  "precision": args.precision, "compile": args.compile, "tensorboard": False, "seed": 0},
    }
    path = tmp / "scaling.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, block


# --------------------------------------------------------------------------------- one run
def command(side: Side, recipe: Path, data: Path, out: Path) -> list[str]:
    haina = ["-m", "haina", "pretrain", "--config", str(recipe), "--data", str(data), "--out", str(out),
             *(f"--{o}" for o in side.overrides)]
    if side.launch == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(side.processes), *haina]
    return [sys.executable, *haina, *(["--nproc", str(side.processes)] if side.launch == "nproc" else [])]


def steady_tokens_per_sec(run: Path, warmup: int) -> tuple[float, float]:
    """(tokens/s, ms/step) over the train records after the first `warmup` steps of RUN/metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "tokens_per_sec" in r]
    tokens = seconds = 0.0
    prev = next((r["tokens"] for r in train if r["step"] == warmup), 0 if warmup == 0 else None)
    if prev is None:
        raise SystemExit(f"{run}: no record of step {warmup}; lower --warmup below --steps")
    timed = [r for r in train if r["step"] > warmup]
    for r in timed:
        delta = r["tokens"] - prev
        tokens, seconds, prev = tokens + delta, seconds + delta / r["tokens_per_sec"], r["tokens"]
    if not timed:
        raise SystemExit(f"{run}: no steps after the {warmup} warm-up ones; raise --steps")
    return tokens / seconds, 1000 * seconds / len(timed)


def run_side(side: Side, args: argparse.Namespace, recipe: Path, data: Path, tmp: Path, round_index: int) -> dict:
    """One run of `side`: its steady tokens/s and report, or {"error": why it was not measured}."""
    out = tmp / f"run-{side.key}-{round_index}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # per process; haina's --nproc keeps a set value
    r = subprocess.run(command(side, recipe, data, out), capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")] or r.stderr.splitlines()[-3:]
        return {"error": " / ".join(lines) or f"exit status {r.returncode}"}
    report = json.loads((out / "report.json").read_text())
    ranks = report.get("ranks", "")
    if (side.expect and side.expect not in ranks) or (not side.expect and ranks):
        return {"error": f"trained as {ranks or '1 process without a mesh'}, not as {side.label} (report.json)"}
    tps, ms = steady_tokens_per_sec(out, args.warmup)
    return {"tokens_per_sec": tps, "ms_per_step": ms, "report_tokens_per_sec": report["tokens_per_sec"],
            "tokens_per_step": report["tokens_per_step"], "ranks": ranks or "1 process", "params": report["params"],
            "mfu": report.get("mfu")}


# --------------------------------------------------------------------------------- the table
def machine(args: argparse.Namespace) -> str:
    import torch

    if args.gpu:
        count = torch.cuda.device_count()
        where = f"{count} × {torch.cuda.get_device_name(0)}" if count else "no CUDA device"
    else:
        where = f"{cpu_model()} ({os.cpu_count()} CPUs)"
    return (f"{datetime.date.today()} · {where} · torch {torch.__version__} · Python {platform.python_version()} · "
            f"{args.threads} thread{'s' if args.threads != 1 else ''} per process")


def print_table(args: argparse.Namespace, sides: list[Side], results: dict[str, list[dict]], source: str, block: int,
                load: tuple[float, float]) -> dict:
    """The markdown table and the ratios; returns them for --json."""
    def col(key: str, field: str) -> list[float]:
        return [r[field] for r in results[key] if field in r]

    first = next((r for rs in results.values() for r in rs if "params" in r), {})
    print(f"\n## Data-parallel scaling of `haina pretrain`\n\n{machine(args)}\n")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/scaling.py', *sys.argv[1:]])}`\n")
    print(f"Model: preset {args.preset}, {first.get('params', 0) / 1e6:.2f}M parameters, {args.precision}"
          f"{', compiled' if args.compile else ''}; {args.batch_size} rows × {block} tokens per process; {args.steps} "
          f"steps per run, the first {args.warmup} untimed; {args.rounds} interleaved round{'s' if args.rounds != 1 else ''}; "
          f"data: {source}. Load average {load[0]:.1f} before, {load[1]:.1f} after.\n")
    print("| side | processes × threads | tokens/step | tokens/s: median (min–max, rounds) | ms/step | "
          "whole-run tokens/s (report.json) |")
    print("|---|---:|---:|---:|---:|---:|")
    summary: dict = {"sides": {}}
    for s in sides:
        errors = [r["error"] for r in results[s.key] if "error" in r]
        if errors:
            print(f"| {s.label} | {s.processes} × {args.threads} | | not measured: {errors[0]} | | |")
            summary["sides"][s.key] = {"label": s.label, "error": errors[0]}
            continue
        tps = Spread.of(col(s.key, "tokens_per_sec"))
        step_tokens = results[s.key][0]["tokens_per_step"]
        print(f"| {s.label} | {s.processes} × {args.threads} | {step_tokens:,} | {tps.text(',.0f')} | "
              f"{Spread.of(col(s.key, 'ms_per_step')).median:,.1f} | "
              f"{Spread.of(col(s.key, 'report_tokens_per_sec')).median:,.0f} |")
        summary["sides"][s.key] = {"label": s.label, "tokens_per_sec": asdict(tps), "tokens_per_step": step_tokens,
                                   "ms_per_step": Spread.of(col(s.key, "ms_per_step")).median}
    one = col("1", "tokens_per_sec")
    print()
    for key, name in (("2", "Scaling efficiency, tokens/s(2) / (2 × tokens/s(1))"),
                      ("fsdp", "FSDP2 over one rank / plain, tokens/s (1 − this is FSDP2's overhead)")):
        other = col(key, "tokens_per_sec") if key in results else []
        if not other or len(other) != len(one):
            continue
        ratio = ratios(other, [(2 if key == "2" else 1) * x for x in one])
        print(f"{name}: {ratio.text(unit='×' if key == 'fsdp' else '')}")
        summary[key] = asdict(ratio)
    return summary


# --------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a `haina data tokenize` directory (default: the stdlib docs, "
                                                "tokenized here)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--block-size", type=int, default=0, help="tokens per row (0: the preset's context)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per process per step")
    p.add_argument("--steps", type=int, default=30, help="steps per run")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of its tokens/s")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads in every process (default: half the CPUs, so that 2 processes fit)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="train.compile=true on every side")
    p.add_argument("--gpu", action="store_true", help="1 GPU plain vs 1 GPU FSDP2 (and 2 GPUs DDP when there are 2)")
    p.add_argument("--fsdp-override", default=FSDP_ONE_RANK,
                   help=f"with --gpu: the dotted option that makes haina shard over one rank (default {FSDP_ONE_RANK})")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the per-round results and ratios here")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1 or not 0 <= args.warmup < args.steps:
        p.error("--steps and --rounds must be at least 1, and --warmup below --steps")
    sides = sides_for(args)
    with tempfile.TemporaryDirectory(prefix="haina-bench-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        data, vocab, source = prepare_data(args, tmp)
        recipe, block = write_recipe(args, data, vocab, tmp)
        load_before = load_average()
        results: dict[str, list[dict]] = {s.key: [] for s in sides}
        for r in range(args.rounds):
            for s in round_order(sides, r):
                if results[s.key] and "error" in results[s.key][0]:
                    continue  # a side that cannot run as asked fails the same way every round
                res = run_side(s, args, recipe, data, tmp, r)
                results[s.key].append(res)
                print(f"round {r + 1}/{args.rounds}: {s.label}: "
                      + (f"not measured: {res['error']}" if "error" in res else
                         f"{res['tokens_per_sec']:,.0f} tokens/s ({res['ranks']})"), file=sys.stderr, flush=True)
        summary = print_table(args, sides, results, source, block, (load_before, load_average()))
    if args.json:
        from haina.core.io import write_json

        write_json(args.json, {"machine": machine(args), "args": vars(args), "results": results, **summary})


if __name__ == "__main__":
    main()
