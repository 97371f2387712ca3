"""The engine's KV caches side by side: the fixed one (every slot's whole context reserved up front) against the
paged one (memory follows the tokens held; the CPU default), interleaved rounds in one process.

For each case it prints decode throughput (generated tokens per second of wall time, prefill included), the
per-round ratio paged / fixed as median and range, and the cache's peak memory. Both must give the same greedy
tokens; the script stops if they do not.

    .venv/bin/python benchmarks/kv_cache.py                          # small preset: batch 1, batch 8, mixed
    .venv/bin/python benchmarks/kv_cache.py --cases small:1:16:128 tiny:8:mix:96 --rounds 9

A case is PRESET:BATCH:PROMPT:NEW; PROMPT `mix` sends 4 × BATCH requests with prompts of 4-160 tokens and
8-NEW new tokens through BATCH slots, so requests join and leave while others decode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from rounds import cpu_model

from haina.generate import Engine, SamplingParams
from haina.model import ModelConfig, Transformer

KINDS = ("fixed", "paged")


def workload(cfg: ModelConfig, batch: int, prompt: str, new: int) -> tuple[list[list[int]], list[SamplingParams]]:
    g = torch.Generator().manual_seed(1)
    if prompt == "mix":
        lens = torch.randint(4, 160, (4 * batch,), generator=g).tolist()
        news = torch.randint(8, new, (4 * batch,), generator=g).tolist()
    else:
        lens, news = [int(prompt)] * batch, [new] * batch
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    return prompts, [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in news]


def run(model: Transformer, kind: str, batch: int, prompts, params) -> tuple[float, list[list[int]], int]:
    """Tokens/s of one engine built fresh (the fixed cache pays its allocation, the paged one its growth)."""
    engine = Engine(model, max_batch_size=batch, kv_cache=kind, eos_token_id=None)
    peak = [engine.cache.bytes]
    step = engine.step

    def step_and_measure():
        events = step()
        peak[0] = max(peak[0], engine.cache.bytes)
        return events

    engine.step = step_and_measure
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return sum(sp.max_new_tokens for sp in params) / seconds, [r[0].token_ids for r in results], peak[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["small:1:16:128", "small:8:128:128", "small:8:mix:128"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    for case in args.cases:
        preset, batch, prompt, new = case.split(":")
        cfg = ModelConfig.from_name(preset)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        prompts, params = workload(cfg, int(batch), prompt, int(new))
        tps: dict[str, list[float]] = {k: [] for k in KINDS}
        outs, peaks = {}, {}
        for r in range(args.rounds + 1):  # round 0 warms up; the order alternates
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                t, outs[kind], peaks[kind] = run(model, kind, int(batch), prompts, params)
                if r:
                    tps[kind].append(t)
        if outs["paged"] != outs["fixed"]:
            print(f"{case}: the paged cache gave other tokens than the fixed one", file=sys.stderr)
            return 1
        ratios = [a / b for a, b in zip(tps["paged"], tps["fixed"])]
        rows.append((case, statistics.median(tps["fixed"]), statistics.median(tps["paged"]), statistics.median(ratios),
                     min(ratios), max(ratios), peaks["fixed"] / 2**20, peaks["paged"] / 2**20))
    print(f"\n## KV cache: fixed vs paged (haina Engine)\n\n{datetime.date.today()} · {cpu_model()} "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads) · torch {torch.__version__} · "
          f"{args.rounds} interleaved rounds, medians · load average {load:.1f} before, {os.getloadavg()[0]:.1f} "
          "after · same greedy tokens: yes\n")
    print(f"Command: `.venv/bin/python benchmarks/kv_cache.py {' '.join(sys.argv[1:])}`\n")
    print("| case (preset:batch:prompt:new) | fixed tok/s | paged tok/s | paged / fixed (range) | fixed peak MiB | "
          "paged peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, f, pg, ratio, lo, hi, mf, mp in rows:
        print(f"| {case} | {f:,.0f} | {pg:,.0f} | {ratio:.3f} ({lo:.2f}–{hi:.2f}) | {mf:.1f} | {mp:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
