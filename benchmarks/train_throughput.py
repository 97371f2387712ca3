"""Training throughput of model presets on this machine, through the real training step.

Measures `Trainer.train_step` (forward, backward, clipping, AdamW) on random tokens and prints a
markdown table: tokens/s, ms/step, MFU and peak memory (GPU: allocated by torch; CPU: the
process's peak resident set, which only grows from one preset to the next). Each preset is timed
in --rounds rounds of --steps steps; the table gives the median round with the range of all.

MFU on a GPU is against the datasheet's dense peak. On a CPU it is against the theoretical fp32
peak (cores × FMA lanes × FMA units × 2 × clock, its inputs printed) and, beside it, against the
best fp32 matmul torch reaches here: the first says how much of the silicon the model uses, the
second how much of what the BLAS library gets out of it.

    .venv/bin/python benchmarks/train_throughput.py                      # tiny and small, auto device
    .venv/bin/python benchmarks/train_throughput.py --presets gpt2-124m --precision bf16 --compile \
        --batch-size 16 --block-size 1024
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
from rounds import Spread, cpu_model, load_average

from haina.core.device import cpu_peak, measured_matmul_flops, peak_flops, resolve_device
from haina.model import ModelConfig, Transformer
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer


class RandomTokens:
    """Uniform random token windows: throughput does not depend on what the tokens are."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_batch(self, batch_size, block_size, generator):
        buf = torch.randint(self.vocab_size, (batch_size, block_size + 1), generator=generator)
        return buf[:, :-1], buf[:, 1:]

    def eval_batches(self, batch_size, block_size, max_batches=None):
        return iter(())


def measure(preset: str, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    block = args.block_size or ModelConfig.from_name(preset).block_size
    model = Transformer(ModelConfig.from_name(preset, block_size=max(block, 1)))
    cfg = TrainConfig(batch_size=args.batch_size, block_size=block, grad_accum=args.grad_accum, device=args.device,
                      precision=args.precision, compile=args.compile, warmup_steps=0, schedule="constant",
                      tensorboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, tmp, train_data=RandomTokens(model.cfg.vocab_size))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):  # compilation, allocator and kernel selection happen here
            trainer.train_step(cfg.lr)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        per_round = []  # seconds per step, one figure per round
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = trainer.train_step(cfg.lr)
            float(out["loss"])
            sync()
            per_round.append((time.perf_counter() - t0) / args.steps)
        seconds = statistics.median(per_round)
        tps = cfg.tokens_per_step / seconds
        if device.type == "cuda":
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        else:
            mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"
        return {"preset": preset, "params": model.num_params(), "tokens/step": cfg.tokens_per_step,
                "ms/step": seconds * 1000, "tokens/s": Spread.of([cfg.tokens_per_step / x for x in per_round]),
                "flops/s": tps * trainer.flops_per_token, "memory": mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256, help="0: the preset's context length")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per preset: the table gives the median round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); the theoretical peak counts this many cores")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load_before = load_average()
    print(f"# Training throughput: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{datetime.date.today()}")
    print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/train_throughput.py', *sys.argv[1:]])}`\n")
    # The peaks are worked out before any timing: the measured one runs matmuls of its own.
    theory = cpu_peak() if device.type == "cpu" else None
    measured = measured_matmul_flops(device) if device.type == "cpu" else None
    peak = theory.flops if theory else peak_flops(device, args.precision)
    cols = ("MFU (theoretical peak) | MFU (measured matmul) |" if measured else "MFU |")
    print(f"| preset | params | tokens/step | ms/step | tokens/s: median (min–max, rounds) | {cols} peak memory |")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if measured else "") + "---:|")
    for preset in args.presets:
        r = measure(preset, args)
        mfu = f"{r['flops/s'] / peak:.1%} |" + (f" {r['flops/s'] / measured:.1%} |" if measured else "")
        print(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['tokens/step']:,} | {r['ms/step']:.1f} | "
              f"{r['tokens/s'].text(',.0f')} | {mfu} {r['memory']} |", flush=True)
    print()
    print(f"MFU = tokens/s (median round) × (6·N + 6·L·d·T) / peak FLOP/s. Load average {load_before:.1f} before, "
          f"{load_average():.1f} after ({os.cpu_count()} CPUs).")
    if theory:
        print(f"\nTheoretical fp32 peak: {theory.describe()}.")
    elif device.type == "cpu":
        print("\nTheoretical fp32 peak: unknown for this CPU (not Linux on x86); MFU is against the measured matmul.")
    if measured:
        share = f", {measured / theory.flops:.0%} of the theoretical peak" if theory else ""
        print(f"\nMeasured matmul: {measured / 1e9:,.0f} GFLOP/s (best of 5 fp32 1024×1024 matmuls on "
              f"{torch.get_num_threads()} threads{share}).")


if __name__ == "__main__":
    main()
