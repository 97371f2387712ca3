"""Training throughput of model presets on this machine, through the real training step.

Measures `Trainer.train_step` (forward, backward, clipping, AdamW) on random tokens and prints a
markdown table: tokens/s, ms/step, MFU and peak memory (GPU: allocated by torch; CPU: the
process's peak resident set, which only grows from one preset to the next).

    .venv/bin/python benchmarks/train_throughput.py                      # tiny and small, auto device
    .venv/bin/python benchmarks/train_throughput.py --presets gpt2-124m --precision bf16 --compile \
        --batch-size 16 --block-size 1024
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import tempfile
import time

import torch

from haina.core.device import resolve_device
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
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = trainer.train_step(cfg.lr)
        float(out["loss"])
        sync()
        seconds = (time.perf_counter() - t0) / args.steps
        tps = cfg.tokens_per_step / seconds
        if device.type == "cuda":
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        else:
            mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"
        return {"preset": preset, "params": model.num_params(), "tokens/step": cfg.tokens_per_step,
                "ms/step": seconds * 1000, "tokens/s": tps,
                "mfu": tps * trainer.flops_per_token / trainer.peak_flops, "memory": mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256, help="0: the preset's context length")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"# Training throughput: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.precision}{', compiled' if args.compile else ''}, {datetime.date.today()}")
    print()
    print("| preset | params | tokens/step | ms/step | tokens/s | MFU | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        r = measure(preset, args)
        print(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['tokens/step']:,} | {r['ms/step']:.1f} | "
              f"{r['tokens/s']:,.0f} | {r['mfu']:.1%} | {r['memory']} |", flush=True)
    print()
    print("MFU = tokens/s × (6·N + 6·L·d·T) / peak FLOP/s; on CPU the peak is a measured fp32 matmul.")


if __name__ == "__main__":
    main()
