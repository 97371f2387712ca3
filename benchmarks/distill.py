"""Distillation against plain training: the same student, steps and data, with and without a teacher.

For each seed, a fresh student of --preset (with the teacher's vocabulary and tokenizer) is trained on --data
twice through `haina finetune distill`'s own `run_distill`: once with α = 0 (the labels alone; the teacher is not
consulted, which is exactly plain training) and once with the teacher's soft targets (--alpha, --temperature,
--top-k). Everything else (seed, initialization, batches, schedule) is the same, so the difference in the
students' validation loss is the teacher's doing. The table gives one row per seed, the difference last
(negative: the teacher helped); with several seeds, a last line gives the median difference and its range.

Inputs: a teacher checkpoint or run, and token shards written with its tokenizer. `haina quickstart` makes
both (a ~4M-parameter model pretrained on the Python documentation, and its shards):

    .venv/bin/haina quickstart --out runs/quickstart          # teacher: runs/quickstart, shards: runs/quickstart/data
    .venv/bin/python benchmarks/distill.py --teacher runs/quickstart --data runs/quickstart/data
    .venv/bin/python benchmarks/distill.py --teacher runs/quickstart --data runs/quickstart/data --steps 1000 \\
        --alpha 0.7 --temperature 2 --seeds 1 2 3 --device cuda

Nothing is written into the repository: the runs go into a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from rounds import Spread, cpu_model, load_average, round_order

from haina.core.device import resolve_device
from haina.core.log import setup_logging
from haina.finetune.config import FinetuneConfig
from haina.finetune.distill import run_distill
from haina.model.checkpoint import resolve_checkpoint


def train_student(args: argparse.Namespace, seed: int, alpha: float, out: Path) -> dict:
    """One distillation run's report: a fresh --preset student, `alpha` of the teacher's soft targets."""
    cfg = FinetuneConfig.from_dict({
        "method": "distill", "preset": args.preset, "out": str(out),
        "data": {"train": [args.data]},
        "distill": {"teacher": args.teacher, "alpha": alpha, "temperature": args.temperature, "top_k": args.top_k},
        "train": {"batch_size": args.batch_size, "block_size": args.block_size or None, "max_steps": args.steps,
                  "lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": min(args.warmup, args.steps),
                  "weight_decay": 0.1, "beta2": 0.99, "precision": args.precision, "device": args.device,
                  "seed": seed, "eval_every": args.steps, "eval_batches": args.eval_batches,
                  "log_every": args.steps, "save_every": 0, "keep_last": 1, "tensorboard": False},
    })
    return run_distill(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint or run directory (e.g. runs/quickstart)")
    p.add_argument("--data", required=True, help="token shards written with the teacher's tokenizer "
                                                  "(e.g. runs/quickstart/data)")
    p.add_argument("--preset", default="tiny", help="the student's model preset")
    p.add_argument("--steps", type=int, default=300, help="training steps of each student")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's soft targets")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=0, help="0: live teacher; k: its top-k logits precomputed once")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=0, help="0: the smaller of the two models' contexts")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine down to a tenth of it)")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches (windows spread over the val split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one student pair per seed")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="show the training logs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging()
    if not args.verbose:
        logging.getLogger("haina").setLevel(logging.WARNING)

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load_before = load_average()
    print(f"# Distillation: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {args.precision}, {datetime.date.today()}")
    print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/distill.py', *sys.argv[1:]])}`\n")
    print(f"Teacher: {resolve_checkpoint(args.teacher)}; data: {args.data}\n")
    print("| student | params | seed | steps | α | T | top-k | teacher val loss | val loss without teacher | "
          "val loss with teacher | difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    differences, seconds = [], {"without": 0.0, "with": 0.0}
    with tempfile.TemporaryDirectory(prefix="haina-distill-") as tmp:
        # One step untimed first: imports and allocator warm-up would otherwise count against the first side.
        train_student(argparse.Namespace(**{**vars(args), "steps": 1}), args.seeds[0], args.alpha, Path(tmp) / "warm")
        for i, seed in enumerate(args.seeds):
            reports = {}
            for side in round_order(["without", "with"], i):  # neither side always pays the first run's imports
                t0 = time.perf_counter()
                reports[side] = train_student(args, seed, args.alpha if side == "with" else 0.0, Path(tmp) / f"{side}-{seed}")
                seconds[side] += time.perf_counter() - t0
            plain, taught = reports["without"], reports["with"]
            diff = taught["val_loss"] - plain["val_loss"]
            differences.append(diff)
            teacher_loss = taught["distill"]["teacher_val_loss"]
            print(f"| {args.preset} | {plain['params'] / 1e6:.2f}M | {seed} | {plain['steps']} | {args.alpha:g} | "
                  f"{args.temperature:g} | {args.top_k or 'all'} | {teacher_loss:.4f} | {plain['val_loss']:.4f} | "
                  f"{taught['val_loss']:.4f} | {diff:+.4f} |", flush=True)
    print()
    if len(differences) > 1:
        print(f"Difference (with − without teacher), median over seeds: {Spread.of(differences).text('+.4f', what='seed')}")
    runs = len(args.seeds)
    print(f"Training time per student: {seconds['without'] / runs:.1f} s without the teacher, "
          f"{seconds['with'] / runs:.1f} s with it. Validation: the student's cross-entropy on "
          f"{args.eval_batches} batches of windows spread over the val split. Load average {load_before:.1f} before, "
          f"{load_average():.1f} after.")


if __name__ == "__main__":
    main()
