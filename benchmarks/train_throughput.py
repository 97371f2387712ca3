"""Training throughput of model presets on this machine, through the real training step.

Measures `Trainer.train_step` (forward, backward, clipping, AdamW) on random tokens and prints a
markdown table: tokens/s, ms/step, MFU and peak memory (GPU: allocated by torch; CPU: the
process's peak resident set, which only grows from one preset to the next). Each preset is timed
in --rounds rounds of --steps steps; the table gives the median round with the range of all.

MFU on a GPU is against the datasheet's dense peak. On a CPU it is against the theoretical fp32
peak (cores × FMA lanes × FMA units × 2 × clock, its inputs printed) and, beside it, against the
best fp32 matmul torch reaches here: the first says how much of the silicon the model uses, the
second how much of what the BLAS library gets out of it.

With --nanogpt DIR (a checkout of nanoGPT that you provide; this project holds none of its code), the
preset (default gpt2-124m) is trained beside nanoGPT's own `bench.py` configuration in one process:
nanoGPT's `GPT` from DIR/model.py with the same shapes, bias and batch, its `configure_optimizers` (AdamW,
weight decay 1e-2, lr 1e-4, betas 0.9/0.95; fused on CUDA) and bench.py's loop (forward with targets
under autocast, next batch fetched before backward, `loss.item()` every step), to which gradient clipping
at 1.0 is added as in nanoGPT's train.py. haina's side is `Trainer.train_step` with the same optimizer
settings and clipping. Both draw random token batches on the CPU, pinned and copied without blocking,
and both are compiled alike (--compile). Rounds alternate the two sides, the order reversed every other
round; the ratio is taken within each round. Peak memory of a side is the most torch allocated during
its rounds less what the other sides hold between steps (parameters, gradients and optimizer state).
--loss-outside-too adds haina with its loss computed after the compiled model, as before it was compiled
with it (the fp32 full-vocabulary logits outside the graph), to measure that change in the same run.
--haina-variants adds haina sides with other train settings (`attention=cudnn`,
`compile_mode=max-autotune-no-cudagraphs`, `packed_linears=false`), to measure a lever against the same peer in the
same run.

    .venv/bin/python benchmarks/train_throughput.py                      # tiny and small, auto device
    .venv/bin/python benchmarks/train_throughput.py --presets gpt2-124m --precision bf16 --compile \
        --batch-size 16 --block-size 1024
    .venv/bin/python benchmarks/train_throughput.py --nanogpt ~/nanoGPT --precision bf16 --compile \
        --batch-size 16 --block-size 1024 --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
from rounds import Spread, cpu_model, load_average, ratios, round_order

from haina.core.device import autocast, cpu_peak, measured_matmul_flops, peak_flops, resolve_device
from haina.model import ModelConfig, Transformer
from haina.train.config import TrainConfig
from haina.train.trainer import Trainer


class RandomTokens:
    """Uniform random token windows: throughput does not depend on what the tokens are."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_batch(self, batch_size, block_size, generator):
        buf = torch.randint(self.vocab_size, (batch_size, block_size + 1), generator=generator)
        # Contiguous, as TokenShards gives them: the trainer pins them and copies them to CUDA without blocking,
        # and a strided view would be made contiguous in pageable memory first (a synchronous copy per step).
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

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


# --------------------------------------------------------------------------------- beside nanoGPT
# nanoGPT's bench.py optimizer settings; haina's side takes the same ones.
BENCH_OPTIM = {"weight_decay": 1e-2, "lr": 1e-4, "betas": (0.9, 0.95)}
GRAD_CLIP = 1.0  # nanoGPT's train.py default; bench.py does not clip, haina's trainer does


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Device bytes a side keeps between steps: parameters, buffers, gradients, optimizer state."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def typed_settings(settings: dict[str, str]) -> dict[str, object]:
    """--haina-variants values converted to TrainConfig's field types (packed_linears=false is False)."""
    import dataclasses
    import typing

    from haina.core.config import coerce

    hints = typing.get_type_hints(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise SystemExit(f"--haina-variants: unknown train settings {', '.join(unknown)}")
    return {k: coerce(v, hints[k], f"train.{k}") for k, v in settings.items()}


class HainaSide:
    """haina's `Trainer.train_step` with bench.py's optimizer settings.

    `loss_in_graph=False` runs the loss after the compiled model instead of inside its graph (haina before
    the loss was compiled with the model), to measure that change in the same run.
    """

    def __init__(self, cfg: ModelConfig, args: argparse.Namespace, run_dir: str, loss_in_graph: bool = True,
                 variant: dict[str, str] | None = None):
        self.name = "haina" if loss_in_graph else "haina, loss outside the graph"
        if variant:
            self.name = "haina, " + ", ".join(f"{k}={v}" for k, v in variant.items())
        self.model = Transformer(cfg)
        train = TrainConfig(batch_size=args.batch_size, block_size=cfg.block_size, device=args.device,
                            precision=args.precision, compile=args.compile, warmup_steps=0, schedule="constant",
                            tensorboard=False, lr=BENCH_OPTIM["lr"], min_lr=BENCH_OPTIM["lr"],
                            weight_decay=BENCH_OPTIM["weight_decay"], beta1=BENCH_OPTIM["betas"][0],
                            beta2=BENCH_OPTIM["betas"][1], grad_clip=GRAD_CLIP, **(variant or {}))
        self.trainer = Trainer(self.model, train, run_dir, train_data=RandomTokens(cfg.vocab_size))
        if not loss_in_graph:
            self.trainer._compiled_loss = None

    def step(self) -> float:
        return self.trainer.train_step(BENCH_OPTIM["lr"])["loss"]

    def held(self) -> int:
        return held_bytes(self.trainer.model, self.trainer.optimizer)


class NanoGPTSide:
    """nanoGPT's `GPT` and `configure_optimizers` from DIR/model.py, stepped as its bench.py steps them."""

    name = "nanoGPT bench.py"

    def __init__(self, directory: str, cfg: ModelConfig, args: argparse.Namespace):
        path = os.path.join(os.path.expanduser(directory), "model.py")
        if not os.path.isfile(path):
            raise SystemExit(f"--nanogpt {directory}: no model.py there; pass a checkout of karpathy/nanoGPT")
        spec = importlib.util.spec_from_file_location("nanogpt_model", path)
        nano = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nano)
        self.device = resolve_device(args.device)
        conf = nano.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts and optimizer choices
            self.raw = nano.GPT(conf).to(self.device)
            self.optimizer = self.raw.configure_optimizers(
                weight_decay=BENCH_OPTIM["weight_decay"], learning_rate=BENCH_OPTIM["lr"],
                betas=BENCH_OPTIM["betas"], device_type=self.device.type)
        self.model = torch.compile(self.raw) if args.compile else self.raw
        self.precision = args.precision
        self.data, self.batch_size, self.block = RandomTokens(cfg.vocab_size), args.batch_size, cfg.block_size
        self.generator = torch.Generator().manual_seed(1337)
        self.batch = self.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.get_batch(self.batch_size, self.block, self.generator)
        if self.device.type == "cuda":  # as bench.py's real-data path: pinned, copied without blocking
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def step(self) -> float:
        x, y = self.batch
        with autocast(self.device, self.precision):
            _, loss = self.model(x, y)
        self.batch = self.next_batch()  # bench.py fetches the next batch while the GPU runs the forward
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), GRAD_CLIP)
        self.optimizer.step()
        return loss.item()

    def held(self) -> int:
        return held_bytes(self.raw, self.optimizer)


def compare_nanogpt(args: argparse.Namespace) -> None:
    """haina beside nanoGPT's bench.py configuration, interleaved rounds in one process; prints the table."""
    device = resolve_device(args.device)
    preset = args.presets[0]
    block = args.block_size or ModelConfig.from_name(preset).block_size
    cfg = ModelConfig.from_name(preset, block_size=block, dropout=0.0,
                                **({} if args.bias is None else {"bias": args.bias == "true"}))
    if (cfg.norm, cfg.pos, cfg.mlp, cfg.kv_heads, cfg.tie_embeddings) != ("layernorm", "learned", "gelu", cfg.n_head,
                                                                          True):
        raise SystemExit(f"--nanogpt needs a GPT-2-shaped preset (layernorm, learned positions, gelu, tied); "
                         f"{preset} is not one")
    if device.type == "cuda":  # bench.py sets these process-wide; they apply to both sides alike
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"# Training throughput beside nanoGPT: {name}, torch {torch.__version__}, Python "
          f"{platform.python_version()}, {args.precision}{', compiled' if args.compile else ''}, {datetime.date.today()}")
    print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/train_throughput.py', *sys.argv[1:]])}`\n")
    print(f"Both: {preset} shapes ({cfg.n_layer} layers, {cfg.n_head} heads, d={cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"context {block}), bias={cfg.bias}, dropout 0, tied embeddings; batch {args.batch_size} × {block} random "
          f"tokens; AdamW (weight decay {BENCH_OPTIM['weight_decay']:g}, lr {BENCH_OPTIM['lr']:g}, betas "
          f"{BENCH_OPTIM['betas']}){', fused' if device.type == 'cuda' else ''}; gradient clipping at {GRAD_CLIP:g}; "
          f"one host sync per step; {args.warmup} warm-up steps each, then {args.rounds} interleaved rounds of "
          f"{args.steps} steps. nanoGPT's GELU is exact, haina's the tanh form GPT-2 used.\n", flush=True)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        sides = [HainaSide(cfg, args, tmp), NanoGPTSide(args.nanogpt, cfg, args)]
        if args.loss_outside_too and args.compile:
            sides.append(HainaSide(cfg, args, os.path.join(tmp, "outside"), loss_in_graph=False))
        for v, spec in enumerate(args.haina_variants or []):
            variant = typed_settings(dict(item.split("=", 1) for item in spec.split(",")))
            sides.append(HainaSide(cfg, args, os.path.join(tmp, f"variant{v}"), variant=variant))
        flops_per_token = sides[0].trainer.flops_per_token
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for side in sides:  # compilation, allocator and kernel selection happen here
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                side.step()
            sync()
            print(f"{side.name}: {args.warmup} warm-up steps (compilation included) took "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        per_round: list[list[float]] = [[] for _ in sides]  # seconds per step
        peak = [0] * len(sides)
        for r in range(args.rounds):
            for i in round_order(range(len(sides)), r):
                other = sum(s.held() for j, s in enumerate(sides) if j != i)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    loss = sides[i].step()
                sync()
                per_round[i].append((time.perf_counter() - t0) / args.steps)
                if device.type == "cuda":
                    peak[i] = max(peak[i], torch.cuda.max_memory_allocated(device) - other)
            print(f"round {r + 1}: " + ", ".join(f"{s.name} {per_round[j][-1] * 1000:.1f} ms/step"
                                                  for j, s in enumerate(sides)) + f" (last loss {loss:.3f})", flush=True)
    tokens = args.batch_size * block
    peak_fl = peak_flops(device, args.precision)
    print("\n| side | ms/step (median) | tokens/s: median (min–max, rounds) | MFU (haina's formula) | peak memory |")
    print("|---|---:|---:|---:|---:|")
    for i, side in enumerate(sides):
        tps = [tokens / x for x in per_round[i]]
        mem = f"{peak[i] / 2**30:.2f} GiB" if device.type == "cuda" else "n/a on CPU"
        print(f"| {side.name} | {statistics.median(per_round[i]) * 1000:.1f} | {Spread.of(tps).text(',.0f')} | "
              f"{statistics.median(tps) * flops_per_token / peak_fl:.1%} | {mem} |")
    for j in range(1, len(sides)):
        ratio = ratios([tokens / x for x in per_round[0]], [tokens / x for x in per_round[j]])
        print(f"| **haina / {sides[j].name}** | | {ratio.text(unit='×')} | | "
              + (f"{peak[0] / peak[j]:.2f}× |" if device.type == "cuda" and peak[j] else "|"))
    for j in range(2, len(sides)):  # each further haina side against the peer too
        ratio = ratios([tokens / x for x in per_round[j]], [tokens / x for x in per_round[1]])
        print(f"| **{sides[j].name} / {sides[1].name}** | | {ratio.text(unit='×')} | | "
              + (f"{peak[j] / peak[1]:.2f}× |" if device.type == "cuda" and peak[1] else "|"))
    print(f"\nMFU = tokens/s × {flops_per_token / 1e6:,.1f} MFLOP/token (6·N + 6·L·d·T, the same model on both "
          f"sides) / {peak_fl / 1e12:,.3g} TFLOP/s peak. Peak memory: the most torch allocated during a side's rounds "
          f"less what the other sides hold between steps. Load average {load_before:.1f} before, "
          f"{load_average():.1f} after ({os.cpu_count()} CPUs).")
    if device.type == "cuda":
        print(f"Whole process: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help="default: tiny and small; gpt2-124m with --nanogpt")
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
    p.add_argument("--nanogpt", metavar="DIR", default=None,
                   help="a nanoGPT checkout: train the first preset beside its bench.py configuration")
    p.add_argument("--loss-outside-too", action="store_true",
                   help="with --nanogpt and --compile: a third side, haina with its loss after the compiled model")
    p.add_argument("--haina-variants", nargs="+", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="with --nanogpt: more haina sides with these train settings, e.g. attention=cudnn "
                        "compile_mode=max-autotune-no-cudagraphs")
    p.add_argument("--bias", choices=["true", "false"], default=None,
                   help="biases in linears and norms, both sides (default: the preset's; bench.py uses false)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.presets is None:
        args.presets = ["gpt2-124m"] if args.nanogpt else ["tiny", "small"]
    if args.nanogpt:
        compare_nanogpt(args)
        return

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
