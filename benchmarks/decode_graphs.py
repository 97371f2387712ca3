"""Decode with CUDA graphs (`haina.generate.graphs.DecodeGraphs`) against the engine's eager decode, in one run.

For each model (GPT-2 124M and the llama-1b preset, random weights, in --dtype):
1. Correctness: greedy tokens of the graph step and of the engine's decode call today (`KVCache.bind`,
   `Transformer.decode`, `commit`) over --check-steps steps at batch 1 and 8, rows of different prompt lengths;
   also the graph step against the very same step run eagerly (bit for bit: a replay runs its kernels). The
   check runs in float32 first, where the two paths must agree, then in --dtype, where a near tie between the two
   best logits can fall either way after kernels that round differently: a divergence is reported with the
   eager path's gap between its two best logits at that step.
2. Speed: decode tokens/s at each --batch-sizes over --steps steps after a --prompt-len prompt, both sides doing
   what the engine's decode does per step (tokens in, greedy `sample_tokens`, tokens back to the host), in
   --rounds interleaved rounds (order reversed every other round) after one warm-up round; medians, and the
   speedup per round as its median and range. With an engine that carries the graphs (`Engine._graphs`), the
   engine's own `generate` is measured the same way, graphs on and off.
3. The memory-bandwidth bound: B / ((weights + B · KV bytes read per step) / copy bandwidth), the weights and KV
   counted as `benchmarks/generate.py` counts them, the bandwidth from a 1 GiB device-to-device copy.

    .venv/bin/python benchmarks/decode_graphs.py                        # CUDA, bf16, gpt2-124m and llama-1b
    .venv/bin/python benchmarks/decode_graphs.py --device cpu --quick   # the same code eagerly on a tiny model
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from rounds import cpu_model, ratios, round_order

from haina.core.device import resolve_device
from haina.generate import Engine, KVCache, SamplingParams
from haina.generate.graphs import DecodeGraphs
from haina.generate.head import DecodeHead
from haina.generate.sampling import RowState, sample_tokens
from haina.model import ModelConfig, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GREEDY = SamplingParams(temperature=0, max_new_tokens=1 << 20, ignore_eos=True)
QUICK = {"vocab_size": 512, "block_size": 512, "n_layer": 2, "n_head": 4, "n_embd": 64}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights, initialized on the device (a 1B model's init takes long on a CPU)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", **QUICK) if preset == "quick" else ModelConfig.from_name(preset)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype).eval()


class EagerDecode:
    """The engine's decode call today: host tokens to a tensor, `KVCache.bind`, `Transformer.decode`, `commit`."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache, self.head = model, cache, DecodeHead(model)

    def __call__(self, last: list[int]) -> torch.Tensor:
        n, cache = len(last), self.cache
        idx = torch.tensor([[t] for t in last], device=cache.device)
        positions = cache.bind(0, cache.lengths[:n], 1)
        logits = self.model.decode(idx, positions=positions, cache=cache, head=self.head)
        cache.commit(0, [1] * n)
        return logits


def prefill(model: Transformer, cache: KVCache, prompts: list[list[int]]) -> None:
    """Fill slots 0..B-1 with the prompts (one batched pass when they are of one length, as the engine's)."""
    cache.lengths[:] = [0] * cache.max_batch
    groups = [prompts] if len({len(p) for p in prompts}) == 1 else [[p] for p in prompts]
    row = 0
    for group in groups:
        T = len(group[0])
        positions = cache.bind(row, [0] * len(group), T)
        model.hidden_states(torch.tensor(group, device=cache.device), positions=positions, cache=cache)
        cache.commit(row, [T] * len(group))
        row += len(group)


def greedy(step: Callable[[list[int]], torch.Tensor], prompts: list[list[int]], steps: int,
           gaps: list[list[float]] | None = None) -> list[list[int]]:
    """`steps` greedy tokens per row through `step`, sampled as the engine samples; `gaps` collects top-2 gaps."""
    rows = [RowState(params=GREEDY, tokens=list(p), prompt_len=len(p)) for p in prompts]
    gens = [None] * len(rows)
    last = [p[-1] for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        logits = step(last).float()
        if gaps is not None:
            top = logits.topk(2, dim=-1).values
            gaps.append((top[:, 0] - top[:, 1]).tolist())
        last = sample_tokens(logits, rows, gens).tolist()
        for r, t in zip(rows, last, strict=True):
            r.tokens.append(t)
        for o, t in zip(out, last, strict=True):
            o.append(t)
    return out


def check(model: Transformer, device: torch.device, batch: int, steps: int, gen: torch.Generator) -> str:
    """Greedy tokens of graphs, the same step eagerly, and the engine's decode; one line saying how they compare."""
    cfg = model.cfg
    prompts = [torch.randint(0, cfg.vocab_size, (5 + 7 * i,), generator=gen).tolist() for i in range(batch)]
    max_len = max(map(len, prompts)) + steps
    dtype = next(model.parameters()).dtype
    caches = [KVCache(cfg, batch, max_len, device=device, dtype=dtype) for _ in range(3)]
    graphs = DecodeGraphs(model, caches[1])
    same_code = DecodeGraphs(model, caches[2], use_graphs=False)
    gaps: list[list[float]] = []
    with torch.inference_mode():
        results = []
        for i, step in enumerate((EagerDecode(model, caches[0]), graphs.decode, same_code.decode)):
            prefill(model, caches[i], prompts)
            results.append(greedy(step, prompts, steps, gaps if i == 0 else None))
    eager, graph, static = results
    bits = "same tokens as the same step run eagerly" if graph == static else "**differs from the same step eagerly**"
    if graph == eager:
        return f"identical over {steps} steps ({bits}; {graphs.graphs} graphs)"
    first = min(next(i for i, (a, b) in enumerate(zip(e, g, strict=True)) if a != b)
                for e, g in zip(eager, graph, strict=True) if e != g)
    rows = [r for r, (e, g) in enumerate(zip(eager, graph, strict=True)) if e[first:first + 1] != g[first:first + 1]]
    gap = min(gaps[first][r] for r in rows)
    return (f"**differ** from step {first} (row {rows[0]}; the eager path's top-2 logit gap there: {gap:.3g}) "
            f"({bits})")


def timed(step: Callable[[list[int]], torch.Tensor], model: Transformer, cache: KVCache, prompts: list[list[int]],
          steps: int) -> float:
    """Decode tokens/s of `steps` greedy steps over the prompts (prefill outside the clock)."""
    prefill(model, cache, prompts)
    _sync(cache.device)
    t0 = time.perf_counter()
    greedy(step, prompts, steps)
    _sync(cache.device)
    return len(prompts) * steps / (time.perf_counter() - t0)


def speed(model: Transformer, device: torch.device, batch: int, args: argparse.Namespace,
          gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Per-round decode tokens/s of the eager call and of graphs, interleaved (one warm-up round first)."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    cache = KVCache(cfg, batch, args.prompt_len + args.steps, device=device, dtype=dtype)
    sides = [("eager", EagerDecode(model, cache)), ("graphs", DecodeGraphs(model, cache).decode)]
    got: dict[str, list[float]] = {"eager": [], "graphs": []}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for name, step in round_order(sides, r):
                tps = timed(step, model, cache, prompts, args.steps)
                if r:
                    got[name].append(tps)
    return got["eager"], got["graphs"]


def engine_speed(model: Transformer, batch: int, args: argparse.Namespace,
                 gen: torch.Generator) -> tuple[list[float], list[float], bool] | None:
    """Engine.generate tokens/s with its graphs off and on, if this engine carries them (None if not)."""
    engine = Engine(model, max_batch_size=batch, max_seq_len=args.prompt_len + args.steps + 1)
    if not hasattr(engine, "_graphs"):
        return None
    graphs = engine._graphs
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=args.steps, ignore_eos=True)
    got: dict[str, list[float]] = {"eager": [], "graphs": []}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(args.rounds + 1):
        for name in round_order(["eager", "graphs"], r):
            engine._graphs = graphs if name == "graphs" else None
            _sync(engine.device)
            t0 = time.perf_counter()
            results = engine.generate(prompts, params)
            _sync(engine.device)
            if r:
                got[name].append(batch * args.steps / (time.perf_counter() - t0))
            outputs[name] = [res[0].token_ids for res in results]
    engine._graphs = graphs
    return got["eager"], got["graphs"], outputs["eager"] == outputs["graphs"]


def bandwidth(device: torch.device) -> float:
    """Device memory bandwidth (bytes/s) from a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t0)


def bound(model: Transformer, batch: int, args: argparse.Namespace, bw: float) -> float:
    """Tokens/s if a step only read the weights and the rows' keys and values at the copy bandwidth."""
    dtype = next(model.parameters()).dtype
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kv = KVCache.bytes_per_token(model.cfg, dtype) * (args.prompt_len + args.steps / 2)  # the average context
    return batch * bw / (weights + batch * kv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cpu or auto (on a CPU both sides run eagerly)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-1b"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128, help="decode steps timed per run")
    p.add_argument("--check-steps", type=int, default=128, help="greedy steps compared")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="a tiny model, 2 rounds, few steps: checks that the script runs (e.g. --device cpu)")
    args = p.parse_args()
    if args.quick:
        args.presets, args.batch_sizes, args.check_batch_sizes = ["quick"], [1, 4], [1, 3]
        args.prompt_len, args.steps, args.check_steps, args.rounds = 16, 32, 16, 2
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    gen = torch.Generator().manual_seed(1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    bw = bandwidth(device) if device.type == "cuda" else None
    lines, rows, engine_rows = [], [], []
    for preset in args.presets:
        t0 = time.perf_counter()
        model = build(preset, device, torch.float32)
        for check_dtype in dict.fromkeys([torch.float32, dtype]):
            model = model.to(check_dtype)
            for b in args.check_batch_sizes:
                lines.append(f"- {preset}, {str(check_dtype).removeprefix('torch.')}, batch {b}: "
                             f"{check(model, device, b, args.check_steps, gen)}")
        for b in args.batch_sizes:
            eager, graphs = speed(model, device, b, args, gen)
            limit = bound(model, b, args, bw) if bw else float("nan")
            rows.append((preset, b, eager, graphs, limit))
            measured = engine_speed(model, b, args, gen)
            if measured is not None:
                engine_rows.append((preset, b, *measured))
        lines.append(f"- {preset}: {model.num_params() / 1e6:,.0f}M parameters, checked and timed in "
                     f"{time.perf_counter() - t0:.0f} s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    graphs_on = device.type == "cuda"
    print("\n## Decode with CUDA graphs vs the engine's eager decode\n")
    print(f"{datetime.date.today()} · {where} · torch {torch.__version__} · Python {platform.python_version()} · "
          f"{str(dtype).removeprefix('torch.')} · prompt {args.prompt_len} + {args.steps} greedy steps · "
          f"{args.rounds} interleaved rounds, medians"
          + ("" if graphs_on else " · on a CPU the 'graphs' side is the same static step run eagerly"))
    print(f"\nCommand: `{' '.join(['.venv/bin/python', 'benchmarks/decode_graphs.py', *sys.argv[1:]])}`\n")
    print("Greedy tokens, graphs vs the engine's decode:\n")
    print("\n".join(lines))
    print("\n| model | batch | eager tok/s | graphs tok/s | graphs speedup (median, range) | bandwidth bound tok/s "
          "| graphs / bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset, b, eager, graphs, limit in rows:
        g = statistics.median(graphs)
        limits = (f"{limit:,.0f}", f"{g / limit:.1%}") if bw else ("—", "—")  # no bound measured on a CPU
        print(f"| {preset} | {b} | {statistics.median(eager):,.0f} | {g:,.0f} | {ratios(graphs, eager).text(unit='×')} "
              f"| {limits[0]} | {limits[1]} |")
    if bw:
        print(f"\nBound: B / ((weights + B · KV bytes per token · (prompt + steps / 2)) / {bw / 1e9:,.0f} GB/s, the "
              "measured device-to-device copy bandwidth).")
    if engine_rows:
        print("\n| model | batch | Engine.generate tok/s, graphs off | on | speedup | same tokens |")
        print("|---|---:|---:|---:|---:|---|")
        for preset, b, eager, graphs, same in engine_rows:
            print(f"| {preset} | {b} | {statistics.median(eager):,.0f} | {statistics.median(graphs):,.0f} | "
                  f"{ratios(graphs, eager).text(unit='×')} | {'yes' if same else 'NO'} |")
    else:
        print("\n(This engine has no `_graphs`: Engine.generate was not measured.)")


if __name__ == "__main__":
    main()
